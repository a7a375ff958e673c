//! Bounded delta chains (issue 27), on etcd 3.5.1 and 3.4.23: a chain past
//! `--etcd-snapshot-delta-max-revisions` or `--etcd-snapshot-delta-max-age` gets a new full
//! snapshot (`chain-base-…`) and a new chain starts after it (`ls` shows both with the revisions a
//! restore replays, and a restore still gets every write); chain bases and the cron's snapshots do
//! not take each other's retention slots; `--etcd-snapshot-delta-retention` prunes old chains
//! locally and in S3 but keeps what a restore to any time of its window needs; `/metrics` shows
//! the newest chain's length.

use std::path::Path;
use std::time::Duration;

use k3s_snapshot_core::delta::{chain_after, SegmentName};
use tests::support::bin;
use tests::support::etcd::EtcdVersion;
use tests::support::s3::S3Server;
use tests::support::server::{all_keys, assert_reset_done, block_on, connect, files, put, wait_until, DataDir, Server};

use crate::deltas::{metric, restore_flags, revision, shipping_flags, strs, wait_following, wait_shipped};

tests::on_both_versions!(
    a_chain_past_max_revisions_gets_a_new_base_and_restores_whole,
    a_chain_past_max_age_gets_a_new_base_and_restores_whole,
    chain_bases_and_cron_snapshots_keep_their_own_retention,
    delta_retention_prunes_old_chains_but_keeps_the_window_restorable,
    metrics_show_the_newest_chain_length,
);

const ROTATIONS: &str = "k3s_snapshot_delta_chain_rotations_total ";

/// The chain bases in `dir`, oldest first (names end with their unix seconds).
fn bases_in(dir: &Path) -> Vec<String> {
    // Only whole snapshots: a save in progress shows as a `.part` that is no snapshot name.
    let mut b: Vec<String> = files(dir)
        .into_iter()
        .filter(|f| f.starts_with("chain-base-") && k3s_snapshot_core::name::parse(f).is_some())
        .collect();
    b.sort_by_key(|f| taken(f));
    b
}

fn taken(file: &str) -> i64 {
    k3s_snapshot_core::name::parse(file).unwrap().timestamp
}

fn segments_in(dir: &Path) -> Vec<SegmentName> {
    files(dir).iter().filter_map(|f| SegmentName::parse(f)).collect()
}

/// A snapshot's revision as its metadata document records it (in a snapshot dir's sibling
/// `.metadata`, or in the bucket's); an empty keyspace is recorded as 0, and etcd starts at 1.
fn recorded_revision(metadata_dir: &Path, file: &str) -> i64 {
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(metadata_dir.join(file)).unwrap()).unwrap();
    doc["etcdRevision"].as_str().unwrap().parse::<i64>().unwrap().max(1)
}

/// Puts `n` keys `<prefix><i>` through one connection.
fn put_many(dd: &DataDir, prefix: &str, n: usize) {
    block_on(async {
        let mut c = connect(dd).await;
        for i in 0..n {
            c.client.put(format!("{prefix}{i:05}"), i.to_string(), None).await.unwrap();
        }
    })
}

/// Writes one key per poll until `cond` holds (writes spread over time for an age bound).
fn write_until(s: &Server, dd: &DataDir, prefix: &str, what: &str, mut cond: impl FnMut() -> bool) -> usize {
    let mut i = 0;
    wait_until(what, Duration::from_secs(90), || {
        put(dd, &[(&format!("{prefix}{i:05}"), "v")]);
        i += 1;
        let done = cond();
        if !done && s.log_text().contains("panicked") {
            panic!("{}", s.log_text());
        }
        done
    });
    i
}

/// `etcd-snapshot ls` of `dd` with S3: the delta chain lines of `location` ("file" or "s3").
fn chain_lines(dd: &DataDir, s3: &S3Server, location: &str) -> Vec<String> {
    let mut c = bin::cmd();
    c.args(["etcd-snapshot", "ls"]).arg(format!("--data-dir={}", dd.path().display()));
    c.args(s3.server_flags("snaps"));
    let ls = bin::run(&mut c);
    ls.assert_ok();
    ls.stdout.lines().filter(|l| l.starts_with(&format!("Delta chain in {location}"))).map(str::to_string).collect()
}

