//! `replay`: how long a restore of `latest` plus its delta chain takes, by chain length, with the
//! chain written natively into the restored db (`--cluster-reset-restore-replay native`) and on
//! a private etcd (`etcd`, the path every restore took before, and the native path's fallback).
//!
//! The base is a snapshot (etcdctl's) of an etcd holding [`BASE_MIB`] MiB of values; the chain
//! after it is written by `loadgen chain` straight into segment files (1 KiB values, every tenth
//! revision a delete, segments of [`SEGMENT_REVISIONS`] revisions: about ten seconds of a cluster
//! writing 1,000 times a second), once, as long as the longest chain measured; a chain of N
//! revisions is its first N / [`SEGMENT_REVISIONS`] segments. Each run restores into a fresh
//! data dir (the snapshot and the segments hard-linked into its snapshot dir, page cache
//! flushed) with the whole reset timed, from start to exit: base restore, replay, revision bump,
//! etcd's first start on the result. Native and etcd runs alternate (native first on even runs).
//! The private-etcd path runs only up to [`ETCD_PATH_MAX`] revisions, once at that length
//! (about nine minutes a run), `--runs` times below it. Also measured on etcd 3.4.23: the
//! 180,000-revision chain of the issue that asked for the native path.
//!
//! Reported per run: the wall time, the replay's own rate (its log line), and the peak RSS of our
//! process (sampled `VmHWM`; `ru_maxrss` would be etcd's, our child).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::measure::{self, Measure, Measured};
use super::servers::{self, EtcdSpec};
use super::{median, reset_dir};

pub const BASE_MIB: usize = 64;
pub const SEGMENT_REVISIONS: i64 = 10_000;
pub const LENGTHS: [i64; 4] = [100_000, 180_000, 1_000_000, 5_000_000];
/// Only the 180,000-revision chain on etcd 3.4.23.
const LENGTHS_34: [i64; 1] = [180_000];
pub const ETCD_PATH_MAX: i64 = 1_000_000;

pub struct ReplayBench<'a> {
    pub bin: &'a Path,
    pub loadgen: &'a Path,
    pub etcd35: &'a Path,
    pub etcd34: &'a Path,
    pub work: &'a Path,
    pub logs: &'a Path,
    pub runs: usize,
    /// Chain lengths to measure (default [`LENGTHS`]).
    pub lengths: Vec<i64>,
}

/// A base snapshot and the chain after it, for one etcd version.
struct Fixture {
    version: &'static str,
    etcd_dir: PathBuf,
    snapshot: PathBuf,
    chain_dir: PathBuf,
    base: i64,
}

/// One measured restore.
struct Run {
    m: Measured,
    rate: Option<f64>,
}

pub fn run(b: &ReplayBench) -> Result<Value> {
    let root = b.work.join("replay");
    reset_dir(&root)?;
    let longest = b.lengths.iter().copied().max().unwrap_or(0);
    let mut fixtures = vec![fixture(b, &root, "3.5.1", b.etcd35, longest)?];
    let lengths_34: Vec<i64> = LENGTHS_34.into_iter().filter(|n| b.lengths.contains(n)).collect();
    if let Some(&n) = lengths_34.iter().max() {
        fixtures.push(fixture(b, &root, "3.4.23", b.etcd34, n)?);
    }
    println!(
        "\n== replay: restore of latest + its delta chain ({BASE_MIB} MiB base, 1 KiB values, 10% deletes, {SEGMENT_REVISIONS}-revision segments), whole reset timed"
    );
    println!(
        "{:>7} {:>10} {:>9}  {:>7}  {:>9} {:>17}  {:>13}  {:>9}  runs (s)",
        "etcd", "revisions", "MB", "path", "median s", "spread s", "replay rev/s", "peak RSS"
    );
    let mut rows = Vec::new();
    for f in &fixtures {
        let lengths: Vec<i64> = if f.version == "3.4.23" { lengths_34.clone() } else { b.lengths.clone() };
        for n in lengths {
            let segments = segments_upto(&f.chain_dir, f.base + n)?;
            let bytes: u64 = segments.iter().map(|p| std::fs::metadata(p).map_or(0, |m| m.len())).sum();
            let etcd_runs = if n > ETCD_PATH_MAX {
                0
            } else if n == ETCD_PATH_MAX {
                1
            } else {
                b.runs
            };
            let (mut native, mut etcd) = (Vec::new(), Vec::new());
            for i in 0..b.runs.max(etcd_runs) {
                eprintln!("xtask bench: replay {n} revisions on etcd {}: run {} of {}", f.version, i + 1, b.runs);
                let order: &[bool] = if i % 2 == 0 { &[true, false] } else { &[false, true] };
                for &is_native in order {
                    if is_native && i < b.runs {
                        native.push(restore(b, f, &segments, n, "native", i)?);
                    } else if !is_native && i < etcd_runs {
                        etcd.push(restore(b, f, &segments, n, "etcd", i)?);
                    }
                }
            }
            for (path, runs) in [("native", &native), ("etcd", &etcd)] {
                if runs.is_empty() {
                    continue;
                }
                let row = report(f.version, n, bytes, path, runs);
                rows.push(row);
            }
        }
    }
    Ok(json!({
        "base_mib": BASE_MIB, "segment_revisions": SEGMENT_REVISIONS, "value_bytes": 1024, "delete_every": 10,
        "etcd_path_max": ETCD_PATH_MAX, "rows": rows,
    }))
}

