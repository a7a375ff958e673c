//! `delta-overhead`: what continuous backup costs etcd's writers, and whether the follower keeps up.
//!
//! One `k3s-snapshot server` on loopback (its own etcd 3.5.1, TLS, data on disk), fresh for every
//! run, in three variants, interleaved (without, bare watch, with; then the other way round):
//! without a watcher; with `loadgen watch` (a bare client watching every key with the follower's
//! options and dropping the events: what it costs is etcd's side of the watch); and with
//! `--etcd-snapshot-delta-interval 2s` (segments to s3s-fs). Each run: a 2 s warm-up, then `loadgen put` at a fixed rate
//! of 1 KiB puts for [`SECS`] s with at most [`WINDOW`] in flight; put latency p50/p99 (send to
//! response) and the achieved rate. With the follower, `loadgen` also samples `/metrics` every
//! 250 ms: the true lag is the newest acknowledged revision minus
//! `k3s_snapshot_delta_shipped_revision` (segments ship once per interval, so it saw-tooths up to
//! one interval of writes), and `k3s_snapshot_delta_lag_seconds` (the age of the oldest unshipped
//! change) saw-tooths up to about one interval; the follower keeps up when the last third's peak
//! of that age is no higher than the first third's (or one interval) plus 0.5 s. Printed, never
//! asserted.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::servers::{self, S3};
use super::{median, reset_dir};
use crate::child::{free_port, KillOnDrop};

pub const RATES: [u32; 2] = [1000, 5000];
const SECS: u32 = 10;
const WINDOW: u32 = 256;
const INTERVAL: &str = "2s";

pub struct DeltaBench<'a> {
    pub bin: &'a Path,
    pub loadgen: &'a Path,
    pub etcd_dir: &'a Path,
    pub s3: &'a S3,
    pub work: &'a Path,
    pub logs: &'a Path,
    pub runs: usize,
}

/// What runs beside the server's etcd during a run.
#[derive(Clone, Copy, PartialEq)]
enum Variant {
    /// Nothing: the baseline.
    Without,
    /// `loadgen watch`: a bare client watching every key with the follower's options and
    /// dropping the events. What it costs the writers is etcd's side of the watch.
    Watch,
    /// The server's own delta follower, shipping segments to s3s-fs.
    Follower,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::Without => "without",
            Variant::Watch => "bare-watch",
            Variant::Follower => "with",
        }
    }
}

/// One measured run.
struct Run {
    achieved: f64,
    p50: f64,
    p99: f64,
    failed: u64,
    summary: Value,
}

/// A server on loopback, stopped with SIGTERM on drop (then killed).
struct Server {
    child: KillOnDrop,
    etcd: String,
    metrics: String,
    dir: PathBuf,
}