/// "N revisions to replay after BASE" of an `ls` chain line.
fn replayed(line: &str) -> (i64, String) {
    let (_, rest) = line.split_once(", ").unwrap();
    let (n, rest) = rest.split_once(" revisions to replay after ").unwrap_or_else(|| panic!("no base: {line}"));
    (n.parse().unwrap(), rest.split(',').next().unwrap().to_string())
}

/// After a new chain started: two chain bases locally and in S3, segments after the newer one,
/// `ls` shows each chain with the revisions a restore replays from its base; then a fresh node
/// restores `latest` with the deltas from S3 and gets every key back.
fn two_chains_then_restore(v: EtcdVersion, s3: &S3Server, dd: &DataDir, s: Server) {
    put_many(dd, "/after-new-chain/k", 20);
    let last = revision(dd);
    let want = all_keys(dd);
    wait_shipped(&s, last);
    let bucket = s3.root.join("snaps");
    wait_until("the chain bases in s3", Duration::from_secs(60), || {
        metric(&s, "k3s_snapshot_upload_queue_waiting{kind=\"snapshot\"}") == 0.0 && bases_in(&bucket).len() >= 2
    });

    // Writes stopped: a base taken after them (an age bound due) has no chain; the newest base
    // before the last write has the chain with the writes since.
    let snapshots = dd.snapshots();
    for (location, dir, md) in
        [("file", &snapshots, dd.db().join(".metadata")), ("s3", &bucket, bucket.join(".metadata"))]
    {
        let bases: Vec<(String, i64)> =
            bases_in(dir).into_iter().map(|b| (b.clone(), recorded_revision(&md, &b))).collect();
        assert!(bases.len() >= 2, "{location}: {:?}", files(dir));
        let (newest, newest_rev) = bases.iter().rev().find(|(_, r)| *r < last).unwrap().clone();
        let segs = segments_in(dir);
        // A segment may have been open while the base was taken: it then starts before the base.
        assert!(segs.iter().any(|x| x.to > newest_rev), "{location}: no segment after the new base: {segs:?}");
        let (_, reached) = chain_after(newest_rev, None, &segs, None, None);
        assert_eq!(reached, last, "{location}: the new chain reaches the last write");

        let lines = chain_lines(dd, s3, location);
        assert!(lines.len() >= 2, "two chains in {location}: {lines:?}");
        let counts: Vec<(i64, String)> = lines.iter().map(|l| replayed(l)).collect();
        assert!(counts.iter().all(|(n, b)| *n > 0 && b.starts_with("chain-base-")), "{counts:?}");
        assert_eq!(counts.last().unwrap(), &(last - newest_rev, newest), "the newest chain's revisions: {lines:?}");
    }
    s.stop();

    let token = dd.token().split_once("::server:").map(|(_, s)| s.to_string()).unwrap();
    let fresh = DataDir::new(v);
    let r = fresh.run(&strs(&restore_flags(s3, &token, &["--cluster-reset-restore-deltas".into()])));
    assert_reset_done(&r, &fresh);
    assert!(r.stderr.contains("chain-base-"), "the restore starts from the newest chain base:\n{}", r.stderr);
    let s = fresh.start(&["--etcd-disable-snapshots", &format!("--token={token}")]);
    assert_eq!(all_keys(&fresh), want, "every key, from the new base and its chain");
    s.stop();
}

fn start(v: EtcdVersion, extra: &[&str]) -> (S3Server, DataDir, Server) {
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let dd = DataDir::new(v);
    let mut flags = shipping_flags(&s3);
    // A schedule in `extra` turns scheduled snapshots back on.
    if extra.iter().any(|f| f.starts_with("--etcd-snapshot-schedule-cron")) {
        flags.retain(|f| f != "--etcd-disable-snapshots");
    }
    flags.extend(extra.iter().map(|f| f.to_string()));
    let s = dd.start(&strs(&flags));
    wait_following(&s);
    (s3, dd, s)
}