/// Starts etcd from `etcd_dir`, loads the base, saves it with etcdctl, stops etcd, and writes a
/// chain of `revisions` after it.
fn fixture(b: &ReplayBench, root: &Path, version: &'static str, etcd_dir: &Path, revisions: i64) -> Result<Fixture> {
    let dir = root.join(format!("etcd-{version}"));
    let spec = EtcdSpec::new("replay", dir.join("etcd"))?;
    let etcd = servers::start_etcd(etcd_dir, &spec, &[], &b.logs.join(format!("replay-etcd-{version}.log")))?;
    let etcdctl = etcd_dir.join("etcdctl");
    servers::load(&etcdctl, &etcd.client_url, 0, BASE_MIB, 4)?;
    let snapshot = dir.join("base.db");
    let setup = b.logs.join("replay-setup.log");
    let mut save = Command::new(&etcdctl);
    save.env("ETCDCTL_API", "3").args(["--endpoints", &etcd.client_url, "snapshot", "save"]).arg(&snapshot);
    Measure::default().run(&mut save, &setup)?;
    let status = Command::new(&etcdctl)
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &etcd.client_url, "endpoint", "status", "-w", "json"])
        .output()
        .context("etcdctl endpoint status")?;
    etcd.stop()?;
    let status: Value = serde_json::from_slice(&status.stdout).context("etcdctl endpoint status -w json")?;
    let header = &status[0]["Status"]["header"];
    let (Some(base), Some(cluster)) = (header["revision"].as_i64(), header["cluster_id"].as_u64()) else {
        bail!("etcdctl endpoint status gave no revision and cluster ID: {status}");
    };
    let chain_dir = dir.join("chain");
    eprintln!("xtask bench: replay: writing a chain of {revisions} revisions after revision {base} (etcd {version})");
    let mut gen = Command::new(b.loadgen);
    gen.arg("chain").arg("--dir").arg(&chain_dir);
    gen.args(["--after", &base.to_string(), "--revisions", &revisions.to_string()]);
    gen.args(["--segment-revisions", &SEGMENT_REVISIONS.to_string(), "--history", &format!("{cluster:016x}")]);
    Measure::default().run(&mut gen, &setup)?;
    Ok(Fixture { version, etcd_dir: etcd_dir.to_path_buf(), snapshot, chain_dir, base })
}

/// The chain's segments that end at or before revision `last`, in order; they must reach it.
fn segments_upto(dir: &Path, last: i64) -> Result<Vec<PathBuf>> {
    let mut found: Vec<(i64, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let to = name.strip_prefix("delta-")?.split('-').nth(1)?.parse::<i64>().ok()?;
            (to <= last).then(|| (to, e.path()))
        })
        .collect();
    found.sort();
    if found.last().map(|(to, _)| *to) != Some(last) {
        bail!("the bench's chain in {} does not end at revision {last}", dir.display());
    }
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// One reset of a fresh data dir holding the base and `segments`, replaying with `path`.
fn restore(b: &ReplayBench, f: &Fixture, segments: &[PathBuf], n: i64, path: &str, i: usize) -> Result<Run> {
    let data = b.work.join("replay").join("restore");
    reset_dir(&data)?;
    let snaps = data.join("server/db/snapshots");
    std::fs::create_dir_all(&snaps)?;
    for d in [data.as_path(), &data.join("server"), &data.join("server/db"), &snaps] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
    }
    std::fs::hard_link(&f.snapshot, snaps.join("etcd-snapshot-replay-bench-1690000000"))?;
    for s in segments {
        std::fs::hard_link(s, snaps.join(s.file_name().context("segment name")?))?;
    }
    measure::sync();
    let log = b.logs.join(format!("replay-{}-{n}-{path}-{i}.log", f.version));
    let _ = std::fs::remove_file(&log);
    let mut c = super::our_restore_with(b.bin, &f.etcd_dir, &data, "latest")?;
    c.args(["--cluster-reset-restore-deltas", "--cluster-reset-restore-replay", path]);
    let m = Measure::sampled().run(&mut c, &log)?;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let reached = format!("revision={}", f.base + n);
    if !text.contains("replayed the delta segments") || !text.contains(&reached) {
        bail!(
            "the {path} replay of {n} revisions did not report reaching revision {}; see {}",
            f.base + n,
            log.display()
        );
    }
    let rate = text.lines().filter(|l| l.contains("replayed the delta segments")).find_map(|l| {
        l.split("revisions_per_second=").nth(1)?.split_whitespace().next()?.trim_matches('"').parse().ok()
    });
    reset_dir(&data)?;
    Ok(Run { m, rate })
}

fn report(version: &str, n: i64, bytes: u64, path: &str, runs: &[Run]) -> Value {
    let walls: Vec<f64> = runs.iter().map(|r| r.m.wall.as_secs_f64()).collect();
    let rates: Vec<f64> = runs.iter().filter_map(|r| r.rate).collect();
    let peak_kib = runs.iter().map(|r| r.m.own_hwm_kib.unwrap_or(r.m.maxrss_kib)).max().unwrap_or(0);
    let (lo, hi) = walls.iter().fold((f64::MAX, 0f64), |(lo, hi), &w| (lo.min(w), hi.max(w)));
    let med = median(walls.clone());
    let rate = if rates.is_empty() { f64::NAN } else { median(rates.clone()) };
    println!(
        "{version:>7} {n:>10} {:>9.0}  {path:>7}  {med:>9.2} {:>17}  {rate:>13.0}  {:>6.1} MiB  {}",
        bytes as f64 / 1e6,
        format!("{lo:.2}–{hi:.2}"),
        peak_kib as f64 / 1024.0,
        walls.iter().map(|w| format!("{w:.2}")).collect::<Vec<_>>().join(" "),
    );
    json!({
        "etcd": version, "revisions": n, "segment_bytes": bytes, "path": path,
        "wall_s": walls, "median_s": med, "min_s": lo, "max_s": hi,
        "replay_revisions_per_second": rates, "median_replay_revisions_per_second": rate,
        "peak_rss_kib": peak_kib,
    })
}
