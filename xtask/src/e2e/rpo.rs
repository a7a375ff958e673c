//! `rpo`: continuous backup's recovery point. Three servers ship delta segments to S3 every
//! [`INTERVAL`] while `loadgen` writes at a steady rate (1 KiB puts, every tenth operation a delete
//! of an earlier key). Near the end the link to S3 is throttled to a trickle, so that segments
//! close and their uploads hang; all three servers are killed with `-9` mid-upload (and
//! mid-stream). They are started again on their data dirs with S3 back: the upload queue must
//! find what never reached S3 and upload it, and the followers ship what the open segments lost.
//! Then all three are killed and their data dirs deleted; a fresh node with only the S3 settings
//! and the token restores `latest` with the deltas. The restored keyspace must be exactly the
//! history up to some revision (values, revisions and deletes), hold every write acknowledged
//! [`INTERVAL`] × 2 before the loss, and the RPO (last acknowledgement before the loss minus the
//! acknowledgement of the newest write restored) must be at most that. A second fresh node
//! restores `latest` with `--cluster-reset-restore-to-time` at a whole second late in the load: nothing sent after that time may be there, and everything acknowledged
//! [`INTERVAL`] × 2 (plus the second that segment names round to) before it must be. Once at 1,000
//! and once at 5,000 writes/s.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use super::net::tick;
use super::node::{files, kill_and_wait, s3_flags, tail, wait_until, Node, Server, RESET_DONE, S3_SECRET_KEY};
use super::scenarios::{join, strings};
use super::{Ctx, Etcd, Rng};
use crate::child::KillOnDrop;

const INTERVAL: Duration = Duration::from_secs(2);
/// Writes run this long (plus up to one interval, from `--seed`) before the kill.
const LOAD: Duration = Duration::from_secs(8);
pub const RATES: [u32; 2] = [1000, 5000];
const CHAIN_STARTED: &str = "a new chain starts after this full snapshot";

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or_default()
}

pub fn rpo(ctx: &Ctx, etcd: &Etcd, dir: &Path) -> Result<String> {
    let seed = ctx.seed ^ etcd.label.bytes().fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    let mut rng = Rng::new(seed);
    let mut notes = Vec::new();
    for &rate in &ctx.rpo_rates {
        let note = at_rate(ctx, etcd, &dir.join(format!("rate-{rate}")), rate, &mut rng)
            .with_context(|| format!("at {rate} writes/s"))?;
        println!("e2e:   rpo on etcd {} at {rate}/s: {note}", etcd.label);
        notes.push(note);
    }
    Ok(notes.join("; "))
}

fn json(text: &str, what: &str) -> Result<Value> {
    let line = text.lines().rev().find(|l| l.starts_with('{')).unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("{what} printed no JSON summary: {}", tail(text, 4)))
}