fn a_chain_past_max_revisions_gets_a_new_base_and_restores_whole(v: EtcdVersion) {
    let (s3, dd, s) = start(v, &["--etcd-snapshot-delta-max-revisions=200"]);
    let first = bases_in(&dd.snapshots());
    assert_eq!(first.len(), 1, "the first chain's base: {:?}", files(&dd.snapshots()));
    let first_rev = recorded_revision(&dd.db().join(".metadata"), &first[0]);
    put_many(&dd, "/k", 150);
    let at_150 = revision(&dd);
    wait_shipped(&s, at_150);
    assert_eq!(metric(&s, ROTATIONS), 0.0, "150 revisions are within the bound");
    put_many(&dd, "/more/k", 100);
    wait_until("a new chain after 200 revisions", Duration::from_secs(60), || metric(&s, ROTATIONS) >= 1.0);
    let bases = bases_in(&dd.snapshots());
    assert_eq!(bases.len(), 2, "{bases:?}");
    let second_rev = recorded_revision(&dd.db().join(".metadata"), &bases[1]);
    assert!(second_rev - first_rev > 200, "the new base comes after more than 200 revisions: {first_rev} {second_rev}");
    assert!(s.log_text().contains("past --etcd-snapshot-delta-max-revisions"), "{}", s.log_text());
    two_chains_then_restore(v, &s3, &dd, s);
}

fn a_chain_past_max_age_gets_a_new_base_and_restores_whole(v: EtcdVersion) {
    let (s3, dd, s) = start(v, &["--etcd-snapshot-delta-max-age=3s"]);
    let first = bases_in(&dd.snapshots());
    assert_eq!(first.len(), 1, "{:?}", files(&dd.snapshots()));
    write_until(&s, &dd, "/aging/k", "a new chain after 3 s", || metric(&s, ROTATIONS) >= 1.0);
    let bases = bases_in(&dd.snapshots());
    assert!(bases.len() >= 2, "{bases:?}");
    let age = taken(&bases[1]) - taken(&bases[0]);
    assert!(age >= 3, "the second base comes at least 3 s after the first: {bases:?}");
    let md = dd.db().join(".metadata");
    let revisions = recorded_revision(&md, &bases[1]) - recorded_revision(&md, &bases[0]);
    assert!(revisions < 1_000_000, "the age, not the revisions, started it: {revisions}");
    two_chains_then_restore(v, &s3, &dd, s);
}

fn chain_bases_and_cron_snapshots_keep_their_own_retention(v: EtcdVersion) {
    let (s3, dd, s) = start(
        v,
        &[
            "--etcd-snapshot-delta-max-revisions=30",
            "--etcd-snapshot-schedule-cron=@every 2s",
            "--etcd-snapshot-retention=1",
            "--etcd-s3-retention=1",
        ],
    );
    let bucket = s3.root.join("snaps");
    let cron = |dir: &Path| -> Vec<String> {
        files(dir).into_iter().filter(|f| f.starts_with("etcd-snapshot-") && !f.ends_with(".part")).collect()
    };
    // Writes start new chains; the cron takes a snapshot every 2 s.
    write_until(&s, &dd, "/k", "three chain bases and three cron snapshots", || {
        metric(&s, "k3s_snapshot_scheduled_taken_total{store=\"local\"}") >= 3.0 && bases_in(&bucket).len() >= 3
    });
    wait_until("the newest cron snapshot in s3", Duration::from_secs(60), || !cron(&bucket).is_empty());
    let local_bases = bases_in(&dd.snapshots());
    assert!(local_bases.len() >= 3, "cron retention 1 left the chain bases alone: {:?}", files(&dd.snapshots()));
    // Retention runs after each cron snapshot and after each upload of one: settled, one is kept.
    wait_until("local cron retention to keep 1", Duration::from_secs(30), || cron(&dd.snapshots()).len() == 1);
    wait_until("s3 cron retention to keep 1", Duration::from_secs(30), || cron(&bucket).len() == 1);
    assert!(bases_in(&bucket).len() >= 3, "s3 retention 1 left the chain bases alone: {:?}", files(&bucket));
    assert!(s.log_text().contains("pruned snapshot"), "cron retention ran: {}", s.log_text());
    assert!(
        !s.log_text().lines().any(|l| l.contains("pruned snapshot") && l.contains("chain-base-")),
        "cron retention pruned a chain base: {}",
        s.log_text()
    );
    s.stop();
}

