//! The server's S3 upload queue (issues 25 and 26), against real etcd and a real s3s-fs: local
//! snapshots and local retention go on at local speed whatever S3 does (refusing connections,
//! accepting them and never answering); when S3 comes back every snapshot still kept locally is
//! uploaded, oldest first, with its metadata; a restart finds what the previous run left local
//! only, snapshots and delta segments; the chain in S3 has no hole after a restart while S3 was
//! down (26.1); a segment waiting for S3 is never removed by local retention, even when chain
//! retention would remove it, so S3's chain has no gap once S3 is back, and a restore from S3
//! gets every write (26.2, issue 27).

use std::path::Path;
use std::time::Duration;

use k3s_snapshot_core::delta::{chain_after, chains, SegmentName};
use tests::support::etcd::EtcdVersion;
use tests::support::s3::{closed_endpoint, HangingEndpoint, S3Server, ACCESS_KEY, SECRET_KEY};
use tests::support::server::{all_keys, assert_reset_done, files, put, DataDir, Server};

use crate::deltas::{metric, restore_flags, revision, segment_files, strs, wait_following, wait_shipped};

tests::on_both_versions!(
    a_restart_while_s3_was_down_leaves_no_hole_in_the_s3_chain,
    a_segment_waiting_for_s3_is_never_pruned_locally,
);

const LOCAL_TAKEN: &str = "k3s_snapshot_scheduled_taken_total{store=\"local\"}";
const SNAPSHOTS_WAITING: &str = "k3s_snapshot_upload_queue_waiting{kind=\"snapshot\"}";
const SEGMENTS_WAITING: &str = "k3s_snapshot_upload_queue_waiting{kind=\"segment\"}";
const SNAPSHOT_AGE: &str = "k3s_snapshot_upload_queue_oldest_age_seconds{kind=\"snapshot\"}";
const SEGMENTS_DROPPED: &str = "k3s_snapshot_upload_queue_dropped_total{kind=\"segment\"}";

