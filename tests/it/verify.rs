//! Restore drills (issue 28), on etcd 3.5.1 and 3.4.23 against real S3 (s3s-fs): a good local,
//! zipped, encrypted, S3 and delta-chain backup each verifies with its content compared by hashkv
//! against what the cluster recorded, records `verified*` in its metadata and shows in `ls`;
//! a server's scheduled drill does the same and exports it on `/metrics`; the servers of a
//! cluster agree on one drill per tick. The failures are in `hostile/verify.rs`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tests::support::age;
use tests::support::bin::{self, Run};
use tests::support::etcd::{Etcd, EtcdVersion};
use tests::support::s3::S3Server;
use tests::support::server::{block_on, files, put, save, wait_until, DataDir};

use crate::deltas::{metric, revision, shipping_flags, strs, wait_following, wait_shipped};

tests::on_both_versions!(
    local_zipped_encrypted_and_s3_snapshots_verify_with_their_content_compared,
    a_delta_chain_verifies_to_its_end_and_the_scheduled_drill_records_it,
    servers_agree_on_one_drill_per_tick,
);

/// `etcd-snapshot verify` of `dd`'s snapshots with `extra` arguments (a target, flags).
pub(crate) fn verify(dd: &DataDir, extra: &[&str]) -> Run {
    let data_dir = dd.path().display().to_string();
    let bins = dd.version.bin_dir().display().to_string();
    let mut c = bin::cmd();
    c.args(["etcd-snapshot", "verify", "--data-dir", &data_dir, "--node-name", &dd.node, "--etcd-bin-dir", &bins]);
    c.args(extra);
    bin::run(&mut c)
}

/// The flat metadata document of a local snapshot.
pub(crate) fn local_metadata(snapshot: &Path) -> serde_json::Map<String, serde_json::Value> {
    let doc = snapshot.parent().unwrap().parent().unwrap().join(".metadata").join(snapshot.file_name().unwrap());
    serde_json::from_slice(&std::fs::read(doc).unwrap()).unwrap()
}

/// The object `key` (a file name, or `.metadata/<file>`) as s3s-fs keeps it on disk.
pub(crate) fn object(s3: &S3Server, key: &str) -> PathBuf {
    let p = s3.root.join("snaps").join(key);
    assert!(p.is_file(), "{key} is not in the bucket");
    p
}

/// A drill that passed with the content compared: every check ok, the content line, the summary.
#[track_caller]
pub(crate) fn assert_verified(r: &Run) {
    r.assert_ok();
    for check in ["scratch", "restore", "etcd", "content", "rto"] {
        assert!(r.stdout.contains(&format!("ok      {check}")), "check {check}:\n{}", r.stdout);
    }
    assert!(r.stdout.contains("verified (content compared, RTO "), "{}", r.stdout);
}

/// Nothing left of a drill: the scratch parent is empty.
#[track_caller]
pub(crate) fn assert_no_scratch(dd: &DataDir) {
    let left = files(&dd.path().join("server/verify"));
    assert!(left.is_empty(), "scratch left behind: {left:?}");
}

fn local_zipped_encrypted_and_s3_snapshots_verify_with_their_content_compared(v: EtcdVersion) {
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let dd = DataDir::new(v);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    put(&dd, &[("/registry/a", "1"), ("/registry/b", "2")]);
    let key = age::keygen(dd.tmp.path(), "drill");
    let recipients = key.recipients.display().to_string();
    let identity = key.identity.display().to_string();
    let plain = save(&dd, &[]);
    put(&dd, &[("/registry/c", "3")]);
    let zipped = save(&dd, &["--snapshot-compress"]);
    let encrypted = save(&dd, &["--snapshot-compress", "--snapshot-encryption-recipients-file", &recipients]);
    let s3_flags = s3.server_flags("snaps");
    let mut with_s3: Vec<&str> = strs(&s3_flags);
    let in_s3 = save(&dd, &with_s3);
    let at_save = revision(&dd);
    s.stop();

    for (snap, extra) in [
        (&plain, vec![]),
        (&zipped, vec![]),
        (&encrypted, vec!["--snapshot-encryption-identity-file", identity.as_str()]),
    ] {
        let name = snap.file_name().unwrap().to_string_lossy().into_owned();
        let before = files(&dd.snapshots());
        let mut args = vec![name.as_str()];
        args.extend(&extra);
        let r = verify(&dd, &args);
        assert_verified(&r);
        assert_eq!(files(&dd.snapshots()), before, "{name}: the snapshot dir is as it was");
        let md = local_metadata(snap);
        assert!(md.contains_key("verifiedAt") && md.contains_key("verifiedRTO"), "{name}: {md:?}");
        assert_eq!(md["verifiedHashKV"], md["hashKV"], "{name}: the hash that matched is the recorded one");
        assert_no_scratch(&dd);
    }

    // From S3, by name: the object's metadata records the drill.
    let name = in_s3.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::remove_file(&in_s3).unwrap();
    with_s3.push(&name);
    let r = verify(&dd, &with_s3);
    assert_verified(&r);
    assert!(r.stdout.contains(&format!("answered at revision {at_save}")), "{}", r.stdout);
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(object(&s3, &format!(".metadata/{name}"))).unwrap()).unwrap();
    assert!(doc.get("verifiedAt").is_some(), "{doc}");
    assert_no_scratch(&dd);
    assert!(!dd.snapshots().join(&name).exists(), "a drill places no download in the snapshot dir");

    // `ls` shows which snapshots were proven; -o json carries the fields.
    let data_dir = dd.path().display().to_string();
    let mut ls = bin::cmd();
    ls.args(["etcd-snapshot", "ls", "--data-dir", &data_dir]).args(&s3_flags);
    let out = bin::run(&mut ls);
    out.assert_ok();
    assert!(out.stdout.lines().next().unwrap().ends_with("Verified"), "{}", out.stdout);
    let proven = out.stdout.lines().filter(|l| l.contains(" rto=") && l.contains(" hashkv=")).count();
    assert_eq!(proven, 4, "{}", out.stdout);
}