fn at_rate(ctx: &Ctx, etcd: &Etcd, dir: &Path, rate: u32, rng: &mut Rng) -> Result<String> {
    let nodes = ctx.nodes(dir, etcd);
    let bucket = format!("rpo-{}-{rate}", etcd.short());
    ctx.s3.create_bucket(&bucket)?;
    let s3 = s3_flags(&bucket, "30s");
    let mut flags = s3.clone();
    flags.extend(strings(&[
        "--etcd-disable-snapshots",
        &format!("--etcd-snapshot-delta-interval={}s", INTERVAL.as_secs()),
    ]));

    // The cluster; each server follows once its chain's full snapshot is taken.
    let mut servers: Vec<Server> = vec![nodes[0].start(&[strings(&["--cluster-init"]), flags.clone()].concat())?];
    let token = nodes[0].token()?;
    for n in &nodes[1..] {
        servers.push(join(n, &nodes[0], &token, &flags)?);
    }
    for s in &mut servers {
        s.wait_for_log(CHAIN_STARTED, Duration::from_secs(60))?;
    }
    let members = nodes[0].member_count()?;
    ensure!(members == 3, "{members} etcd members, want 3");

    // Writes at `rate` through all three; the kill comes mid-stream, at a moment from --seed.
    let log = dir.join("ops.log");
    let endpoints: Vec<String> = nodes.iter().map(|n| format!("https://{}:2379", n.ip)).collect();
    let load_out = dir.join("loadgen-put.out");
    let mut load = KillOnDrop(
        Command::new(&ctx.loadgen)
            .args(["put", "--endpoints", &endpoints.join(","), "--tls-dir"])
            .arg(nodes[0].data().join("server/tls/etcd"))
            .args(["--rate", &rate.to_string(), "--duration", "120", "--window", "256", "--prefix", "/rpo/"])
            .args(["--value-bytes", "1024", "--delete-every", "10", "--give-up", "2", "--log"])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&load_out)?)
            .stderr(std::fs::File::create(dir.join("loadgen-put.err"))?)
            .spawn()
            .context("start loadgen")?,
    );
    let started = Instant::now();
    let kill_after = LOAD + rng.duration_upto(INTERVAL);
    // The point-in-time target: a whole second three quarters into the load (so that what was
    // acknowledged the window before it is a good part of the load).
    let mut pit_s = None;
    // The link to S3 slowed to a trickle one and a half intervals before the kill, so that
    // segments close and their uploads hang when the servers are killed.
    let throttle_at = kill_after - INTERVAL * 3 / 2;
    let mut throttled = false;
    let mut stuck = Vec::new();
    let result = (|| -> Result<()> {
        while started.elapsed() < kill_after || stuck.is_empty() {
            if let Some(st) = load.0.try_wait()? {
                bail!(
                    "loadgen exited ({st}) before the kill: {}",
                    tail(&std::fs::read_to_string(dir.join("loadgen-put.err")).unwrap_or_default(), 4)
                );
            }
            if pit_s.is_none() && started.elapsed() >= LOAD * 3 / 4 {
                pit_s = Some(now_ns() / 1_000_000_000 + 1);
            }
            if !throttled && started.elapsed() >= throttle_at {
                ctx.net.throttle("objstore", "64kbit")?;
                throttled = true;
            }
            if started.elapsed() >= kill_after {
                stuck = not_in_s3(ctx, &nodes, &bucket);
                ensure!(
                    started.elapsed() < kill_after + INTERVAL * 3,
                    "no segment waited for its upload {}s after S3 was throttled",
                    (INTERVAL * 9 / 2).as_secs()
                );
            }
            tick(Duration::from_millis(50))?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = ctx.net.unthrottle("objstore");
    }
    result?;
    let pit_s = pit_s.context("the load ended before its middle")?;
    // Every process of all three nodes at once: servers (the followers) and their etcds.
    let pids: Vec<u32> = nodes.iter().flat_map(Node::leftover_pids).collect();
    let loss_ns = now_ns();
    kill_and_wait(&pids);
    drop(servers);
    let gone = Instant::now();
    let status = loop {
        if let Some(st) = load.0.try_wait()? {
            break st;
        }
        if gone.elapsed() > Duration::from_secs(60) {
            let _ = load.0.kill();
            bail!("loadgen did not stop within 60s of the kill");
        }
        tick(Duration::from_millis(50))?;
    };
    ensure!(status.success(), "loadgen failed ({status}): {}", std::fs::read_to_string(dir.join("loadgen-put.err"))?);
    ctx.net.unthrottle("objstore")?;
    let put = json(&std::fs::read_to_string(&load_out)?, "loadgen put")?;
    ensure!(put["empty_deletes"] == 0, "a delete of an acknowledged put found no key while the cluster ran: {put}");

    // Killed mid-upload: started again on their data dirs with S3 back, the servers upload what
    // never reached it, and the followers ship again what their open segments lost.
    let mut again = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let mut f = if i == 0 {
            strings(&["--cluster-init"])
        } else {
            strings(&[&format!("--server={}", nodes[0].url()), &format!("--token={token}")])
        };
        f.extend(flags.iter().cloned());
        again.push(n.spawn(&f)?);
    }
    for s in &mut again {
        s.wait_for_log(super::node::RUNNING, Duration::from_secs(120))?;
    }
    let max_rev = put["max_rev"].as_i64().context("loadgen put reported no max_rev")?;
    wait_until("every segment and snapshot left local at the kill to reach S3", Duration::from_secs(120), || {
        let shipped =
            nodes.iter().all(|n| files(&n.snapshots()).iter().filter_map(|f| segment_end(f)).any(|to| to >= max_rev));
        Ok(shipped && not_in_s3(ctx, &nodes, &bucket).is_empty())
    })
    .with_context(|| {
        format!(
            "after the restart (stuck at the kill: {stuck:?}); still not in S3: {:?}",
            not_in_s3(ctx, &nodes, &bucket)
        )
    })?;
    let pids: Vec<u32> = nodes.iter().flat_map(Node::leftover_pids).collect();
    kill_and_wait(&pids);
    drop(again);

    // Everything on the three nodes is gone; a new node knows the S3 settings and the token.
    let secret = token.split_once("::server:").map(|(_, s)| s.to_string()).unwrap_or(token.clone());
    for n in &nodes {
        std::fs::remove_dir_all(n.data()).with_context(|| format!("delete {}", n.data().display()))?;
    }
    let fresh = Node { dir: dir.join("fresh"), ..nodes[0].clone() };
    let mut reset = s3.clone();
    reset.extend(strings(&[
        &format!("--token={secret}"),
        "--cluster-reset",
        "--cluster-reset-restore-path=latest",
        "--cluster-reset-restore-deltas",
    ]));
    let t = Instant::now();
    let out = fresh.run_server(&reset, Duration::from_secs(300))?;
    let reset_secs = t.elapsed().as_secs_f64();
    ensure!(out.ok() && out.stderr.contains(RESET_DONE), "the restore from S3 failed ({})", out.describe());
    ensure!(
        out.stderr.contains("replayed the delta segments into the restored db"),
        "the restore did not replay the delta segments natively (into the restored db): {}",
        tail(&out.stderr, 6)
    );
    ensure!(!out.stderr.contains(S3_SECRET_KEY), "the S3 secret key appears in the reset's output");
    let segments = out
        .stderr
        .lines()
        .find(|l| l.contains("delta segments to replay"))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("segments=")))
        .unwrap_or("?")
        .to_string();
    let server = fresh.start(&strings(&["--etcd-disable-snapshots", &format!("--token={secret}")]))?;
    let serving_secs = t.elapsed().as_secs_f64();

    let window = INTERVAL * 2;
    let checked = super::node::run(
        Command::new(&ctx.loadgen)
            .args(["check", "--endpoints", &format!("https://{}:2379", fresh.ip), "--tls-dir"])
            .arg(fresh.data().join("server/tls/etcd"))
            .arg("--log")
            .arg(&log)
            .args(["--loss-unix-ns", &loss_ns.to_string(), "--window-ms", &window.as_millis().to_string()]),
        Duration::from_secs(120),
        "loadgen check",
    )?
    .check("loadgen check")?;
    std::fs::write(dir.join("loadgen-check.out"), &checked.stdout)?;
    let c = json(&checked.stdout, "loadgen check")?;
    server.stop()?;
    ensure!(c["violation_count"] == 0, "the restored keyspace is wrong: {}", c["violations"]);
    let rpo_s = c["rpo_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0;
    let note = format!(
        "achieved {:.0}/s (target {rate}, p50 {:.1} ms, p99 {:.1} ms), {} acked ({} deletes), kill after {:.1}s; RPO {rpo_s:.2}s (bound {}s; revision {} of {}), {} required writes all back ({} deletes applied, {} in-flight puts present); reset {reset_secs:.1}s ({segments} segments), serving after {serving_secs:.1}s",
        put["achieved_rate"].as_f64().unwrap_or(0.0),
        put["p50_ms"].as_f64().unwrap_or(f64::NAN),
        put["p99_ms"].as_f64().unwrap_or(f64::NAN),
        put["acked"],
        put["deletes_acked"],
        kill_after.as_secs_f64(),
        window.as_secs(),
        c["visible_rev"],
        put["max_rev"],
        c["required"],
        c["deletes_applied"],
        c["unacked_present"],
    );
    ensure!(rpo_s <= window.as_secs_f64(), "RPO {rpo_s:.2}s is above 2 × the interval ({}s): {note}", window.as_secs());

    // Back to a point in time in the middle of the load.
    let at = chrono::DateTime::from_timestamp(pit_s as i64, 0).context("the point in time")?.to_rfc3339();
    let pitr = Node { dir: dir.join("fresh-pitr"), ..nodes[0].clone() };
    let mut reset = s3.clone();
    reset.extend(strings(&[
        &format!("--token={secret}"),
        "--cluster-reset",
        "--cluster-reset-restore-path=latest",
        &format!("--cluster-reset-restore-to-time={at}"),
    ]));
    let out = pitr.run_server(&reset, Duration::from_secs(300))?;
    ensure!(out.ok() && out.stderr.contains(RESET_DONE), "the restore to {at} failed ({})", out.describe());
    let server = pitr.start(&strings(&["--etcd-disable-snapshots", &format!("--token={secret}")]))?;
    let window = INTERVAL * 2 + Duration::from_secs(1);
    let checked = super::node::run(
        Command::new(&ctx.loadgen)
            .args(["check", "--endpoints", &format!("https://{}:2379", pitr.ip), "--tls-dir"])
            .arg(pitr.data().join("server/tls/etcd"))
            .arg("--log")
            .arg(&log)
            .args(["--loss-unix-ns", &(pit_s * 1_000_000_000).to_string()])
            .args(["--window-ms", &window.as_millis().to_string(), "--point-in-time", "yes"]),
        Duration::from_secs(120),
        "loadgen check (point in time)",
    )?
    .check("loadgen check (point in time)")?;
    std::fs::write(dir.join("loadgen-check-pitr.out"), &checked.stdout)?;
    let p = json(&checked.stdout, "loadgen check (point in time)")?;
    server.stop()?;
    ensure!(p["violation_count"] == 0, "the keyspace restored to {at} is wrong: {}", p["violations"]);
    ensure!(p["required"].as_u64().unwrap_or(0) > 0, "nothing was required back at {at}: the target is too early");
    Ok(format!(
        "{note}; {} stuck mid-upload at the kill, uploaded after the restart; to-time {at}: revision {}, {} required writes back, none sent later, {:.2}s before the time",
        stuck.len(),
        p["visible_rev"],
        p["required"],
        p["rpo_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0,
    ))
}

/// Closed segments and snapshots in the nodes' snapshot dirs that are not objects in `bucket`.
fn not_in_s3(ctx: &Ctx, nodes: &[Node], bucket: &str) -> Vec<String> {
    nodes
        .iter()
        .flat_map(|n| files(&n.snapshots()))
        .filter(|f| segment_end(f).is_some() || (f.starts_with("etcd-snapshot-") && !f.ends_with(".part")))
        .filter(|f| !ctx.s3.object(bucket, &format!("k3s/{f}")).exists())
        .collect()
}

/// The last revision of a closed delta segment, from its file name
/// (`delta-<from>-<to>-<node>-<closed>[-h<history>].seg[.age]`); none for anything else.
fn segment_end(file: &str) -> Option<i64> {
    let rest = file.strip_prefix("delta-")?;
    if !(rest.ends_with(".seg") || rest.ends_with(".seg.age")) {
        return None;
    }
    rest.split('-').nth(1)?.parse().ok()
}
