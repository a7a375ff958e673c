//! `k3s-snapshot server --cluster-reset [--cluster-reset-restore-path]` with real etcd 3.5.1 and
//! 3.4.23: the user's procedure, snapshots from `etcdctl` and in k3s's zip layout, refusals that
//! change nothing, reset without a path, and a crash at every step of the swap.

use std::path::{Path, PathBuf};

use tests::support::bin;
use tests::support::etcd::{Etcd, EtcdVersion};
use tests::support::k3s;
use tests::support::server::{
    all_keys, assert_reset_done, block_on, connect, delete, files, kv, put, save, server_with_uploaded_snapshot,
    DataDir,
};

tests::on_both_versions!(
    users_procedure_restores_exactly_the_snapshot,
    etcdctl_snapshot_of_a_plain_etcd_restores,
    cluster_reset_without_a_path_keeps_the_data_and_leaves_one_member,
    zip_in_k3s_layout_restores_from_any_working_dir,
    a_restore_moves_the_revision_forward_and_compacts_the_past,
    the_native_restore_leaves_what_etcds_own_restore_leaves,
);

fn previously_reset(dd: &DataDir) -> String {
    format!(
        "Managed etcd cluster membership was previously reset, please remove the cluster-reset flag and start normally. If you need to perform another cluster reset, you must first manually delete the file at {}",
        dd.db().join("reset-flag").display()
    )
}

fn member_count(dd: &DataDir) -> usize {
    block_on(async { connect(dd).await.client.member_list().await.unwrap().members().len() })
}

fn users_procedure_restores_exactly_the_snapshot(v: EtcdVersion) {
    let dd = DataDir::new(v);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    put(&dd, &[("/registry/a", "1"), ("/registry/b", "2")]);
    let snap = save(&dd, &[]);
    put(&dd, &[("/registry/c", "3")]);
    delete(&dd, "/registry/a");
    s.stop();

    let r = dd.run(&["--cluster-reset", &format!("--cluster-reset-restore-path={}", snap.display())]);
    assert_reset_done(&r, &dd);
    assert!(dd.db().join("etcd-old/member").is_dir(), "the old data is not in etcd-old");

    let again = dd.run(&["--cluster-reset"]);
    again.assert_fails_with(&previously_reset(&dd));

    let s = dd.start(&["--etcd-disable-snapshots"]);
    assert!(!dd.db().join("reset-flag").exists(), "a normal start removes reset-flag");
    assert_eq!(all_keys(&dd), kv(&[("/registry/a", "1"), ("/registry/b", "2")]));
    assert_eq!(member_count(&dd), 1);
    s.stop();

    // A second reset moves the first etcd-old aside instead of losing it.
    let r = dd.run(&["--cluster-reset", &format!("--cluster-reset-restore-path={}", snap.display())]);
    assert_reset_done(&r, &dd);
    let aside: Vec<_> = files(&dd.db()).into_iter().filter(|f| f.starts_with("etcd-old-")).collect();
    assert_eq!(aside.len(), 1, "{:?}", files(&dd.db()));
}

fn etcdctl_snapshot_of_a_plain_etcd_restores(v: EtcdVersion) {
    let plain = Etcd::start(v);
    plain.put("/plain/x", "1");
    plain.put("/plain/y", "2");
    let tmp = tempfile::tempdir().unwrap();
    let snap = tmp.path().join("plain.db");
    let o = plain.ctl(&["snapshot", "save", snap.to_str().unwrap()]);
    assert!(o.status.success(), "etcdctl snapshot save: {}", String::from_utf8_lossy(&o.stderr));
    drop(plain);

    let dd = DataDir::new(v);
    let r = dd.run(&["--cluster-reset", &format!("--cluster-reset-restore-path={}", snap.display())]);
    assert_reset_done(&r, &dd);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    assert_eq!(all_keys(&dd), kv(&[("/plain/x", "1"), ("/plain/y", "2")]));
    assert_eq!(member_count(&dd), 1);
    s.stop();
}