fn delta_retention_prunes_old_chains_but_keeps_the_window_restorable(v: EtcdVersion) {
    const RETENTION: i64 = 4;
    let retention = format!("--etcd-snapshot-delta-retention={RETENTION}s");
    let (s3, dd, s) = start(v, &["--etcd-snapshot-delta-max-age=2s", &retention]);
    let first = bases_in(&dd.snapshots());
    assert_eq!(first.len(), 1);
    // Each chain's segments as seen on every poll: those that closed from its base's second up to
    // its successor's. Every chain is followed, not only the first: on a loaded machine the
    // first chain may end before any write reaches it, and a poll may come late.
    let mut chains = std::collections::BTreeMap::<String, Vec<String>>::new();
    let bucket = s3.root.join("snaps");
    let gone = |base: &String| !files(&dd.snapshots()).contains(base) && !files(&bucket).contains(base);
    // Writes (one per poll, each acknowledged at a known time) while chains rotate every 2 s,
    // until a chain that had segments is gone locally and in S3.
    let mut acked: Vec<(String, std::time::SystemTime)> = Vec::new();
    wait_until("a chain with segments pruned locally and in s3", Duration::from_secs(120), || {
        let key = format!("/w/{:06}", acked.len());
        put(&dd, &[(&key, "v")]);
        acked.push((key, std::time::SystemTime::now()));
        let names = files(&dd.snapshots());
        for pair in bases_in(&dd.snapshots()).windows(2) {
            let (from, cut) = (taken(&pair[0]), taken(&pair[1]));
            let segs = chains.entry(pair[0].clone()).or_default();
            for f in &names {
                if SegmentName::parse(f).is_some_and(|x| x.closed >= from && x.closed < cut) && !segs.contains(f) {
                    segs.push(f.clone());
                }
            }
        }
        chains.iter().any(|(base, segs)| !segs.is_empty() && gone(base))
    });
    // Pruning goes oldest first: the first base is gone too.
    assert!(gone(&first[0]), "the first base is pruned before a later one");
    let pruned_segments: Vec<String> =
        chains.iter().filter(|(base, _)| gone(base)).flat_map(|(_, segs)| segs.clone()).collect();
    // Writes stop; nothing changes any more (an age bound needs a change), so what is kept now
    // stays. Let the last writes reach S3.
    let last = revision(&dd);
    wait_shipped(&s, last);
    assert!(!pruned_segments.is_empty(), "a pruned chain had segments");
    let now = chrono::Utc::now().timestamp();
    for (dir, md) in [(dd.snapshots(), dd.db().join(".metadata")), (bucket.clone(), bucket.join(".metadata"))] {
        let names = files(&dir);
        assert!(!names.contains(&first[0]), "{}: the first base is pruned", dir.display());
        assert!(!md.join(&first[0]).exists(), "{}: its metadata too", dir.display());
        assert!(
            pruned_segments.iter().all(|f| !names.contains(f)),
            "{}: the pruned chains' segments are pruned too",
            dir.display()
        );
        // The boundary rule: a base taken before the window's start is kept, and from it a
        // contiguous chain reaches the last write.
        let bases = bases_in(&dir);
        let anchor = bases.iter().rev().find(|b| taken(b) < now - RETENTION);
        let Some(anchor) = anchor else { panic!("{}: no base before {}: {bases:?}", dir.display(), now - RETENTION) };
        let (_, reached) = chain_after(recorded_revision(&md, anchor), None, &segments_in(&dir), None, None);
        assert_eq!(reached, last, "{}: the chain from {anchor} is whole: {names:?}", dir.display());
    }

    // A restore to the window's start finds a base and its chain in S3: every write
    // acknowledged well before that time (an interval and a second) is back, none after it.
    let target = now - RETENTION;
    s.stop();
    let token = dd.token().split_once("::server:").map(|(_, s)| s.to_string()).unwrap();
    let at = chrono::DateTime::from_timestamp(target, 0).unwrap().to_rfc3339();
    let fresh = DataDir::new(v);
    let r = fresh.run(&strs(&restore_flags(&s3, &token, &[format!("--cluster-reset-restore-to-time={at}")])));
    assert_reset_done(&r, &fresh);
    let s = fresh.start(&["--etcd-disable-snapshots", &format!("--token={token}")]);
    let got: Vec<String> = all_keys(&fresh).into_iter().map(|(k, _)| k).filter(|k| k.starts_with("/w/")).collect();
    let secs = |t: &std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let must: Vec<&String> = acked.iter().filter(|(_, t)| secs(t) < (target - 2) as f64).map(|(k, _)| k).collect();
    assert!(!must.is_empty());
    for k in must {
        assert!(got.contains(k), "{k}, acknowledged before {at} less 2 s, is missing");
    }
    for k in &got {
        let (_, t) = acked.iter().find(|(a, _)| a == k).unwrap();
        assert!(secs(t) - 1.0 < target as f64, "{k} was written after {at}");
    }
    s.stop();
}

