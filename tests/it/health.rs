//! Keeping etcd healthy (issue 30) on real etcd 3.5.1 and 3.4.23: a fragmented db (tens of MiB
//! written, most of it deleted) shrunk by the scheduled defragmentation with every key kept; a
//! three-server cluster defragmenting one member at a time, the leader last, while a steady
//! writer sees no failed write; a member down holding every scheduled defragmentation back until
//! it is back; a small quota filled to NOSPACE that recovers by itself once keys
//! are deleted; and a db full of live data that says it cannot free enough and leaves the alarm.

use std::time::{Duration, Instant};

use etcd_client::{Client, DeleteOptions};
use k3s_snapshot_core::etcd::EtcdClientConfig;
use tests::support::bin;
use tests::support::etcd::EtcdVersion;
use tests::support::server::{all_keys, block_on, connect, wait_until, DataDir, Server};

tests::on_both_versions!(
    scheduled_defrag_shrinks_a_fragmented_db_and_keeps_every_key,
    three_servers_defragment_one_at_a_time_leader_last_and_no_write_fails,
    a_member_down_holds_scheduled_defragmentation_back_until_it_is_back,
    nospace_recovers_by_itself_once_keys_are_deleted,
    a_db_full_of_live_data_cannot_free_enough_and_keeps_the_alarm,
    compaction_never_passes_the_delta_followers_last_closed_segment,
);

const VALUE: usize = 256 << 10;

/// `count` keys `frag/NNNN` of 256 KiB each (incompressible enough: derived from the index).
async fn write_keys(c: &mut Client, prefix: &str, count: usize) {
    for i in 0..count {
        c.put(format!("{prefix}{i:04}"), value(i), None).await.unwrap();
    }
}

