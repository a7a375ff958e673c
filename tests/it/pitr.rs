//! Point-in-time restores from delta chains at the scale users run, on etcd 3.5.1 and 3.4.23: a
//! target revision anywhere inside a segment of more than 10,000 revisions (its first, middle and
//! last) restores exactly the keyspace etcd had at that revision, while an altered segment is
//! still refused; `-to-time` restores the newest base taken before the time; leases of the
//! snapshot survive a replay that lasts longer than their TTL; a follower catches up over watch
//! responses larger than gRPC's default 4 MiB; a zipped newest snapshot does not restart the
//! chain on every start; after a restore that keeps revision numbers, the new history's writes
//! are shipped and never mixed with the old history's segments.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use tests::support::etcd::EtcdVersion;
use tests::support::s3::S3Server;
use tests::support::server::{all_keys, assert_reset_done, block_on, connect, files, wait_until, DataDir, Server};

use crate::deltas::{metric, restore_flags, revision, segment_files, strs, wait_following};

tests::on_both_versions!(
    a_target_revision_inside_a_long_segment_restores_exactly_that_revision,
    restore_to_time_picks_a_base_taken_before_the_time,
    leases_of_the_snapshot_outlive_a_replay_longer_than_their_ttl,
    a_follower_catches_up_over_watch_responses_larger_than_4_mib,
    a_zipped_newest_snapshot_does_not_restart_the_chain,
    a_restore_that_keeps_revision_numbers_starts_a_new_history,
);

/// Key, value, create revision, mod revision and version of every key at `rev` (what
/// `etcdctl get --rev=REV "" --from-key -w json` shows of each key).
type Kv = (String, Vec<u8>, i64, i64, i64);

fn keys_at(dd: &DataDir, rev: Option<i64>) -> Vec<Kv> {
    block_on(async {
        // Values of several MiB in all: above gRPC's default 4 MiB decoding limit.
        let mut kv = connect(dd).await.client.kv_client().max_decoding_message_size(256 << 20);
        let mut opts = etcd_client::GetOptions::new().with_all_keys();
        if let Some(r) = rev {
            opts = opts.with_revision(r);
        }
        let r = kv.get("", Some(opts)).await.unwrap();
        r.kvs()
            .iter()
            .map(|kv| {
                (
                    kv.key_str().unwrap().to_string(),
                    kv.value().to_vec(),
                    kv.create_revision(),
                    kv.mod_revision(),
                    kv.version(),
                )
            })
            .collect()
    })
}