fn start(b: &DeltaBench, dir: &Path, follower: bool) -> Result<Server> {
    reset_dir(dir)?;
    let (client, peer, https) = (free_port()?, free_port()?, free_port()?);
    let mut c = Command::new(b.bin);
    for v in crate::OUR_ENV {
        c.env_remove(v);
    }
    c.arg("server")
        .arg("--data-dir")
        .arg(dir)
        .arg("--etcd-bin-dir")
        .arg(b.etcd_dir)
        .args(["--node-name", "bench", "--token", "bench-token", "--bind-address", "127.0.0.1"])
        .args(["--etcd-client-port", &client.to_string(), "--etcd-peer-port", &peer.to_string()])
        .args(["--https-listen-port", &https.to_string(), "--etcd-disable-snapshots", "--etcd-snapshot-jitter=0s"]);
    if follower {
        c.arg(format!("--etcd-snapshot-delta-interval={INTERVAL}"))
            .args(["--etcd-s3", "--etcd-s3-endpoint", &b.s3.endpoint, "--etcd-s3-insecure"])
            .args(["--etcd-s3-bucket", servers::BUCKET, "--etcd-s3-folder", "delta"])
            .args(["--etcd-s3-access-key", servers::ACCESS_KEY, "--etcd-s3-secret-key", servers::SECRET_KEY]);
    }
    let log = b.logs.join(format!("{}.log", dir.file_name().unwrap_or_default().to_string_lossy()));
    let child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("start k3s-snapshot server")?;
    let mut s = Server {
        child: KillOnDrop(child),
        etcd: format!("https://127.0.0.1:{client}"),
        metrics: format!("https://127.0.0.1:{https}/metrics"),
        dir: dir.to_path_buf(),
    };
    let ready = if follower { "a new chain starts after this full snapshot" } else { "server is running" };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains(ready) {
        if let Some(st) = s.child.0.try_wait()? {
            bail!("the server exited ({st}) before it was ready; see {}", log.display());
        }
        if Instant::now() > deadline {
            bail!("the server was not ready within 120s; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(s)
}

fn stop(mut s: Server) -> Result<()> {
    s.terminate()
}

impl Server {
    /// SIGTERM, and wait for the exit: the server stops its etcd first (a SIGKILL would leave
    /// etcd running).
    fn terminate(&mut self) -> Result<()> {
        if self.child.0.try_wait()?.is_some() {
            return Ok(());
        }
        super::measure::terminate(self.child.0.id());
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child.0.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("the server did not stop within 60s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Server {
    /// After a failed run too, so that no etcd outlives the bench.
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}

fn load(b: &DeltaBench, s: &Server, rate: u32, secs: u32, prefix: &str, sample: bool) -> Result<Value> {
    let mut c = Command::new(b.loadgen);
    c.args(["put", "--endpoints", &s.etcd, "--tls-dir"])
        .arg(s.dir.join("server/tls/etcd"))
        .args(["--rate", &rate.to_string(), "--duration", &secs.to_string(), "--window", &WINDOW.to_string()])
        .args(["--prefix", prefix, "--value-bytes", "1024"]);
    if sample {
        c.args(["--metrics", &s.metrics, "--metrics-ca"]).arg(s.dir.join("server/tls/server-ca.crt"));
    }
    let out = c.stderr(Stdio::piped()).output().context("run loadgen")?;
    if !out.status.success() {
        bail!("loadgen put failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.trim()).with_context(|| format!("loadgen printed {text:?}"))?;
    // A put that fails against a healthy server is counted and reported; many of them void the run.
    let (failed, issued) = (v["failed"].as_u64().unwrap_or(0), v["issued"].as_u64().unwrap_or(0));
    if failed * 100 > issued {
        bail!("{failed} of {issued} puts failed against a running server: {}", v["first_error"]);
    }
    Ok(v)
}

fn one(b: &DeltaBench, rate: u32, variant: Variant, i: usize) -> Result<Run> {
    let follower = variant == Variant::Follower;
    let dir = b.work.join(format!("delta-{rate}-{i}-{}", variant.label()));
    let s = start(b, &dir, follower)?;
    let watcher = if variant == Variant::Watch { Some(bare_watch(b, &s, &dir)?) } else { None };
    load(b, &s, rate, 2, "/warm/", false)?;
    let v = load(b, &s, rate, SECS, "/bench/", follower)?;
    drop(watcher);
    stop(s)?;
    let _ = std::fs::remove_dir_all(&dir);
    b.s3.clear()?;
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let failed = v["failed"].as_u64().unwrap_or(0);
    eprintln!(
        "xtask bench:   {}: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms{}",
        variant.label(),
        f("achieved_rate"),
        f("p50_ms"),
        f("p99_ms"),
        if failed > 0 { format!(", {failed} failed ({})", v["first_error"]) } else { String::new() }
    );
    Ok(Run { achieved: f("achieved_rate"), p50: f("p50_ms"), p99: f("p99_ms"), failed, summary: v })
}

/// Starts `loadgen watch` on the server's etcd and waits until its watch is open.
fn bare_watch(b: &DeltaBench, s: &Server, dir: &Path) -> Result<KillOnDrop> {
    let log = dir.with_extension("watch.log");
    let child = Command::new(b.loadgen)
        .args(["watch", "--endpoints", &s.etcd, "--tls-dir"])
        .arg(s.dir.join("server/tls/etcd"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("start loadgen watch")?;
    let mut child = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("watching") {
        if let Some(st) = child.0.try_wait()? {
            bail!("loadgen watch exited ({st}): {}", std::fs::read_to_string(&log).unwrap_or_default().trim());
        }
        if Instant::now() > deadline {
            bail!("loadgen watch did not open its watch within 30 s; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child)
}

/// Peak of `f(sample)` over the samples whose time is in `[from, to)` of the run's span.
fn peak(samples: &[Value], from: f64, to: f64, f: impl Fn(&[Value]) -> f64) -> f64 {
    let end = samples.last().and_then(|s| s[0].as_f64()).unwrap_or(0.0);
    samples
        .iter()
        .filter_map(|s| s.as_array())
        .filter(|s| {
            let t = s[0].as_f64().unwrap_or(0.0) / end.max(1e-9);
            t >= from && t < to
        })
        .map(|s| f(s))
        .fold(0.0, f64::max)
}

fn true_lag(s: &[Value]) -> f64 {
    s[1].as_f64().unwrap_or(0.0) - s[2].as_f64().unwrap_or(0.0)
}

pub fn run(b: &DeltaBench) -> Result<Value> {
    let mut results = Vec::new();
    println!(
        "\n== delta-overhead: put latency of 1 KiB puts on one server: without a watcher, with a bare watch of every key (loadgen watch: etcd's side), and with --etcd-snapshot-delta-interval {INTERVAL} (to s3s-fs); {SECS} s per run, median of {} interleaved runs",
        b.runs
    );
    println!(
        "{:>6}  {:>10} {:>10} {:>10}  {:>10} {:>10} {:>10}  {:>13} {:>13}",
        "rate", "achieved", "(watch)", "(with)", "p50", "(watch)", "(with)", "p50 x w/with", "p99 x w/with"
    );
    let mut keep_up = Vec::new();
    for rate in RATES {
        let (mut without, mut watch, mut with) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..b.runs {
            eprintln!("xtask bench: delta-overhead {rate}/s run {} of {}", i + 1, b.runs);
            let order = if i % 2 == 0 {
                [Variant::Without, Variant::Watch, Variant::Follower]
            } else {
                [Variant::Follower, Variant::Watch, Variant::Without]
            };
            for variant in order {
                let r = one(b, rate, variant, i)?;
                match variant {
                    Variant::Without => without.push(r),
                    Variant::Watch => watch.push(r),
                    Variant::Follower => with.push(r),
                }
            }
        }
        let m = |v: &[Run], f: fn(&Run) -> f64| median(v.iter().map(f).collect());
        let (a0, aw, a1) = (m(&without, |r| r.achieved), m(&watch, |r| r.achieved), m(&with, |r| r.achieved));
        let (p50_0, p50_w, p50_1) = (m(&without, |r| r.p50), m(&watch, |r| r.p50), m(&with, |r| r.p50));
        let (p99_0, p99_w, p99_1) = (m(&without, |r| r.p99), m(&watch, |r| r.p99), m(&with, |r| r.p99));
        println!(
            "{rate:>5}/s  {a0:>8.0}/s {aw:>8.0}/s {a1:>8.0}/s  {p50_0:>7.2} ms {p50_w:>7.2} ms {p50_1:>7.2} ms  {:>5.2}x/{:>5.2}x {:>5.2}x/{:>5.2}x",
            p50_w / p50_0,
            p50_1 / p50_0,
            p99_w / p99_0,
            p99_1 / p99_0
        );
        println!("{:>6}  p99: without {p99_0:.2} ms, bare watch {p99_w:.2} ms, with the follower {p99_1:.2} ms", "");
        for (label, v) in [("without", &without), ("bare watch", &watch), ("with", &with)] {
            let p50: Vec<String> = v.iter().map(|r| format!("{:.2}", r.p50)).collect();
            let p99: Vec<String> = v.iter().map(|r| format!("{:.2}", r.p99)).collect();
            println!("{:>6}  runs {label}: p50 {} ms; p99 {} ms", "", p50.join(" "), p99.join(" "));
        }
        for r in &with {
            let samples = r.summary["samples"].as_array().cloned().unwrap_or_default();
            let first = peak(&samples, 0.0, 1.0 / 3.0, true_lag);
            let last = peak(&samples, 2.0 / 3.0, 1.01, true_lag);
            let metric_first = peak(&samples, 0.0, 1.0 / 3.0, |s| s[3].as_f64().unwrap_or(0.0));
            let metric_last = peak(&samples, 2.0 / 3.0, 1.01, |s| s[3].as_f64().unwrap_or(0.0));
            let secs_first = peak(&samples, 0.0, 1.0 / 3.0, |s| s[4].as_f64().unwrap_or(0.0));
            let secs_last = peak(&samples, 2.0 / 3.0, 1.01, |s| s[4].as_f64().unwrap_or(0.0));
            keep_up.push(json!({
                "rate": rate, "achieved": r.achieved, "samples": samples.len(),
                "lag_revisions_peak_first_third": first, "lag_revisions_peak_last_third": last,
                "metric_lag_revisions_peak_first_third": metric_first, "metric_lag_revisions_peak_last_third": metric_last,
                "metric_lag_seconds_peak_first_third": secs_first, "metric_lag_seconds_peak_last_third": secs_last,
                "caught_up_after_s": r.summary["caught_up_after_s"],
            }));
        }
        let runs = |v: &[Run]| {
            v.iter()
                .map(|r| json!({"achieved": r.achieved, "p50_ms": r.p50, "p99_ms": r.p99, "failed": r.failed}))
                .collect::<Vec<_>>()
        };
        results.push(json!({
            "rate": rate, "without": runs(&without), "bare_watch": runs(&watch), "with": runs(&with),
            "p50_ratio": p50_1 / p50_0, "p99_ratio": p99_1 / p99_0,
            "bare_watch_p50_ratio": p50_w / p50_0, "bare_watch_p99_ratio": p99_w / p99_0,
        }));
    }
    println!();
    for k in &keep_up {
        let f = |n: &str| k[n].as_f64().unwrap_or(f64::NAN);
        // Segments ship once per interval, so the age of the oldest unshipped change saw-tooths up
        // to about one interval; growing means the last third's peak is well above that.
        let (secs_first, secs_last) =
            (f("metric_lag_seconds_peak_first_third"), f("metric_lag_seconds_peak_last_third"));
        let interval_secs = INTERVAL.trim_end_matches('s').parse::<f64>().unwrap_or(2.0);
        println!(
            "keep-up at {}/s (achieved {:.0}/s, {} samples): k3s_snapshot_delta_lag_seconds peaks at {secs_first:.2} s in the first third, {secs_last:.2} s in the last ({}); lag behind the newest acknowledged revision peaks at {:.0} / {:.0} revisions; everything shipped {} after the load stopped",
            k["rate"],
            f("achieved"),
            k["samples"],
            if secs_last <= secs_first.max(interval_secs) + 0.5 { "not growing" } else { "GROWING" },
            f("lag_revisions_peak_first_third"),
            f("lag_revisions_peak_last_third"),
            k["caught_up_after_s"].as_f64().map_or("not within 60 s".to_string(), |s| format!("{s:.2} s")),
        );
    }
    Ok(json!({ "interval": INTERVAL, "secs_per_run": SECS, "window": WINDOW, "rates": results, "keep_up": keep_up }))
}