fn cluster_reset_without_a_path_keeps_the_data_and_leaves_one_member(v: EtcdVersion) {
    let dd = DataDir::new(v);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    put(&dd, &[("k1", "v1"), ("k2", "v2")]);
    s.stop();
    let r = dd.run(&["--cluster-reset"]);
    assert_reset_done(&r, &dd);
    assert!(dd.db().join("etcd-old/member").is_dir(), "the data was not copied to etcd-old");
    let s = dd.start(&["--etcd-disable-snapshots"]);
    assert_eq!(all_keys(&dd), kv(&[("k1", "v1"), ("k2", "v2")]));
    assert_eq!(member_count(&dd), 1);
    assert!(!dd.db().join("reset-flag").exists());
    s.stop();
}

fn zip_in_k3s_layout_restores_from_any_working_dir(v: EtcdVersion) {
    let dd = DataDir::new(v);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    put(&dd, &[("zipped", "yes")]);
    let zip = save(&dd, &["--snapshot-compress"]);
    assert!(zip.to_string_lossy().ends_with(".zip"));
    put(&dd, &[("later", "no")]);
    s.stop();
    // Move the zip somewhere else and restore from an unrelated working dir by a relative path.
    let elsewhere = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let moved = elsewhere.path().join(zip.file_name().unwrap());
    std::fs::rename(&zip, &moved).unwrap();
    let rel = pathdiff(&moved, cwd.path());
    let r = bin::run(
        dd.command(&["--cluster-reset", &format!("--cluster-reset-restore-path={}", rel.display())])
            .current_dir(cwd.path()),
    );
    assert_reset_done(&r, &dd);
    assert!(files(cwd.path()).is_empty(), "something was written to the working dir: {:?}", files(cwd.path()));
    let raw = moved.file_stem().unwrap().to_string_lossy().into_owned();
    assert!(dd.snapshots().join(&raw).is_file(), "the zip was not extracted into the snapshot dir");
    let s = dd.start(&["--etcd-disable-snapshots"]);
    assert_eq!(all_keys(&dd), kv(&[("zipped", "yes")]));
    s.stop();
}

/// k3s's `Cluster.start` (pkg/cluster/managed.go) looks at `reset-flag` only for a bare
/// `--cluster-reset`: with `--cluster-reset-restore-path` it resets and restores whatever the
/// flag says. So a second restore needs no normal start in between; a bare reset does, and is
/// refused with k3s's message, changing nothing.
#[test]
fn a_second_restore_needs_no_normal_start_between_but_a_bare_reset_is_refused() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    put(&dd, &[("k", "first")]);
    let first = save(&dd, &[]);
    put(&dd, &[("k", "second"), ("only-in-second", "yes")]);
    let second = save(&dd, &[]);
    s.stop();

    let r = dd.run(&["--cluster-reset", &format!("--cluster-reset-restore-path={}", first.display())]);
    assert_reset_done(&r, &dd);

    // No normal start since: a bare reset is refused and changes nothing.
    let before = tree(&dd.db());
    dd.run(&["--cluster-reset"]).assert_fails_with(&previously_reset(&dd));
    assert_eq!(tree(&dd.db()), before, "a refused reset changed the db dir");

    // A restore goes ahead despite the flag.
    let r = dd.run(&["--cluster-reset", &format!("--cluster-reset-restore-path={}", second.display())]);
    assert_reset_done(&r, &dd);
    // The first restore's data went to etcd-old, the original data to etcd-old-<secs>.
    let aside: Vec<_> = files(&dd.db()).into_iter().filter(|f| f.starts_with("etcd-old-")).collect();
    assert_eq!(aside.len(), 1, "{:?}", files(&dd.db()));
    assert!(dd.db().join("etcd-old/member").is_dir());

    let s = dd.start(&["--etcd-disable-snapshots"]);
    assert!(!dd.db().join("reset-flag").exists(), "a normal start removes reset-flag");
    assert_eq!(all_keys(&dd), kv(&[("k", "second"), ("only-in-second", "yes")]));
    assert_eq!(member_count(&dd), 1);
    s.stop();
}