fn a_delta_chain_verifies_to_its_end_and_the_scheduled_drill_records_it(v: EtcdVersion) {
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let dd = DataDir::new(v);
    let mut flags = shipping_flags(&s3);
    flags.push("--etcd-snapshot-verify-schedule=@every 2s".into());
    let s = dd.start(&strs(&flags));
    wait_following(&s);
    for i in 0..40 {
        put(&dd, &[(&format!("/registry/k{i:02}"), &i.to_string())]);
    }
    let last = revision(&dd);
    wait_shipped(&s, last);
    // The scheduled drill: one that replays the chain to at least the writes above.
    wait_until("a scheduled drill past the writes", Duration::from_secs(60), || {
        metric(&s, "k3s_snapshot_verify_succeeded_total ") >= 1.0
            && metric(&s, "k3s_snapshot_verify_last_success_timestamp_seconds ") > 0.0
            && chain_base_verified_at(&s3) >= last
    });
    assert_eq!(metric(&s, "k3s_snapshot_verify_last_content_compared "), 1.0);
    assert!(metric(&s, "k3s_snapshot_verify_last_rto_seconds ") > 0.0);
    assert_eq!(metric(&s, "k3s_snapshot_verify_failed_total "), 0.0, "{}", s.log_text());
    assert!(s.log_text().contains("restore drill passed"), "{}", s.log_text());
    s.stop();
    assert_no_scratch(&dd);

    // By hand, from S3 only, on a fresh data dir: the chain to its end, compared at its end.
    let fresh = DataDir::new(v);
    let s3_flags = s3.server_flags("snaps");
    let mut args = strs(&s3_flags);
    args.extend(["latest", "--deltas"]);
    let r = verify(&fresh, &args);
    assert_verified(&r);
    assert!(r.stdout.contains("ok      replay"), "{}", r.stdout);
    assert!(r.stdout.contains("recorded at the end of segment delta-"), "{}", r.stdout);
    let answered = r.stdout.lines().find_map(|l| l.split("answered at revision ").nth(1)).unwrap();
    assert!(answered.trim().parse::<i64>().unwrap() >= last, "{}", r.stdout);
    // To a revision inside the chain: compared at the newest recorded point at or below it.
    let mid = (last - 20).to_string();
    let mut args = strs(&s3_flags);
    args.extend(["latest", "--to-revision", &mid, "-o", "json"]);
    let r = verify(&fresh, &args);
    r.assert_ok();
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["revision"].as_i64(), Some(last - 20), "{report}");
    assert!(report["comparedAt"].as_i64().unwrap() <= last - 20, "{report}");
    assert!(report["hashKv"].is_u64() && report["ok"] == true, "{report}");
    assert_no_scratch(&fresh);
}

/// The revision the newest chain base in S3 was verified at (0 when none was).
fn chain_base_verified_at(s3: &S3Server) -> i64 {
    let dir = s3.root.join("snaps/.metadata");
    let mut best = 0;
    for f in files(&dir).into_iter().filter(|f| f.starts_with("chain-base-")) {
        let Ok(doc) = std::fs::read(dir.join(&f)) else { continue };
        let doc: serde_json::Value = serde_json::from_slice(&doc).unwrap_or_default();
        if let Some(r) = doc.get("verifiedRevision").and_then(|r| r.as_str()).and_then(|r| r.parse().ok()) {
            best = best.max(r);
        }
    }
    best
}

fn servers_agree_on_one_drill_per_tick(v: EtcdVersion) {
    let etcd = Etcd::start(v);
    let cfg = k3s_snapshot_core::etcd::EtcdClientConfig {
        endpoints: vec![etcd.endpoint.clone()],
        cacert: None,
        cert: None,
        key: None,
    };
    let tick = 1_800_000_000;
    let claim = |node: &str, tick: i64| block_on(k3s_server_hooks::drills::claim_tick(&cfg, node, tick, 120)).unwrap();
    assert_eq!(claim("node-a", tick), None, "the first server takes the tick");
    assert_eq!(claim("node-b", tick).as_deref(), Some("node-a"), "the second is told who has it");
    assert_eq!(claim("node-c", tick).as_deref(), Some("node-a"));
    assert_eq!(claim("node-b", tick + 60), None, "the next tick is free again");
    // The claim goes away by itself: its key is leased.
    let lease = block_on(async {
        let mut c = cfg.connect().await.unwrap().client;
        let r = c.get(format!("{}{tick}", k3s_server_hooks::drills::ELECTION_PREFIX), None).await.unwrap();
        r.kvs()[0].lease()
    });
    assert_ne!(lease, 0, "the tick's key carries a lease");
}