fn value(i: usize) -> Vec<u8> {
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..VALUE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn metric(s: &Server, name: &str) -> Option<f64> {
    let text =
        block_on(async { s.http().get(format!("{}/metrics", s.api())).send().await.unwrap().text().await.unwrap() });
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `k3s-snapshot etcd ARGS --data-dir D -o json`, parsed.
fn etcd_json(dd: &DataDir, args: &[&str]) -> serde_json::Value {
    let data_dir = dd.path().display().to_string();
    let r = bin::run(bin::cmd().arg("etcd").args(args).args(["--data-dir", &data_dir, "-o", "json"]));
    r.assert_ok();
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
}

fn db_size(dd: &DataDir) -> i64 {
    etcd_json(dd, &["status"])[0]["dbSize"].as_i64().unwrap()
}

fn scheduled_defrag_shrinks_a_fragmented_db_and_keeps_every_key(v: EtcdVersion) {
    let dd = DataDir::new(v);
    let s = dd.start(&[
        "--etcd-disable-snapshots",
        "--etcd-compaction-interval=1s",
        "--etcd-defrag-schedule=@every 2s",
        "--etcd-defrag-min-free-bytes=16Mi",
    ]);
    block_on(async {
        let mut c = connect(&dd).await.client;
        write_keys(&mut c, "frag/", 256).await; // 64 MiB
                                                // Keep one key in eight, delete the rest in one revision.
        for i in (0..256).filter(|i| i % 8 != 0) {
            c.delete(format!("frag/{i:04}"), None).await.unwrap();
        }
    });
    // A k3s cluster is never quiet (leases, events), and etcd refreshes its "in use" figure only
    // at a later commit: a small write every 200 ms, as the apiserver's lease renewals would.
    let _trickle = Trickle::start(&dd);
    let before = db_size(&dd);
    assert!(before > 60 << 20, "the fragmented db is {before} bytes");
    let kept = all_keys_raw(&dd);
    assert_eq!(kept.len(), 32);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(metric(&s, "k3s_snapshot_etcd_defrag_total").unwrap_or(0.0) >= 1.0 && db_size(&dd) < before / 3) {
        assert!(Instant::now() < deadline, "no scheduled defragmentation within 60s:\n{}", s.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = db_size(&dd);
    println!("etcd {}: scheduled defragmentation: db {before} bytes -> {after} bytes", v.label());
    assert_eq!(all_keys_raw(&dd), kept, "every key and value is kept");
    for (i, (k, val)) in kept.iter().enumerate() {
        assert_eq!((k.as_str(), val.as_slice()), (format!("frag/{:04}", i * 8).as_str(), value(i * 8).as_slice()));
    }
    assert!(s.log_text().contains("etcd history compacted"), "{}", s.log_text());
    assert!(metric(&s, "k3s_snapshot_etcd_db_size_bytes").is_some_and(|b| b < (before / 3) as f64));
    s.stop();
}

/// Writes `trickle` every 200 ms until dropped.
struct Trickle(std::sync::Arc<std::sync::atomic::AtomicBool>, Option<std::thread::JoinHandle<()>>);

impl Trickle {
    fn start(dd: &DataDir) -> Trickle {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (cfg, flag) = (dd.etcd_config(), stop.clone());
        let t = std::thread::spawn(move || {
            block_on(async {
                let mut c = cfg.connect().await.unwrap().client;
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = c.put("trickle", "x", None).await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        });
        Trickle(stop, Some(t))
    }
}

impl Drop for Trickle {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.1.take() {
            let _ = t.join();
        }
    }
}

fn all_keys_raw(dd: &DataDir) -> Vec<(String, Vec<u8>)> {
    block_on(async {
        let mut c = connect(dd).await.client;
        // Key by key: the values together are larger than a client's 4 MiB message limit.
        let r = c.get("frag/", Some(etcd_client::GetOptions::new().with_prefix().with_keys_only())).await.unwrap();
        let mut out = Vec::new();
        for kv in r.kvs() {
            let v = c.get(kv.key(), None).await.unwrap();
            out.push((kv.key_str().unwrap().to_string(), v.kvs()[0].value().to_vec()));
        }
        out
    })
}

/// A "etcd member defragmented" line of a server's log: (end time, duration, moved leadership).
fn defrag_events(s: &Server) -> Vec<(chrono::DateTime<chrono::FixedOffset>, Duration, bool)> {
    s.log_text()
        .lines()
        .filter(|l| l.contains("etcd member defragmented"))
        .map(|l| {
            let plain: String = strip_ansi(l);
            let at = chrono::DateTime::parse_from_rfc3339(plain.split_whitespace().next().unwrap()).unwrap();
            let ms: u64 = field(&plain, "duration_ms").parse().unwrap();
            (at, Duration::from_millis(ms), plain.contains("moved_leadership_to="))
        })
        .collect()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for c in s.chars() {
        match (esc, c) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

fn field<'a>(line: &'a str, name: &str) -> &'a str {
    let at = line.find(&format!("{name}=")).unwrap_or_else(|| panic!("no {name} in {line}"));
    line[at + name.len() + 1..].split_whitespace().next().unwrap()
}

/// Three servers on 127.0.0.1-3 compacting every second and defragmenting on `schedule` when
/// 16 MiB would be freed: the data dirs, the running servers, and the flags that (re)join one.
fn three_servers(v: EtcdVersion, schedule: &str) -> ([DataDir; 3], Vec<Server>, Vec<String>) {
    let n = [
        DataDir::on(v, "node-1", "127.0.0.1"),
        DataDir::on(v, "node-2", "127.0.0.2"),
        DataDir::on(v, "node-3", "127.0.0.3"),
    ];
    let flags = [
        "--etcd-disable-snapshots".to_string(),
        "--etcd-compaction-interval=1s".to_string(),
        format!("--etcd-defrag-schedule={schedule}"),
        "--etcd-defrag-min-free-bytes=16Mi".to_string(),
    ];
    let first: Vec<&str> = std::iter::once("--cluster-init").chain(flags.iter().map(String::as_str)).collect();
    let mut servers = vec![n[0].start(&first)];
    let token = n[0].token();
    let join: Vec<String> = DataDir::join_args(&n[0], &token).into_iter().chain(flags).collect();
    let args: Vec<&str> = join.iter().map(String::as_str).collect();
    for d in &n[1..] {
        servers.push(d.start(&args));
    }
    (n, servers, join)
}

fn three_servers_defragment_one_at_a_time_leader_last_and_no_write_fails(v: EtcdVersion) {
    let (n, servers, _) = three_servers(v, "@every 3s");
    let endpoints: Vec<String> = n.iter().map(|d| format!("https://{}:{}", d.ip, d.client_port)).collect();
    let all = n[0].etcd_config().with_endpoints(endpoints);
    let leader_before = leader_name(&n[0]);

    // A steady writer through all three members, from before the fragmentation to the end.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (all, stop) = (all.clone(), stop.clone());
        std::thread::spawn(move || block_on(steady_writer(all, stop)))
    };
    block_on(async {
        let mut c = connect(&n[0]).await.client;
        write_keys(&mut c, "frag/", 192).await; // 48 MiB on every member
        c.delete("frag/", Some(DeleteOptions::new().with_prefix())).await.unwrap();
    });
    let before: Vec<i64> = n.iter().map(db_size).collect();
    wait_until("every member defragmented", Duration::from_secs(120), || {
        servers.iter().all(|s| !defrag_events(s).is_empty())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (failures, latencies) = writer.join().unwrap();
    let after: Vec<i64> = n.iter().map(db_size).collect();

    // The first defragmentation of each member: none overlaps another, the leader's is last and
    // came after moving leadership away.
    let mut firsts: Vec<(usize, chrono::DateTime<chrono::FixedOffset>, Duration, bool)> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (end, took, moved) = defrag_events(s)[0];
            (i, end, took, moved)
        })
        .collect();
    firsts.sort_by_key(|f| f.1);
    for w in firsts.windows(2) {
        let start_of_next = w[1].1 - chrono::Duration::from_std(w[1].2).unwrap();
        assert!(start_of_next >= w[0].1, "defragmentations overlap: {firsts:?}");
    }
    let last = firsts.last().unwrap();
    assert_eq!(n[last.0].node, leader_before, "the leader goes last: {firsts:?}");
    assert!(last.3, "the leader moved leadership away first: {}", servers[last.0].log_text());
    assert!(firsts[..2].iter().all(|f| !f.3), "followers move no leadership: {firsts:?}");
    assert_ne!(leader_name(&n[0]), leader_before, "leadership moved");
    for (b, a) in before.iter().zip(&after) {
        assert!(*a < b / 3, "every member shrank: {before:?} -> {after:?}");
    }
    let mut sorted = latencies.clone();
    sorted.sort();
    let p99 = sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)];
    let max = sorted.last().copied().unwrap_or_default();
    println!(
        "etcd {}: rolling defragmentation: db {before:?} -> {after:?} bytes; steady writer: {} writes, {failures} failed, p99 {p99:?}, max {max:?}",
        v.label(),
        latencies.len()
    );
    assert_eq!(failures, 0, "no write fails during the rolling defragmentation");
    assert!(latencies.len() > 50, "the writer wrote throughout: {}", latencies.len());
    for s in servers.into_iter().rev() {
        s.stop();
    }
}

/// One member of three is down (its server stopped): the two live servers' scheduled
/// defragmentations find it unhealthy and skip, saying so, and leave their fragmented dbs as they
/// are. Once the member is back, the same schedule defragments every member: it was the member,
/// not the schedule or the threshold, that held them back.
fn a_member_down_holds_scheduled_defragmentation_back_until_it_is_back(v: EtcdVersion) {
    let (n, mut servers, join) = three_servers(v, "@every 2s");
    let args: Vec<&str> = join.iter().map(String::as_str).collect();
    servers.pop().unwrap().stop();
    block_on(async {
        let mut c = connect(&n[0]).await.client;
        write_keys(&mut c, "frag/", 160).await; // 40 MiB on each live member
        c.delete("frag/", Some(DeleteOptions::new().with_prefix())).await.unwrap();
    });
    let before: Vec<i64> = n[..2].iter().map(db_size).collect();
    let skipped = "scheduled defragmentation skipped: a member is unhealthy";
    // A write now and then: bbolt hands the pages a compaction freed back only at a later commit,
    // so without writes the freed space never shows (the rolling test has its steady writer).
    // A tick that fails (a proposal dropped while the cluster elects a leader after the stop) is
    // simply tried again at the next poll.
    let tick = |i: usize| {
        block_on(async {
            let _ = connect(&n[0]).await.client.put("tick", i.to_string(), None).await;
        });
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut i = 0;
    while !servers.iter().all(|s| s.log_text().contains(skipped)) {
        i += 1;
        tick(i);
        if Instant::now() > deadline {
            let lines: Vec<String> = servers
                .iter()
                .flat_map(|s| {
                    s.log_text()
                        .lines()
                        .filter(|l| l.contains("defrag") || l.contains("compact"))
                        .map(strip_ansi)
                        .collect::<Vec<_>>()
                })
                .collect();
            panic!("the live servers did not skip for the member that is down:\n{}", lines.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for (s, d) in servers.iter().zip(&n) {
        assert!(defrag_events(s).is_empty(), "{} defragmented with a member down:\n{}", d.node, s.log_text());
    }
    let held: Vec<i64> = n[..2].iter().map(db_size).collect();
    assert!(held.iter().zip(&before).all(|(h, b)| h >= b), "a db shrank with a member down: {before:?} -> {held:?}");

    servers.push(n[2].start(&args));
    wait_until("every member defragmented once the member was back", Duration::from_secs(120), || {
        i += 1;
        tick(i);
        servers[..2].iter().all(|s| !defrag_events(s).is_empty())
    });
    let after: Vec<i64> = n[..2].iter().map(db_size).collect();
    for (b, a) in before.iter().zip(&after) {
        assert!(*a < b / 3, "the live members shrank once the member was back: {before:?} -> {after:?}");
    }
    for s in servers.into_iter().rev() {
        s.stop();
    }
}

fn leader_name(dd: &DataDir) -> String {
    let st = etcd_json(dd, &["status"]);
    let m = st.as_array().unwrap().iter().find(|m| m["leader"].as_bool() == Some(true)).expect("a leader");
    m["name"].as_str().unwrap().to_string()
}

/// Puts a small key every 20 ms until `stop`; (failed writes, latency of each good one).
async fn steady_writer(
    cfg: EtcdClientConfig,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (usize, Vec<Duration>) {
    let mut c = cfg.connect().await.unwrap().client;
    let (mut failures, mut latencies) = (0, Vec::new());
    let mut i = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let t = Instant::now();
        match tokio::time::timeout(Duration::from_secs(10), c.put(format!("steady/{}", i % 100), i.to_string(), None))
            .await
        {
            Ok(Ok(_)) => latencies.push(t.elapsed()),
            Ok(Err(e)) => {
                eprintln!("steady write {i} failed: {e}");
                failures += 1
            }
            Err(_) => {
                eprintln!("steady write {i} timed out");
                failures += 1
            }
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (failures, latencies)
}

const QUOTA: &str = "--etcd-arg=quota-backend-bytes=33554432"; // 32 MiB

fn is_nospace(e: &etcd_client::Error) -> bool {
    e.to_string().contains("database space exceeded")
}

/// Writes 256 KiB keys until etcd refuses one with NOSPACE; returns how many it took.
fn fill_to_nospace(dd: &DataDir, prefix: &str) -> usize {
    block_on(async {
        let mut c = connect(dd).await.client;
        for i in 0..1000 {
            match c.put(format!("{prefix}{i:04}"), value(i), None).await {
                Ok(_) => {}
                Err(e) if is_nospace(&e) => return i,
                Err(e) => panic!("put {i}: {e}"),
            }
        }
        panic!("1000 puts of 256 KiB and no NOSPACE under a 32 MiB quota")
    })
}

fn alarms(dd: &DataDir) -> Vec<String> {
    let v = etcd_json(dd, &["alarm", "list"]);
    v.as_array().unwrap().iter().map(|a| a["alarm"].as_str().unwrap().to_string()).collect()
}

fn nospace_recovers_by_itself_once_keys_are_deleted(v: EtcdVersion) {
    let dd = DataDir::new(v);
    let s = dd.start(&["--etcd-disable-snapshots", "--etcd-compaction-interval=1s", QUOTA]);
    let written = fill_to_nospace(&dd, "fill/");
    assert!(written > 50, "{written}");
    wait_until("the NOSPACE alarm on /metrics", Duration::from_secs(30), || {
        metric(&s, "k3s_snapshot_etcd_alarm{alarm=\"NOSPACE\"}") == Some(1.0)
    });
    // Deletes are allowed under NOSPACE; nothing else is done by hand.
    block_on(async {
        connect(&dd).await.client.delete("fill/", Some(DeleteOptions::new().with_prefix())).await.unwrap();
    });
    let t = Instant::now();
    wait_until("a write accepted again", Duration::from_secs(60), || {
        block_on(async { connect(&dd).await.client.put("after", "ok", None).await.is_ok() })
    });
    println!("etcd {}: NOSPACE recovered {:?} after the deletes", v.label(), t.elapsed());
    assert!(alarms(&dd).is_empty());
    assert!(s.log_text().contains("NOSPACE disarmed"), "{}", s.log_text());
    assert!(metric(&s, "k3s_snapshot_etcd_defrag_total").unwrap() >= 1.0);
    // /metrics follows the member's status at the next poll.
    wait_until("NOSPACE gone from /metrics", Duration::from_secs(10), || {
        metric(&s, "k3s_snapshot_etcd_alarm{alarm=\"NOSPACE\"}") == Some(0.0)
    });
    assert_eq!(metric(&s, "k3s_snapshot_etcd_defrag_cannot_free"), Some(0.0));
    assert_eq!(all_keys(&dd), vec![("after".to_string(), "ok".to_string())]);
    s.stop();
}

fn a_db_full_of_live_data_cannot_free_enough_and_keeps_the_alarm(v: EtcdVersion) {
    let dd = DataDir::new(v);
    let s = dd.start(&["--etcd-disable-snapshots", "--etcd-compaction-interval=1s", QUOTA]);
    // Live data only. Whatever free pages a defragmentation can give back, the writes go on until
    // the live data alone holds the file over the quota.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut next = 0;
    while metric(&s, "k3s_snapshot_etcd_defrag_cannot_free") != Some(1.0) {
        assert!(Instant::now() < deadline, "no \"cannot free enough\" within 90s:\n{}", s.log_text());
        next += fill_to_nospace_from(&dd, next);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        s.log_text().contains("defragmentation cannot free enough") && s.log_text().contains("quota-backend-bytes"),
        "{}",
        s.log_text()
    );
    assert_eq!(alarms(&dd), ["NOSPACE"], "the alarm stays for the operator");
    assert_eq!(metric(&s, "k3s_snapshot_etcd_alarm{alarm=\"NOSPACE\"}"), Some(1.0));
    let err = block_on(async { connect(&dd).await.client.put("more", "x", None).await.unwrap_err() });
    assert!(is_nospace(&err), "{err}");
    s.stop();
}

/// Puts from key `from` on until NOSPACE (or a write fails with it at once); keys written.
fn fill_to_nospace_from(dd: &DataDir, from: usize) -> usize {
    block_on(async {
        let mut c = connect(dd).await.client;
        let mut i = from;
        loop {
            match c.put(format!("live/{i:04}"), value(i), None).await {
                Ok(_) => i += 1,
                Err(e) if is_nospace(&e) => return i - from,
                Err(e) => panic!("put {i}: {e}"),
            }
        }
    })
}

/// Compaction every second, segments closed every 4 s: without the cap the compaction would pass
/// the follower's position (and break its chain at the next watch restart).
fn compaction_never_passes_the_delta_followers_last_closed_segment(v: EtcdVersion) {
    let dd = DataDir::new(v);
    let s =
        dd.start(&["--etcd-disable-snapshots", "--etcd-compaction-interval=1s", "--etcd-snapshot-delta-interval=4s"]);
    let _trickle = Trickle::start(&dd);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut samples = 0;
    loop {
        let compacted = metric(&s, "k3s_snapshot_etcd_compacted_revision").unwrap();
        let shipped = metric(&s, "k3s_snapshot_delta_shipped_revision").unwrap();
        assert!(compacted <= shipped, "compacted to {compacted}, past the follower's {shipped}:\n{}", s.log_text());
        samples += 1;
        if compacted > 10.0 && samples > 40 && s.log_text().contains("etcd compaction held back") {
            break;
        }
        assert!(Instant::now() < deadline, "no compaction within 60s:\n{}", s.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(metric(&s, "k3s_snapshot_delta_chain_breaks_total"), Some(0.0), "{}", s.log_text());
    s.stop();
}
