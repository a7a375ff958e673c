//! `rpo`: continuous backup's recovery point. Three servers ship delta segments to S3 every
//! [`INTERVAL`] while `loadgen` writes at a steady rate (1 KiB puts, every tenth operation a delete
//! of an earlier key); all three are killed with `-9` mid-stream and their data dirs deleted; a
//! fresh node with only the S3 settings and the token restores `latest` with the deltas. The
//! restored keyspace must be exactly the history up to some revision (values, revisions and
//! deletes), hold every write acknowledged [`INTERVAL`] × 2 before the loss, and the RPO (last
//! acknowledgement before the loss minus the acknowledgement of the newest write restored) must
//! be at most that. Once at 1,000 and once at 5,000 writes/s.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use super::net::tick;
use super::node::{kill_and_wait, s3_flags, tail, Node, Server, RESET_DONE, S3_SECRET_KEY};
use super::scenarios::{join, strings};
use super::{Ctx, Etcd, Rng};
use crate::demo::KillOnDrop;

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
    while started.elapsed() < kill_after {
        if let Some(st) = load.0.try_wait()? {
            bail!(
                "loadgen exited ({st}) before the kill: {}",
                tail(&std::fs::read_to_string(dir.join("loadgen-put.err")).unwrap_or_default(), 4)
            );
        }
        tick(Duration::from_millis(50))?;
    }
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
    let put = json(&std::fs::read_to_string(&load_out)?, "loadgen put")?;
    ensure!(put["empty_deletes"] == 0, "a delete of an acknowledged put found no key while the cluster ran: {put}");

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
        out.stderr.contains("replayed the delta segments"),
        "the restore replayed no delta segment: {}",
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
    Ok(note)
}