/// `target` relative to `base` (both absolute).
fn pathdiff(target: &Path, base: &Path) -> PathBuf {
    let ups = base.components().count() - 1;
    let mut p = PathBuf::new();
    for _ in 0..ups {
        p.push("..");
    }
    p.join(target.strip_prefix("/").unwrap())
}

/// A fingerprint of a directory tree: relative paths and sizes (and contents of small files).
fn tree(dir: &Path) -> Vec<(String, u64, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, u64, Vec<u8>)>) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let md = e.metadata().unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if md.is_dir() {
                out.push((rel + "/", 0, Vec::new()));
                walk(root, &p, out);
            } else {
                out.push((rel, md.len(), std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn corrupt_truncated_missing_and_foreign_snapshots_are_refused_and_nothing_changes() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    put(&dd, &[("keep", "me")]);
    let snap = save(&dd, &[]);
    s.stop();
    // An existing etcd-old must stay as it is too.
    std::fs::create_dir_all(dd.db().join("etcd-old/member")).unwrap();
    std::fs::write(dd.db().join("etcd-old/member/marker"), b"old").unwrap();

    let bytes = std::fs::read(&snap).unwrap();
    let bad = tempfile::tempdir().unwrap();
    let truncated = bad.path().join("truncated");
    std::fs::write(&truncated, &bytes[..bytes.len() - 4096]).unwrap();
    let corrupt = bad.path().join("corrupt");
    let mut c = bytes.clone();
    c[bytes.len() / 2] ^= 0xff;
    std::fs::write(&corrupt, &c).unwrap();
    // A zip that is not a readable archive (two-entry and path-entry zips are refused by
    // `compress::extract_single`, unit-tested in the core).
    let broken_zip = bad.path().join("broken.zip");
    std::fs::write(&broken_zip, b"PK\x05\x06 not really a zip").unwrap();
    // Pages zeroed behind meta pages 0 and 1, then a fresh trailer: the sha256 matches, the bbolt
    // structure does not.
    let broken_pages = bad.path().join("broken-pages");
    let mut img = bytes[..bytes.len() - 32].to_vec();
    for b in &mut img[2 * 4096..] {
        *b = 0;
    }
    let trailer = <sha2::Sha256 as sha2::Digest>::digest(&img);
    img.extend_from_slice(&trailer);
    std::fs::write(&broken_pages, &img).unwrap();
    let missing = bad.path().join("missing");
    let a_dir = bad.path().to_path_buf();

    let before_etcd = tree(&dd.db().join("etcd"));
    let before_old = tree(&dd.db().join("etcd-old"));
    for (path, needle) in [
        (&truncated, "truncated"),
        (&corrupt, "sha256"),
        (&missing, "does not exist"),
        (&a_dir, "not a file"),
        (&broken_zip, "zip"),
        (&broken_pages, "refusing to restore"),
    ] {
        let r = dd.run(&["--cluster-reset", &format!("--cluster-reset-restore-path={}", path.display())]);
        r.assert_fails_with(needle);
        assert_eq!(r.code, Some(1), "{}", r.stderr);
        assert_eq!(tree(&dd.db().join("etcd")), before_etcd, "db/etcd changed after refusing {}", path.display());
        assert_eq!(tree(&dd.db().join("etcd-old")), before_old, "etcd-old changed after refusing {}", path.display());
        assert!(!dd.db().join("reset-flag").exists());
        assert!(
            !files(&dd.db()).iter().any(|f| f.starts_with("etcd-old-") || f.starts_with("etcd-restore")),
            "{:?}",
            files(&dd.db())
        );
    }

    let r = dd.run(&[&format!("--cluster-reset-restore-path={}", snap.display())]);
    r.assert_fails_with("needs --cluster-reset");
    let r = dd.run(&["--cluster-reset", "--server=https://127.0.0.1:6443"]);
    r.assert_fails_with("--server");
    assert_eq!(tree(&dd.db().join("etcd")), before_etcd);

    // A server running on the data dir holds the lock: no reset underneath it.
    let s = dd.start(&["--etcd-disable-snapshots"]);
    let r = dd.run(&["--cluster-reset", &format!("--cluster-reset-restore-path={}", snap.display())]);
    r.assert_fails_with("already running");
    s.stop();
}

#[test]
fn a_crash_at_any_step_of_the_reset_leaves_old_or_new_data_whole() {
    let base = DataDir::new(EtcdVersion::V3_5);
    let s = base.start(&["--etcd-disable-snapshots"]);
    put(&base, &[("in-snapshot", "1")]);
    let snap = save(&base, &[]);
    put(&base, &[("after-snapshot", "2")]);
    s.stop();
    let old = kv(&[("after-snapshot", "2"), ("in-snapshot", "1")]);
    let new = kv(&[("in-snapshot", "1")]);

    for (step, expect) in [("bump", &old), ("1", &old), ("2", &old), ("3", &new), ("4", &new)] {
        let dd = DataDir::new(EtcdVersion::V3_5);
        let o = std::process::Command::new("cp").arg("-a").arg(base.path()).arg(dd.path()).output().unwrap();
        assert!(o.status.success());
        let r = bin::run(
            dd.command(&["--cluster-reset", &format!("--cluster-reset-restore-path={}", snap.display())])
                .env("K3S_SNAPSHOT_TEST_RESET_ABORT_AFTER", step),
        );
        assert!(r.code.is_none(), "step {step}: expected an abort, got {:?}\n{}", r.code, r.stderr);
        assert!(!dd.db().join("reset-flag").exists(), "step {step}");
        let s = dd.start(&["--etcd-disable-snapshots"]);
        assert_eq!(&all_keys(&dd), expect, "step {step}: wrong data after the crash\n{}", s.log_text());
        assert_eq!(member_count(&dd), 1);
        s.stop();
        assert!(
            !files(&dd.db()).iter().any(|f| f.starts_with("etcd-restore")),
            "step {step}: leftovers {:?}",
            files(&dd.db())
        );
        // And a reset run after the crash completes.
        let r = dd.run(&["--cluster-reset", &format!("--cluster-reset-restore-path={}", snap.display())]);
        assert_reset_done(&r, &dd);
    }
}

#[test]
fn restore_by_s3_object_name_downloads_verifies_and_restores() {
    let s3 = tests::support::s3::S3Server::start();
    s3.create_bucket("snaps");
    let flags = s3.server_flags("snaps");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let dd = DataDir::new(EtcdVersion::V3_5);
    let (s, snap, name) = server_with_uploaded_snapshot(&dd, &flags);
    assert!(s3.root.join("snaps").join(&name).is_file(), "not uploaded: {:?}", files(&s3.root.join("snaps")));
    std::fs::remove_file(&snap).unwrap();
    put(&dd, &[("not-in-snapshot", "2")]);
    s.stop();

    let mut missing = vec!["--cluster-reset", "--cluster-reset-restore-path=no-such-snapshot-1"];
    missing.extend(&flags);
    dd.run(&missing).assert_fails_with("no-such-snapshot-1");
    assert!(!dd.db().join("etcd-old").exists());

    let restore = format!("--cluster-reset-restore-path={name}");
    let mut args = vec!["--cluster-reset", restore.as_str()];
    args.extend(&flags);
    let r = dd.run(&args);
    assert_reset_done(&r, &dd);
    assert!(snap.is_file(), "the object was not downloaded into the snapshot dir");
    assert!(!r.stderr.contains(tests::support::s3::SECRET_KEY));
    let s = dd.start(&["--etcd-disable-snapshots"]);
    assert_eq!(all_keys(&dd), kv(&[("from-s3", "1")]));
    s.stop();
}

#[test]
fn restore_of_an_object_k3s_wrote_with_its_extra_metadata() {
    let s3 = tests::support::s3::S3Server::start();
    s3.create_bucket("snaps");
    let plain = Etcd::start(EtcdVersion::V3_5);
    plain.put("/registry/from-k3s", "1");
    let tmp = tempfile::tempdir().unwrap();
    let k3s_dir = tmp.path().join("k3s-a/snapshots");
    let now = chrono::Utc::now().timestamp();
    let good = format!("etcd-snapshot-k3s-a-{now}");
    let f = k3s::snapshot(&plain, &k3s_dir, &good);
    k3s::upload(&s3, "snaps", "", &f, "k3s-a", Some(k3s::EXTRA_METADATA));
    // The same snapshot with one byte damaged: nothing but its trailer can tell.
    let damaged = format!("etcd-snapshot-k3s-a-{}", now - 60);
    let mut b = std::fs::read(&f).unwrap();
    b[4096] ^= 0xff;
    std::fs::write(k3s_dir.join(&damaged), &b).unwrap();
    k3s::upload(&s3, "snaps", "", &k3s_dir.join(&damaged), "k3s-a", Some(k3s::EXTRA_METADATA));
    drop(plain);

    let flags = s3.server_flags("snaps");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let dd = DataDir::new(EtcdVersion::V3_5);
    let restore = |name: &str| {
        let path = format!("--cluster-reset-restore-path={name}");
        let mut args = vec!["--cluster-reset", path.as_str()];
        args.extend(&flags);
        dd.run(&args)
    };
    restore(&damaged).assert_fails_with("failed its sha256 integrity check");
    assert!(!dd.db().join("etcd-old").exists() && !dd.db().join("reset-flag").exists(), "nothing changed");

    let r = restore(&good);
    assert_reset_done(&r, &dd);
    assert!(!r.stderr.contains(tests::support::s3::SECRET_KEY));
    // k3s's document is kept beside the download, as k3s does, byte for byte.
    assert_eq!(std::fs::read(dd.db().join(".metadata").join(&good)).unwrap(), k3s::EXTRA_METADATA);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    assert_eq!(all_keys(&dd), kv(&[("/registry/from-k3s", "1")]));
    s.stop();
}

#[test]
fn a_snapshot_taken_with_another_token_restores_with_a_warning() {
    let a = DataDir::new(EtcdVersion::V3_5);
    // A scheduled snapshot: its metadata carries the server's token hash (of the secret only, so
    // that the same --token on a fresh data dir, with a new CA, matches).
    let s = a.start(&["--etcd-snapshot-schedule-cron=@every 1s", "--token=first-secret"]);
    put(&a, &[("k", "v")]);
    let scheduled =
        || files(&a.snapshots()).into_iter().find(|f| f.starts_with("etcd-snapshot-node-a-") && !f.ends_with(".part"));
    tests::support::server::wait_until("a scheduled snapshot", std::time::Duration::from_secs(30), || {
        scheduled().is_some()
    });
    let snap = a.snapshots().join(scheduled().unwrap());
    s.stop();
    let same = DataDir::new(EtcdVersion::V3_5);
    let restore = format!("--cluster-reset-restore-path={}", snap.display());
    let r = same.run(&["--cluster-reset", &restore, "--token=first-secret"]);
    assert_reset_done(&r, &same);
    assert!(!r.stderr.contains("different token"), "{}", r.stderr);

    let other = DataDir::new(EtcdVersion::V3_5);
    let r = other.run(&["--cluster-reset", &restore, "--token=second-secret"]);
    assert_reset_done(&r, &other);
    assert!(r.stderr.contains("different token"), "{}", r.stderr);
    assert!(!r.stderr.contains("second-secret") && !r.stderr.contains("first-secret"), "a token leaked: {}", r.stderr);
}

/// The revision etcd reports, and whether reading `key` at `rev` is refused as compacted.
fn revision_and_compacted(dd: &DataDir, key: &str, rev: i64) -> (i64, bool) {
    block_on(async {
        let mut c = connect(dd).await.client;
        let now = c.get(key, None).await.unwrap().header().unwrap().revision();
        let old = c.get(key, Some(etcd_client::GetOptions::new().with_revision(rev))).await;
        let compacted = match old {
            Err(e) => {
                assert!(e.to_string().contains("compacted"), "unexpected error: {e}");
                true
            }
            Ok(_) => false,
        };
        (now, compacted)
    })
}

fn a_restore_moves_the_revision_forward_and_compacts_the_past(v: EtcdVersion) {
    let dd = DataDir::new(v);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    put(&dd, &[("/registry/a", "1"), ("/registry/b", "2")]);
    let snap = save(&dd, &[]);
    let (snap_rev, _) = revision_and_compacted(&dd, "/registry/a", 1);
    for i in 0..5 {
        put(&dd, &[("/registry/after", &i.to_string())]);
    }
    s.stop();

    // Default: bumped by 1e9, everything up to the new revision compacted.
    let r = dd.run(&["--cluster-reset", &format!("--cluster-reset-restore-path={}", snap.display())]);
    assert_reset_done(&r, &dd);
    let bumped = snap_rev + 1_000_000_000;
    assert!(r.stderr.contains(&format!("old_revision={snap_rev}")), "{}", r.stderr);
    assert!(r.stderr.contains(&format!("new_revision={bumped}")), "{}", r.stderr);
    let status = tests::support::etcd::etcdutl_status(&dd.db().join("etcd/member/snap/db"));
    assert!(status["revision"].as_i64().unwrap() >= bumped, "etcdutl reads the bumped db: {status}");
    let s = dd.start(&["--etcd-disable-snapshots"]);
    assert_eq!(all_keys(&dd), kv(&[("/registry/a", "1"), ("/registry/b", "2")]), "the data is the snapshot's");
    let (now, compacted) = revision_and_compacted(&dd, "/registry/a", snap_rev);
    assert!(now >= bumped, "revision {now} is below {bumped}");
    assert!(compacted, "reading at the snapshot's revision {snap_rev} must say compacted");
    put(&dd, &[("/registry/new", "x")]);
    let (after_write, _) = revision_and_compacted(&dd, "/registry/new", now);
    assert!(after_write > bumped, "a new write gets a revision above the bump: {after_write}");
    // Watching from a revision of the past is refused too (clients relist).
    block_on(async {
        let mut c = connect(&dd).await.client;
        let mut stream = c
            .watch("/registry/", Some(etcd_client::WatchOptions::new().with_prefix().with_start_revision(snap_rev)))
            .await
            .unwrap();
        let resp = stream.message().await.unwrap().unwrap();
        let resp = if resp.created() && resp.compact_revision() == 0 {
            stream.message().await.unwrap().unwrap()
        } else {
            resp
        };
        assert!(resp.compact_revision() > 0, "a watch from {snap_rev} must be told it was compacted");
    });
    s.stop();

    // 0 keeps the snapshot's revision.
    let dd0 = DataDir::new(v);
    let r = dd0.run(&[
        "--cluster-reset",
        &format!("--cluster-reset-restore-path={}", snap.display()),
        "--cluster-reset-restore-bump-revision=0",
    ]);
    assert_reset_done(&r, &dd0);
    let s = dd0.start(&["--etcd-disable-snapshots"]);
    let (now, compacted) = revision_and_compacted(&dd0, "/registry/a", snap_rev);
    assert_eq!(now, snap_rev);
    assert!(!compacted);
    s.stop();
}

/// Relative path -> contents of every file under `dir`.
fn files_under(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    tree(dir).into_iter().filter(|(p, ..)| !p.ends_with('/')).map(|(p, _, bytes)| (p, bytes)).collect()
}

/// The reset restores the db natively (etcd's tool restores a probe without the keys, the same
/// edits go into a kernel copy of the image): its output must be what the tool makes of the
/// whole snapshot. WAL and snap files byte for byte, and every bucket and key of the db.
fn the_native_restore_leaves_what_etcds_own_restore_leaves(v: EtcdVersion) {
    let dd = DataDir::new(v);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    put(&dd, &[("/registry/a", "1"), ("/registry/b", "2"), ("/registry/c", "3")]);
    delete(&dd, "/registry/b");
    block_on(async {
        let mut c = connect(&dd).await.client;
        let rev = c.get("/registry/a", None).await.unwrap().header().unwrap().revision();
        c.compact(rev, Some(etcd_client::CompactionOptions::new().with_physical())).await.unwrap();
        let lease = c.lease_grant(3600, None).await.unwrap().id();
        c.put("/registry/leased", "x", Some(etcd_client::PutOptions::new().with_lease(lease))).await.unwrap();
    });
    put(&dd, &[("/registry/a", "4")]);
    let snap = save(&dd, &[]);
    s.stop();

    // Ours, stopped right after the restored dir is complete (before etcd ever runs on it).
    let r = bin::run(
        dd.command(&[
            "--cluster-reset",
            &format!("--cluster-reset-restore-path={}", snap.display()),
            "--cluster-reset-restore-bump-revision=0",
        ])
        .env("K3S_SNAPSHOT_TEST_RESET_ABORT_AFTER", "1"),
    );
    assert!(r.code.is_none(), "expected the abort after the restore, got {:?}\n{}", r.code, r.stderr);
    assert!(r.stderr.contains("the db copied and edited natively"), "the native restore was not used:\n{}", r.stderr);
    let ours = dd.db().join("etcd-restore");
    // Each restore starts a new history under a cluster token of its own; etcd's tool gets the same.
    let token = r
        .stderr
        .split("token=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .unwrap_or_else(|| panic!("the restore did not log its cluster token:\n{}", r.stderr))
        .trim_matches('"')
        .to_string();

    // etcd's own tool on the whole snapshot, for the same member.
    let theirs = dd.tmp.path().join("tool-restore");
    let peer = format!("https://127.0.0.1:{}", dd.peer_port);
    let mut tool = match v {
        EtcdVersion::V3_5 => std::process::Command::new(tests::support::etcd::etcdutl()),
        EtcdVersion::V3_4 => {
            let mut c = std::process::Command::new(v.etcdctl());
            c.env("ETCDCTL_API", "3");
            c
        }
    };
    let o = tool
        .args(["snapshot", "restore"])
        .arg(&snap)
        .arg(format!("--data-dir={}", theirs.display()))
        .arg(format!("--name={}", dd.node))
        .arg(format!("--initial-cluster={}={peer}", dd.node))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg(format!("--initial-cluster-token={token}"))
        .output()
        .unwrap();
    assert!(o.status.success(), "etcd's restore: {}", String::from_utf8_lossy(&o.stderr));

    let (mut a, mut b) = (files_under(&ours), files_under(&theirs));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "different files");
    let (da, db) = (a.remove("member/snap/db").unwrap(), b.remove("member/snap/db").unwrap());
    for (name, bytes) in &a {
        assert!(bytes == &b[name], "{name} differs from what etcd's tool wrote");
    }
    let dump = |bytes: Vec<u8>| {
        let db = k3s_snapshot_core::bbolt::Db::from_bytes("db", bytes, None).unwrap();
        db.check().unwrap();
        k3s_snapshot_core::bbolt::writer::dump(&db).unwrap()
    };
    let (da, db) = (dump(da), dump(db));
    assert!(da.iter().any(|(path, _, _)| path.first().is_some_and(|b| b == b"key")), "no keys in the restored db");
    assert_eq!(da, db, "the restored db reads differently from the one etcd's tool restored");
}