/// `n` puts (keys `prefix` + `i % distinct`, so most are overwrites), 64 at a time, then a
/// delete of every tenth distinct key: `n + distinct / 10` revisions.
async fn churn(c: &etcd_client::Client, prefix: &str, n: usize, distinct: usize) {
    futures::stream::iter(0..n)
        .map(|i| {
            let mut c = c.clone();
            let key = format!("{prefix}{:06}", i % distinct);
            async move { c.put(key, format!("v{i}"), None).await.unwrap() }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    futures::stream::iter((0..distinct).step_by(10))
        .map(|i| {
            let mut c = c.clone();
            let key = format!("{prefix}{i:06}");
            async move { c.delete(key, None).await.unwrap() }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
}

/// Waits (up to `timeout`) until the shipped revision reaches `rev` with no failed upload.
fn wait_shipped_within(s: &Server, rev: i64, timeout: Duration) {
    wait_until(&format!("revision {rev} to be shipped"), timeout, || {
        metric(s, "k3s_snapshot_delta_shipped_revision ") >= rev as f64
            && metric(s, "k3s_snapshot_delta_upload_failures_total ") == 0.0
    });
}

/// `(from, to)` of a segment file name (`delta-<from>-<to>-<node>-<closed>.seg`).
fn range(file: &str) -> (i64, i64) {
    let mut parts = file.strip_prefix("delta-").unwrap().splitn(3, '-');
    (parts.next().unwrap().parse().unwrap(), parts.next().unwrap().parse().unwrap())
}

/// `etcd-snapshot save` against the running server (which may have a delta segment open in the
/// snapshot dir); returns the new snapshot's path.
fn save_now(dd: &DataDir) -> PathBuf {
    let ours = |dd: &DataDir| {
        files(&dd.snapshots())
            .into_iter()
            .filter(|f| !f.starts_with('.') && !f.starts_with("delta-"))
            .collect::<Vec<_>>()
    };
    let before = ours(dd);
    let dir = dd.path().display().to_string();
    let mut c = tests::support::bin::cmd();
    c.args(["etcd-snapshot", "save", "--data-dir", &dir, "--node-name", &dd.node]);
    tests::support::bin::run(&mut c).assert_ok();
    let new: Vec<String> = ours(dd).into_iter().filter(|f| !before.contains(f)).collect();
    assert_eq!(new.len(), 1, "{new:?}");
    dd.snapshots().join(&new[0])
}

fn rfc3339(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0).unwrap().to_rfc3339()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The object `file` of bucket `bucket` as s3s-fs keeps it on disk (not the `.metadata/` document
/// of the same name beside it).
fn object_path(root: &Path, bucket: &str, file: &str) -> PathBuf {
    let p = root.join(bucket).join(file);
    assert!(p.is_file(), "{file} is not in the bucket");
    p
}

/// A fresh node restores from S3 with `extra` and bump 0, starts, and must hold exactly `want`.
fn restore_fresh(v: EtcdVersion, s3: &S3Server, token: &str, extra: &[String], want: &[Kv], rev: i64) {
    let fresh = DataDir::new(v);
    let mut flags = extra.to_vec();
    flags.push("--cluster-reset-restore-bump-revision=0".into());
    let r = fresh.run(&strs(&restore_flags(s3, token, &flags)));
    assert_reset_done(&r, &fresh);
    let s = fresh.start(&["--etcd-disable-snapshots", &format!("--token={token}")]);
    assert_eq!(revision(&fresh), rev, "{extra:?}: the restored revision");
    let got = keys_at(&fresh, None);
    assert_eq!(got.len(), want.len(), "{extra:?}: the number of keys");
    assert!(got == want, "{extra:?}: the keyspace differs from the original's at revision {rev}");
    s.stop();
}

fn a_target_revision_inside_a_long_segment_restores_exactly_that_revision(v: EtcdVersion) {
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let dd = DataDir::new(v);
    let mut flags = s3.server_flags("snaps");
    flags.extend(["--etcd-disable-snapshots".into(), "--etcd-snapshot-delta-interval=30s".into()]);
    let s = dd.start(&strs(&flags));
    wait_following(&s);
    // 11,000 puts over 2,000 keys and 200 deletes: one segment of 11,200 revisions (the writes
    // take a few seconds; the segment closes at the 30 s tick).
    block_on(async { churn(&connect(&dd).await.client, "/registry/pods/ns/p", 11_000, 2_000).await });
    let last = revision(&dd);
    wait_shipped_within(&s, last, Duration::from_secs(90));
    let long = segment_files(&dd.snapshots())
        .into_iter()
        .map(|f| (range(&f), f))
        .find(|((from, to), _)| to - from + 1 >= 10_000)
        .unwrap_or_else(|| panic!("no segment of 10,000 revisions: {:?}", segment_files(&dd.snapshots())));
    let ((first, end), long_file) = long;
    assert_eq!(end, last, "the long segment holds the churn");
    let mid = (first + end) / 2;
    // The time target: a second after the one the long segment closed in (names keep whole
    // seconds), before the next one (written below, once the clock has passed it).
    let t = now() + 1;
    wait_until("the clock to pass the target time", Duration::from_secs(4), || now() > t);
    block_on(async { churn(&connect(&dd).await.client, "/registry/configmaps/ns/c", 100, 50).await });
    let after = revision(&dd);
    let expected: Vec<(i64, Vec<Kv>)> = [first, mid, end].iter().map(|&r| (r, keys_at(&dd, Some(r)))).collect();
    wait_shipped_within(&s, after, Duration::from_secs(90));
    s.stop();

    let token = dd.token().split_once("::server:").map(|(_, s)| s.to_string()).unwrap();
    for (rev, want) in &expected {
        restore_fresh(v, &s3, &token, &[format!("--cluster-reset-restore-to-revision={rev}")], want, *rev);
    }
    let (_, at_end) = expected.last().unwrap();
    restore_fresh(v, &s3, &token, &[format!("--cluster-reset-restore-to-time={}", rfc3339(t))], at_end, end);

    // An altered byte after the target revision is still damage: refused, nothing changed.
    let obj = object_path(&s3.root, "snaps", &long_file);
    let mut bytes = std::fs::read(&obj).unwrap();
    let at = bytes.len() * 9 / 10;
    bytes[at] ^= 0x55;
    std::fs::write(&obj, bytes).unwrap();
    let damaged = DataDir::new(v);
    let flags = restore_flags(&s3, &token, &[format!("--cluster-reset-restore-to-revision={mid}")]);
    damaged.run(&strs(&flags)).assert_fails_with("damaged");
    assert!(!damaged.db().join("etcd/member").exists());
}

fn restore_to_time_picks_a_base_taken_before_the_time(v: EtcdVersion) {
    let dd = DataDir::new(v);
    let s = dd.start(&["--etcd-disable-snapshots", "--etcd-snapshot-delta-interval=1s"]);
    wait_following(&s);
    block_on(async { connect(&dd).await.client.put("/registry/secrets/ns/keep", "v", None).await.unwrap() });
    wait_shipped_within(&s, revision(&dd), Duration::from_secs(30));
    let t = now() + 1;
    wait_until("the clock to pass the target time", Duration::from_secs(4), || now() > t);
    // The accident after T, and a snapshot that holds it.
    block_on(async { connect(&dd).await.client.delete("/registry/secrets/ns/keep", None).await.unwrap() });
    let late = save_now(&dd);
    wait_shipped_within(&s, revision(&dd), Duration::from_secs(30));
    s.stop();

    let r = dd.run(&[
        "--cluster-reset",
        "--cluster-reset-restore-path=latest",
        &format!("--cluster-reset-restore-to-time={}", rfc3339(t)),
    ]);
    assert_reset_done(&r, &dd);
    assert!(
        !r.stderr.contains(late.file_name().unwrap().to_str().unwrap()),
        "the snapshot after T was chosen:\n{}",
        r.stderr
    );
    let s = dd.start(&["--etcd-disable-snapshots"]);
    assert!(all_keys(&dd).iter().any(|(k, _)| k == "/registry/secrets/ns/keep"), "the delete after T is undone");
    s.stop();

    // The snapshot taken after T, named explicitly, is refused; and with no base before
    // a time, `latest` is refused.
    let early = rfc3339(t - 3600);
    let r = dd.run(&[
        "--cluster-reset",
        &format!("--cluster-reset-restore-path={}", late.display()),
        &format!("--cluster-reset-restore-to-time={}", rfc3339(t)),
    ]);
    r.assert_fails_with("not before --cluster-reset-restore-to-time");
    let r = dd.run(&[
        "--cluster-reset",
        "--cluster-reset-restore-path=latest",
        &format!("--cluster-reset-restore-to-time={early}"),
    ]);
    r.assert_fails_with("no snapshot taken before");
}

fn leases_of_the_snapshot_outlive_a_replay_longer_than_their_ttl(v: EtcdVersion) {
    let dd = DataDir::new(v);
    let s = dd.start(&["--etcd-disable-snapshots", "--etcd-snapshot-delta-interval=1s"]);
    wait_following(&s);
    let key = "/registry/masterleases/10.0.0.1";
    let new_lease = block_on(async {
        let mut c = connect(&dd).await.client;
        // A kube-apiserver style master lease: 5 s, renewed by its owner while it lives.
        let old = c.lease_grant(5, None).await.unwrap().id();
        c.put(key, "old", Some(etcd_client::PutOptions::new().with_lease(old))).await.unwrap();
        let (mut keeper, mut acks) = c.lease_keep_alive(old).await.unwrap();
        let renew = tokio::spawn(async move {
            loop {
                keeper.keep_alive().await.unwrap();
                acks.message().await.unwrap();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        // The restore's base holds the key on its lease.
        let dir = dd.path().display().to_string();
        let node = dd.node.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = tests::support::bin::cmd();
            c.args(["etcd-snapshot", "save", "--data-dir", &dir, "--node-name", &node]);
            tests::support::bin::run(&mut c).assert_ok();
        })
        .await
        .unwrap();
        churn(&c, "/registry/events/ns/e", 20_000, 5_000).await;
        let new = c.lease_grant(600, None).await.unwrap().id();
        c.put(key, "new", Some(etcd_client::PutOptions::new().with_lease(new))).await.unwrap();
        renew.abort();
        new
    });
    let last = revision(&dd);
    let want = all_keys(&dd);
    wait_shipped_within(&s, last, Duration::from_secs(60));
    s.stop();

    let r = dd.run(&["--cluster-reset", "--cluster-reset-restore-path=latest", "--cluster-reset-restore-deltas"]);
    assert_reset_done(&r, &dd);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    assert_eq!(all_keys(&dd), want, "every write of the chain, the re-leased key included");
    let kv = block_on(async { connect(&dd).await.client.get(key, None).await.unwrap().kvs()[0].clone() });
    assert_eq!((kv.value(), kv.lease()), (&b"new"[..], new_lease));
    s.stop();
}

fn a_follower_catches_up_over_watch_responses_larger_than_4_mib(v: EtcdVersion) {
    let dd = DataDir::new(v);
    let flags = ["--etcd-disable-snapshots", "--etcd-snapshot-delta-interval=2s"];
    let s = dd.start(&flags);
    wait_following(&s);
    s.stop();
    // While nothing follows: six 1 MiB values, and a lease holding 20,000 keys revoked in one
    // revision.
    let s = dd.start(&["--etcd-disable-snapshots"]);
    block_on(async {
        let mut c = connect(&dd).await.client;
        for i in 0..6 {
            c.put(format!("/registry/big/{i}"), vec![b'x'; 1 << 20], None).await.unwrap();
        }
        let lease = c.lease_grant(3600, None).await.unwrap().id();
        for chunk in (0..20_000).collect::<Vec<_>>().chunks(100) {
            let ops: Vec<etcd_client::TxnOp> = chunk
                .iter()
                .map(|i| {
                    let opts = etcd_client::PutOptions::new().with_lease(lease);
                    etcd_client::TxnOp::put(format!("/registry/leases/ns/l{i:05}"), "x", Some(opts))
                })
                .collect();
            c.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
        }
        c.lease_revoke(lease).await.unwrap();
    });
    let last = revision(&dd);
    let want = keys_at(&dd, None);
    s.stop();
    let s = dd.start(&flags);
    wait_shipped_within(&s, last, Duration::from_secs(30));
    s.stop();

    let r = dd.run(&["--cluster-reset", "--cluster-reset-restore-path=latest", "--cluster-reset-restore-deltas"]);
    assert_reset_done(&r, &dd);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    assert!(keys_at(&dd, None) == want, "the restored keyspace differs from the original's");
    s.stop();
}

fn a_zipped_newest_snapshot_does_not_restart_the_chain(v: EtcdVersion) {
    let dd = DataDir::new(v);
    let flags = ["--etcd-disable-snapshots", "--etcd-snapshot-delta-interval=1s", "--etcd-snapshot-compress"];
    let s = dd.start(&flags);
    wait_following(&s);
    block_on(async { connect(&dd).await.client.put("/a", "1", None).await.unwrap() });
    wait_shipped_within(&s, revision(&dd), Duration::from_secs(30));
    let snapshots =
        |dd: &DataDir| files(&dd.snapshots()).into_iter().filter(|f| f.ends_with(".zip")).collect::<Vec<_>>();
    let before = snapshots(&dd);
    assert_eq!(before.len(), 1, "{before:?}");
    s.stop();

    let s = dd.start(&flags);
    block_on(async { connect(&dd).await.client.put("/b", "2", None).await.unwrap() });
    let last = revision(&dd);
    wait_shipped_within(&s, last, Duration::from_secs(30));
    assert_eq!(snapshots(&dd), before, "the chain goes on after the zipped snapshot");
    assert_eq!(metric(&s, "k3s_snapshot_delta_chain_breaks_total "), 0.0);
    s.stop();
    let segs = segment_files(&dd.snapshots());
    let (lo, hi) = segs.iter().map(|f| range(f)).fold((i64::MAX, 0), |(lo, hi), (f, t)| (lo.min(f), hi.max(t)));
    assert!(hi >= last, "{segs:?}");
    let mut covered = lo - 1;
    let mut sorted: Vec<(i64, i64)> = segs.iter().map(|f| range(f)).collect();
    sorted.sort();
    for (f, t) in sorted {
        assert!(f <= covered + 1, "a hole before {f}: {segs:?}");
        covered = covered.max(t);
    }
}

fn a_restore_that_keeps_revision_numbers_starts_a_new_history(v: EtcdVersion) {
    let dd = DataDir::new(v);
    let flags = ["--etcd-disable-snapshots", "--etcd-snapshot-delta-interval=1s"];
    let s = dd.start(&flags);
    wait_following(&s);
    let put_all = |prefix: &str, n: usize| {
        block_on(async {
            let mut c = connect(&dd).await.client;
            for i in 0..n {
                c.put(format!("{prefix}{i:02}"), "v", None).await.unwrap();
            }
        })
    };
    put_all("/registry/a/", 10);
    let base = save_now(&dd);
    let m = revision(&dd);
    // The old history goes on to H = M + 20, all of it shipped.
    put_all("/registry/old/", 20);
    let h = revision(&dd);
    wait_shipped_within(&s, h, Duration::from_secs(30));
    s.stop();

    // Back to M, revision numbers kept: M+1..H will now mean other writes.
    let r = dd.run(&[
        "--cluster-reset",
        &format!("--cluster-reset-restore-path={}", base.display()),
        "--cluster-reset-restore-bump-revision=0",
    ]);
    assert_reset_done(&r, &dd);
    let s = dd.start(&flags);
    assert_eq!(revision(&dd), m);
    put_all("/registry/new/", 30);
    let last = revision(&dd);
    assert!(last > h);
    wait_shipped_within(&s, last, Duration::from_secs(30));
    let want = all_keys(&dd);
    s.stop();

    let r = dd.run(&["--cluster-reset", "--cluster-reset-restore-path=latest", "--cluster-reset-restore-deltas"]);
    assert_reset_done(&r, &dd);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    let got = all_keys(&dd);
    assert!(!got.iter().any(|(k, _)| k.starts_with("/registry/old/")), "the old history's writes came back");
    assert_eq!(got, want, "every write of the new history, none of the old");
    s.stop();
}