fn metrics_show_the_newest_chain_length(v: EtcdVersion) {
    let dd = DataDir::new(v);
    let s = dd.start(&[
        "--etcd-disable-snapshots",
        "--etcd-snapshot-delta-interval=1s",
        "--etcd-snapshot-delta-max-revisions=100",
    ]);
    wait_following(&s);
    let text =
        || block_on(async { s.http().get(format!("{}/metrics", s.api())).send().await.unwrap().text().await.unwrap() });
    for (name, kind) in [
        ("k3s_snapshot_delta_chain_revisions", "gauge"),
        ("k3s_snapshot_delta_chain_bytes", "gauge"),
        ("k3s_snapshot_delta_chain_max_revisions", "gauge"),
        ("k3s_snapshot_delta_chain_max_age_seconds", "gauge"),
        ("k3s_snapshot_delta_chain_rotations_total", "counter"),
    ] {
        let t = text();
        assert!(t.contains(&format!("# HELP {name} ")), "{t}");
        assert!(t.contains(&format!("# TYPE {name} {kind}\n")), "{t}");
    }
    assert_eq!(metric(&s, "k3s_snapshot_delta_chain_max_revisions "), 100.0);
    assert_eq!(metric(&s, "k3s_snapshot_delta_chain_max_age_seconds "), 3600.0);

    // The chain's length is what was shipped since its base.
    let check = |what: &str| {
        let base = bases_in(&dd.snapshots()).pop().unwrap();
        let base_rev = recorded_revision(&dd.db().join(".metadata"), &base);
        let last = revision(&dd);
        wait_shipped(&s, last);
        let shipped = metric(&s, "k3s_snapshot_delta_shipped_revision ") as i64;
        let revisions = metric(&s, "k3s_snapshot_delta_chain_revisions ") as i64;
        assert_eq!(revisions, shipped - base_rev, "{what}: shipped {shipped}, base {base} at {base_rev}");
        let bytes: u64 = segments_in(&dd.snapshots())
            .iter()
            .filter(|x| x.to > base_rev)
            .map(|x| std::fs::metadata(dd.snapshots().join(&x.file)).unwrap().len())
            .sum();
        assert!(bytes > 0);
        assert_eq!(metric(&s, "k3s_snapshot_delta_chain_bytes ") as u64, bytes, "{what}");
        revisions
    };
    put_many(&dd, "/k", 40);
    assert_eq!(check("the first chain"), 40);
    put_many(&dd, "/more/k", 80);
    wait_until("a new chain after 100 revisions", Duration::from_secs(60), || metric(&s, ROTATIONS) >= 1.0);
    put_many(&dd, "/last/k", 10);
    let n = check("the new chain");
    assert!((10..100).contains(&n), "the new chain counts from its base: {n}");
    s.stop();
}