/// `wait_until`, with the server's log in the failure message.
#[track_caller]
fn wait_logged(s: &Server, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; server log:\n{}",
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `server` S3 flags for bucket `snaps` at `endpoint` (plain http, the test keys).
fn s3_flags(endpoint: &str) -> Vec<String> {
    vec![
        "--etcd-s3".into(),
        format!("--etcd-s3-endpoint={endpoint}"),
        "--etcd-s3-insecure".into(),
        format!("--etcd-s3-access-key={ACCESS_KEY}"),
        format!("--etcd-s3-secret-key={SECRET_KEY}"),
        "--etcd-s3-bucket=snaps".into(),
    ]
}

/// Scheduled snapshots of node-a in `dir`.
fn scheduled_in(dir: &Path) -> Vec<String> {
    files(dir).into_iter().filter(|f| f.starts_with("etcd-snapshot-node-a-")).collect()
}

/// The continuous backup's chain bases in `dir`.
fn bases_in(dir: &Path) -> Vec<String> {
    files(dir).into_iter().filter(|f| f.starts_with("chain-base-node-a-")).collect()
}

/// While S3 is unusable in the way `endpoint` is, a server snapshotting every 2 s keeps taking
/// local snapshots at that pace, local retention keeps 2, and the queue shows what waits.
fn local_snapshots_go_on(endpoint: &str, extra: &[&str]) {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let mut flags = s3_flags(endpoint);
    flags.extend(["--etcd-snapshot-schedule-cron=@every 2s".into(), "--etcd-snapshot-retention=2".into()]);
    flags.extend(extra.iter().map(|s| s.to_string()));
    let s = dd.start(&strs(&flags));
    // Before the queue the snapshot lock was held through the upload's retries (or until the
    // S3 timeout): one local snapshot in this window.
    wait_logged(&s, "five local snapshots while s3 is unusable", Duration::from_secs(45), || {
        metric(&s, LOCAL_TAKEN) >= 5.0
    });
    wait_logged(&s, "local retention to keep 2", Duration::from_secs(10), || scheduled_in(&dd.snapshots()).len() == 2);
    let waiting = metric(&s, SNAPSHOTS_WAITING);
    assert!((1.0..=2.0).contains(&waiting), "the two kept snapshots (or one) wait, pruned ones are dropped: {waiting}");
    assert!(metric(&s, SNAPSHOT_AGE) > 0.0);
    assert!(!s.log_text().contains(SECRET_KEY), "the secret key leaked into the logs");
    s.stop();
}

#[test]
fn an_s3_that_refuses_connections_costs_no_local_snapshot() {
    local_snapshots_go_on(&closed_endpoint(), &[]);
}

#[test]
fn an_s3_that_never_answers_costs_no_local_snapshot() {
    let hang = HangingEndpoint::start();
    local_snapshots_go_on(&hang.endpoint, &["--etcd-s3-timeout=10m"]);
    drop(hang);
}

/// Names from the "snapshot uploaded" lines of a server's log, in log order.
fn uploaded_in_order(s: &Server) -> Vec<String> {
    s.log_text()
        .lines()
        .filter(|l| l.contains("snapshot uploaded"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("snapshot=")).map(str::to_string))
        .collect()
}

fn timestamp(snapshot: &str) -> i64 {
    snapshot.rsplit('-').next().unwrap().parse().unwrap()
}

#[test]
fn when_s3_comes_back_every_kept_snapshot_is_uploaded_oldest_first() {
    let mut s3 = S3Server::start();
    s3.create_bucket("snaps");
    s3.kill();
    let dd = DataDir::new(EtcdVersion::V3_5);
    let mut flags = s3.server_flags("snaps");
    flags.extend([
        "--etcd-s3-timeout=5s".into(),
        "--etcd-snapshot-schedule-cron=@every 2s".into(),
        "--etcd-snapshot-retention=4".into(),
    ]);
    let s = dd.start(&strs(&flags));
    wait_logged(&s, "four snapshots waiting for s3", Duration::from_secs(60), || metric(&s, SNAPSHOTS_WAITING) >= 4.0);
    assert!(scheduled_in(&s3.root.join("snaps")).is_empty());

    s3.restart();
    let bucket = s3.root.join("snaps");
    wait_logged(&s, "every locally kept snapshot in s3, nothing waiting", Duration::from_secs(90), || {
        let local = scheduled_in(&dd.snapshots());
        let remote = scheduled_in(&bucket);
        metric(&s, SNAPSHOTS_WAITING) == 0.0 && local.iter().all(|f| remote.contains(f))
    });
    for f in scheduled_in(&dd.snapshots()) {
        assert!(bucket.join(".metadata").join(&f).is_file(), "no metadata for {f} in s3");
    }
    let order = uploaded_in_order(&s);
    assert!(order.len() >= 4, "{order:?}\n{}", s.log_text());
    assert!(order.windows(2).all(|w| timestamp(&w[0]) < timestamp(&w[1])), "not oldest first: {order:?}");
    assert_eq!(metric(&s, "k3s_snapshot_last_failed{store=\"s3\"}"), 0.0);
    s.stop();
}

#[test]
fn a_restart_finds_snapshots_and_segments_left_local_only() {
    let mut s3 = S3Server::start();
    s3.create_bucket("snaps");
    s3.kill();
    let dd = DataDir::new(EtcdVersion::V3_5);
    let mut flags = s3.server_flags("snaps");
    flags.extend([
        "--etcd-s3-timeout=5s".into(),
        "--etcd-snapshot-schedule-cron=@every 2s".into(),
        "--etcd-snapshot-retention=3".into(),
        "--etcd-snapshot-delta-interval=1s".into(),
    ]);
    let s = dd.start(&strs(&flags));
    assert!(dd.db().join("etcd/config").is_file(), "{}", s.log_text());
    for i in 0..5 {
        put(&dd, &[(&format!("/k{i}"), "v")]);
    }
    wait_logged(&s, "snapshots and segments kept locally", Duration::from_secs(60), || {
        scheduled_in(&dd.snapshots()).len() >= 2 && !segment_files(&dd.snapshots()).is_empty()
    });
    s.stop();

    // S3 is back; the server starts without a schedule or deltas: only the queue's comparison
    // with S3 can upload what the first run left.
    s3.restart();
    let local_snaps = scheduled_in(&dd.snapshots());
    let local_segs = segment_files(&dd.snapshots());
    let mut flags = s3.server_flags("snaps");
    flags.push("--etcd-disable-snapshots".into());
    let s = dd.start(&strs(&flags));
    let bucket = s3.root.join("snaps");
    wait_logged(&s, "the snapshots and segments left local only in s3", Duration::from_secs(60), || {
        let remote = files(&bucket);
        local_snaps.iter().chain(&local_segs).all(|f| remote.contains(f))
    });
    wait_logged(&s, "nothing waiting", Duration::from_secs(10), || {
        metric(&s, SNAPSHOTS_WAITING) == 0.0 && metric(&s, SEGMENTS_WAITING) == 0.0
    });
    assert!(s.log_text().contains("missing in s3"), "{}", s.log_text());
    s.stop();
}

/// The full snapshots in the bucket and the delta segments, parsed.
fn s3_chain_parts(bucket: &Path) -> (Vec<String>, Vec<SegmentName>) {
    let names = files(bucket);
    let snaps =
        names.iter().filter(|f| f.starts_with("etcd-snapshot-") || f.starts_with("chain-base-")).cloned().collect();
    let segs = names.iter().filter_map(|f| SegmentName::parse(f)).collect();
    (snaps, segs)
}

/// Issue 26.1: segments closed while S3 refused them, then a stop (the in-memory queue of old
/// was lost there, and the follower went on after the local chain): after the restart S3 holds
/// the chain's snapshot and one unbroken chain after it, and a fresh node restores every write.
fn a_restart_while_s3_was_down_leaves_no_hole_in_the_s3_chain(v: EtcdVersion) {
    let mut s3 = S3Server::start();
    s3.create_bucket("snaps");
    s3.kill();
    let dd = DataDir::new(v);
    let mut flags = s3.server_flags("snaps");
    flags.extend([
        "--etcd-s3-timeout=5s".into(),
        "--etcd-disable-snapshots".into(),
        "--etcd-snapshot-delta-interval=1s".into(),
    ]);
    let s = dd.start(&strs(&flags));
    wait_logged(&s, "the chain's local snapshot", Duration::from_secs(60), || !bases_in(&dd.snapshots()).is_empty());
    for i in 0..10 {
        put(&dd, &[(&format!("/before/{i:02}"), &i.to_string())]);
    }
    let before = revision(&dd);
    wait_logged(&s, "a local segment with the writes", Duration::from_secs(60), || {
        segment_files(&dd.snapshots()).iter().filter_map(|f| SegmentName::parse(f)).any(|n| n.to >= before)
    });
    s.stop();

    s3.restart();
    let s = dd.start(&strs(&flags));
    wait_following(&s);
    for i in 0..10 {
        put(&dd, &[(&format!("/after/{i:02}"), &i.to_string())]);
    }
    let last = revision(&dd);
    let want = all_keys(&dd);
    wait_shipped(&s, last);
    wait_logged(&s, "nothing waiting", Duration::from_secs(30), || {
        metric(&s, SNAPSHOTS_WAITING) == 0.0 && metric(&s, SEGMENTS_WAITING) == 0.0
    });
    s.stop();

    let bucket = s3.root.join("snaps");
    let (snaps, segs) = s3_chain_parts(&bucket);
    assert!(!snaps.is_empty(), "the chain's snapshot never reached s3: {:?}", files(&bucket));
    let runs = chains("s3", &segs, &[], &Default::default());
    assert_eq!(runs.len(), 1, "one unbroken chain in s3: {runs:?}");
    let base =
        snaps.iter().map(|f| k3s_snapshot_core::revision::snapshot_revision(&bucket.join(f)).unwrap()).min().unwrap();
    let (_, reached) = chain_after(base, segs.first().and_then(|s| s.history), &segs, None, None);
    assert!(reached >= last, "the s3 chain after revision {base} reaches {reached}, short of {last}: {runs:?}");

    let token = dd.token().split_once("::server:").map(|(_, s)| s.to_string()).unwrap();
    let fresh = DataDir::new(v);
    let r = fresh.run(&strs(&restore_flags(&s3, &token, &["--cluster-reset-restore-deltas".into()])));
    assert_reset_done(&r, &fresh);
    let s = fresh.start(&["--etcd-disable-snapshots", &format!("--token={token}")]);
    assert_eq!(all_keys(&fresh), want, "every write, before and after the restart");
    s.stop();
}

/// Issue 26.2 and 27: a segment whose upload failed stays locally while it waits for S3, even
/// with chain retention of 1 s and new chains every 2 s (which would remove it otherwise); once S3
/// is back it and the later ones reach S3 (nothing dropped, no gap), and a restore of the newest
/// S3 snapshot with its chain has every write.
fn a_segment_waiting_for_s3_is_never_pruned_locally(v: EtcdVersion) {
    let mut s3 = S3Server::start();
    s3.create_bucket("snaps");
    let dd = DataDir::new(v);
    let mut flags = s3.server_flags("snaps");
    flags.extend([
        "--etcd-s3-timeout=5s".into(),
        "--etcd-snapshot-schedule-cron=@every 3s".into(),
        "--etcd-snapshot-retention=1".into(),
        "--etcd-snapshot-delta-interval=1s".into(),
        "--etcd-snapshot-delta-max-age=2s".into(),
        "--etcd-snapshot-delta-retention=1s".into(),
    ]);
    let s = dd.start(&strs(&flags));
    wait_following(&s);

    s3.kill();
    put(&dd, &[("/waiting-segment/a", "1")]);
    let written = revision(&dd);
    // The segment with the write is closed and its upload fails (S3 refuses).
    let mut failed = Vec::new();
    wait_logged(&s, "the segment with the write", Duration::from_secs(60), || {
        failed = segment_files(&dd.snapshots())
            .into_iter()
            .filter(|f| SegmentName::parse(f).is_some_and(|n| n.from <= written && n.to >= written))
            .collect();
        !failed.is_empty()
    });
    // New chains start (writes go on) and local retention runs after each: the failed segment
    // and the bases it follows are long past the 1 s of chain retention.
    let rotations = metric(&s, "k3s_snapshot_delta_chain_rotations_total ");
    let mut i = 0;
    wait_logged(&s, "two new chains while s3 is down", Duration::from_secs(60), || {
        i += 1;
        put(&dd, &[(&format!("/while-down/{i:04}"), "x")]);
        metric(&s, "k3s_snapshot_delta_chain_rotations_total ") >= rotations + 2.0
    });
    let local = segment_files(&dd.snapshots());
    assert!(
        failed.iter().all(|f| local.contains(f)),
        "a segment waiting for s3 was removed locally: {failed:?} {local:?}"
    );
    assert!(metric(&s, SEGMENTS_WAITING) >= 1.0);

    s3.restart();
    put(&dd, &[("/later/b", "2"), ("/later/c", "3")]);
    let last = revision(&dd);
    let want = all_keys(&dd);
    wait_logged(&s, "the later segments in s3", Duration::from_secs(90), || {
        metric(&s, "k3s_snapshot_delta_shipped_revision ") >= last as f64
    });
    wait_logged(&s, "the upload queue done", Duration::from_secs(60), || {
        metric(&s, SNAPSHOTS_WAITING) == 0.0 && metric(&s, SEGMENTS_WAITING) == 0.0
    });
    assert_eq!(metric(&s, SEGMENTS_DROPPED), 0.0, "nothing dropped");
    assert!(!s.log_text().contains("the chain in s3 has a gap"), "{}", s.log_text());
    let bucket = s3.root.join("snaps");
    let (_, segs) = s3_chain_parts(&bucket);
    assert!(segs.iter().any(|n| n.to >= last), "no segment reached the last write in s3: {segs:?}");
    s.stop();

    let token = dd.token().split_once("::server:").map(|(_, s)| s.to_string()).unwrap();
    let fresh = DataDir::new(v);
    let r = fresh.run(&strs(&restore_flags(&s3, &token, &["--cluster-reset-restore-deltas".into()])));
    assert_reset_done(&r, &fresh);
    let s = fresh.start(&["--etcd-disable-snapshots", &format!("--token={token}")]);
    assert_eq!(all_keys(&fresh), want, "the newest s3 snapshot and the chain after it hold every write");
    s.stop();
}
