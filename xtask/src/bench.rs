//! `cargo xtask bench`: speed and memory of the release `k3s-snapshot` against etcd's own tools,
//! measured in the same run on the same etcd, interleaved (reference, ours, ours, reference, …)
//! so that noise from other work on the machine falls on both, and reported as medians.
//!
//! Scenarios, for each db size:
//! - `limit`: the physical limit of a save on this machine: `loadgen snapshot` reading etcd's
//!   Snapshot stream with the same client library and discarding it (the reference column) vs
//!   writing it to a file with the save's write-back policy and one fsync (the ours column). The
//!   save rows are also reported against the file-writing limit.
//! - `save`: `etcdctl snapshot save` vs `etcd-snapshot save --etcd-endpoints … --dir …`
//! - `save+s3`: `etcdctl snapshot save` then `curl` PUT of the file (what k3s does: save, then
//!   upload; above S3's 5 GiB single-PUT limit, which curl cannot pass, etcdctl's save alone) vs
//!   `etcd-snapshot save --s3 …` (local file and upload in one pass)
//! - `restore`: `etcdutl snapshot restore` + etcd start until `/health` is true + SIGTERM stop vs
//!   `server --cluster-reset --cluster-reset-restore-path` (which does all three, and bumps the
//!   revision natively); `restore-nobump`: the same with `--cluster-reset-restore-bump-revision=0`
//! - `restore-s3`: the snapshot as an object in s3s-fs, restored by its name: `curl` GET +
//!   `etcdutl snapshot restore` + etcd start + stop vs `server --cluster-reset
//!   --cluster-reset-restore-path NAME --etcd-s3 …` (download, checks, restore, start, stop)
//! - `status`: `etcdutl snapshot status -w json` vs `etcd-snapshot status -o json` (which also
//!   hashes the file against its sha256 trailer), and `status-fast`: the same with
//!   `--skip-hash-check` (the structure check and etcdutl's own reads only)
//! - `save+s3+age`: our own `etcd-snapshot save --s3` (the reference here) vs the same with
//!   `--snapshot-encryption-recipients-file` (age-encrypted as it streams, to a key made by
//!   `age-keygen`): the cost of encryption
//!
//! - `delta-overhead` (once, not per size): put latency p50/p99 of 1 KiB puts at 1,000 and 5,000/s
//!   on one server without and with the continuous-backup follower, and whether the follower keeps
//!   up (see [`delta`])
//!
//! Peak RSS is the kernel's: `wait4`'s `ru_maxrss` of our process (see [`measure`]).

mod chart;
mod delta;
mod measure;
mod replay;
mod report;
use report::{machine, print_report, redraw, results_json};
pub(crate) mod servers;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::provision::{self, workspace_root};
use crate::run_checked;
use measure::{Measure, Measured};
use servers::{EtcdSpec, S3};

const USAGE: &str =
    "usage: cargo xtask bench [--size-mib N[,N…]] [--runs N] [--only limit,save,s3,restore,restore-nobump,restore-s3,status,status-fast,s3-age,delta-overhead,replay] [--replay-revisions N[,N…]] [--chart] [--keep]\n       cargo xtask bench --redraw target/bench/results.json";

#[derive(Debug)]
struct Args {
    sizes_mib: Vec<usize>,
    runs: usize,
    only: Vec<Scenario>,
    /// Chain lengths of the `replay` scenario.
    replay_revisions: Vec<i64>,
    chart: bool,
    keep: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Limit,
    Save,
    SaveS3,
    Restore,
    RestoreNoBump,
    Status,
    StatusFast,
    SaveS3Age,
    RestoreS3,
    /// Not per size: the continuous-backup follower's cost to writers ([`delta`]).
    DeltaOverhead,
    /// Not per size: a restore replaying delta chains of growing length ([`replay`]).
    Replay,
}

impl Scenario {
    const ALL: [Scenario; 11] = [
        Scenario::Limit,
        Scenario::Save,
        Scenario::SaveS3,
        Scenario::Restore,
        Scenario::RestoreNoBump,
        Scenario::RestoreS3,
        Scenario::Status,
        Scenario::StatusFast,
        Scenario::SaveS3Age,
        Scenario::DeltaOverhead,
        Scenario::Replay,
    ];

    fn key(self) -> &'static str {
        match self {
            Scenario::Limit => "limit",
            Scenario::Save => "save",
            Scenario::SaveS3 => "save+s3",
            Scenario::Restore => "restore",
            Scenario::RestoreNoBump => "restore-nobump",
            Scenario::Status => "status",
            Scenario::StatusFast => "status-fast",
            Scenario::SaveS3Age => "save+s3+age",
            Scenario::RestoreS3 => "restore-s3",
            Scenario::DeltaOverhead => "delta-overhead",
            Scenario::Replay => "replay",
        }
    }

    fn reference(self) -> &'static str {
        match self {
            Scenario::Limit => "the snapshot stream read and discarded (ours: written to a file, fsynced)",
            Scenario::Save => "etcdctl snapshot save",
            Scenario::SaveS3 => "etcdctl snapshot save + curl PUT",
            Scenario::Restore | Scenario::RestoreNoBump => "etcdutl snapshot restore + etcd start + stop",
            Scenario::Status | Scenario::StatusFast => "etcdutl snapshot status",
            Scenario::SaveS3Age => "our save --s3, unencrypted",
            Scenario::RestoreS3 => "curl GET + etcdutl snapshot restore + etcd start + stop",
            Scenario::DeltaOverhead => "the same server without the follower",
            Scenario::Replay => "the same restore replaying on a private etcd",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "limit" => Scenario::Limit,
            "save" => Scenario::Save,
            "s3" | "save+s3" => Scenario::SaveS3,
            "restore" => Scenario::Restore,
            "restore-nobump" => Scenario::RestoreNoBump,
            "status" => Scenario::Status,
            "status-fast" => Scenario::StatusFast,
            "s3-age" | "save+s3+age" => Scenario::SaveS3Age,
            "restore-s3" => Scenario::RestoreS3,
            "delta-overhead" => Scenario::DeltaOverhead,
            "replay" => Scenario::Replay,
            _ => bail!(
                "unknown scenario {s:?}; the scenarios are save, s3, restore, restore-nobump, restore-s3, status, status-fast, s3-age, delta-overhead"
            ),
        })
    }
}

/// A flag's comma-separated list of numbers.
fn numbers<T: std::str::FromStr>(flag: &str, v: &str) -> Result<Vec<T>>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    v.split(',').map(|s| s.trim().parse::<T>().with_context(|| format!("{flag} {v:?}"))).collect()
}

fn parse_args(args: &[String]) -> Result<Args> {
    let mut a = Args {
        sizes_mib: vec![1024],
        runs: 3,
        only: Scenario::ALL.to_vec(),
        replay_revisions: replay::LENGTHS.to_vec(),
        chart: false,
        keep: false,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--size-mib" => {
                a.sizes_mib = numbers(flag, value()?)?;
                a.sizes_mib.sort_unstable();
                a.sizes_mib.dedup();
                if a.sizes_mib.first() == Some(&0) {
                    bail!("--size-mib must be at least 1");
                }
            }
            "--runs" => {
                a.runs = value()?.parse().context("--runs")?;
                if a.runs == 0 {
                    bail!("--runs must be at least 1");
                }
            }
            "--only" => a.only = value()?.split(',').map(Scenario::parse).collect::<Result<_>>()?,
            "--replay-revisions" => {
                a.replay_revisions = numbers(flag, value()?)?;
                if a.replay_revisions
                    .iter()
                    .any(|&n| n < replay::SEGMENT_REVISIONS || n % replay::SEGMENT_REVISIONS != 0)
                {
                    bail!(
                        "--replay-revisions takes multiples of {} (the bench's segment length)",
                        replay::SEGMENT_REVISIONS
                    );
                }
            }
            "--chart" => a.chart = true,
            "--keep" => a.keep = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => bail!("unknown flag {flag:?}\n{USAGE}"),
        }
    }
    if a.chart && a.sizes_mib.len() < 2 {
        bail!("--chart draws time against db size and needs at least two sizes, e.g. --size-mib 256,512,1024");
    }
    Ok(a)
}

/// One scenario at one size: every run of ours and of the reference.
struct Row {
    scenario: Scenario,
    ours: Vec<Measured>,
    reference: Vec<Duration>,
    reference_rss_kib: Vec<u64>,
    /// CPU time the bench's etcd and s3s-fs spent during each of our runs, then each reference
    /// run: where a save's time goes on a machine whose cores the three processes share.
    ours_servers_cpu: Vec<ServersCpu>,
    reference_servers_cpu: Vec<ServersCpu>,
}

/// CPU seconds of the bench's etcd and s3s-fs during one run.
#[derive(Debug, Clone, Copy, Default)]
struct ServersCpu {
    etcd: f64,
    s3: f64,
}

impl Row {
    fn new(scenario: Scenario) -> Self {
        Row {
            scenario,
            ours: Vec::new(),
            reference: Vec::new(),
            reference_rss_kib: Vec::new(),
            ours_servers_cpu: Vec::new(),
            reference_servers_cpu: Vec::new(),
        }
    }

    fn ours_median(&self) -> f64 {
        median(self.ours.iter().map(|m| m.wall.as_secs_f64()).collect())
    }

    /// Median user + system time of our runs, seconds.
    fn ours_cpu_median(&self) -> f64 {
        median(self.ours.iter().map(|m| m.cpu.as_secs_f64()).collect())
    }

    fn reference_median(&self) -> f64 {
        median(self.reference.iter().map(Duration::as_secs_f64).collect())
    }

    fn ratio(&self) -> f64 {
        self.ours_median() / self.reference_median()
    }

    /// Our peak RSS, KiB: `ru_maxrss`, except for the reset, whose `ru_maxrss` is etcd's (its
    /// child): there the sampled `VmHWM` of our own process.
    fn our_peak_kib(&self) -> u64 {
        let own = |m: &Measured| {
            if matches!(self.scenario, Scenario::Restore | Scenario::RestoreNoBump | Scenario::RestoreS3) {
                m.own_hwm_kib.unwrap_or(m.maxrss_kib)
            } else {
                m.maxrss_kib
            }
        };
        self.ours.iter().map(own).max().unwrap_or(0)
    }

    /// The largest anonymous (heap, stacks) RSS sampled in any of our runs, KiB.
    fn our_anon_peak_kib(&self) -> u64 {
        self.ours.iter().filter_map(|m| m.anon_peak_kib).max().unwrap_or(0)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Everything the scenarios share.
struct Bench {
    bin: PathBuf,
    etcd_dir: PathBuf,
    endpoint: String,
    s3: S3,
    work: PathBuf,
    logs: PathBuf,
    runs: usize,
    age_keygen: PathBuf,
    loadgen: PathBuf,
    etcd_pid: u32,
}

impl Bench {
    /// Runs `f`, also returning the CPU the bench's etcd and s3s-fs spent meanwhile.
    fn with_servers_cpu<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<(T, ServersCpu)> {
        let read = || (measure::process_cpu(self.etcd_pid), measure::process_cpu(self.s3.pid()));
        let (etcd0, s30) = read();
        let out = f()?;
        let (etcd1, s31) = read();
        Ok((out, ServersCpu { etcd: (etcd1 - etcd0).as_secs_f64(), s3: (s31 - s30).as_secs_f64() }))
    }
}

pub fn run(args: &[String]) -> Result<()> {
    if let [flag, file] = args {
        if flag == "--redraw" {
            return redraw(Path::new(file));
        }
    }
    let args = parse_args(args)?;
    if args.chart {
        chart::font()?;
    }
    let tools = provision::ensure_all()?;
    let root = workspace_root();
    eprintln!("xtask bench: building k3s-snapshot (release)");
    let mut build = tools.cargo();
    build.args(["build", "--quiet", "--locked", "--release", "-p", "k3s-snapshot-cli", "-p", "loadgen"]);
    run_checked(&mut build, "build k3s-snapshot and the load generator in release mode")?;
    let out_dir = root.join("target/bench");
    let work = out_dir.join(format!("work-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = run_in(&args, &tools, &root.join("target/release/k3s-snapshot"), &work, &out_dir);
    if args.keep || result.is_err() {
        // A failure's message points at logs in here.
        eprintln!("xtask bench: kept {} (remove it when done)", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    result
}

fn run_in(args: &Args, tools: &provision::Tools, bin: &Path, work: &Path, out_dir: &Path) -> Result<()> {
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs)?;
    let quota = format!("--quota-backend-bytes={}", 16u64 << 30);
    let spec = EtcdSpec::new("bench", work.join("etcd"))?;
    let etcd = servers::start_etcd(&tools.etcd35, &spec, &[&quota], &logs.join("etcd.log"))?;
    let s3 = servers::start_s3(&tools.s3s_fs, &work.join("s3"), &logs.join("s3s-fs.log"))?;
    let per_size: Vec<Scenario> =
        args.only.iter().copied().filter(|s| !matches!(s, Scenario::DeltaOverhead | Scenario::Replay)).collect();
    let delta_overhead = if args.only.contains(&Scenario::DeltaOverhead) {
        let loadgen = bin.with_file_name("loadgen");
        let d = delta::DeltaBench {
            bin,
            loadgen: &loadgen,
            etcd_dir: &tools.etcd35,
            s3: &s3,
            work,
            logs: &logs,
            runs: args.runs,
        };
        Some(delta::run(&d)?)
    } else {
        None
    };
    let replay = if args.only.contains(&Scenario::Replay) {
        let loadgen = bin.with_file_name("loadgen");
        let r = replay::ReplayBench {
            bin,
            loadgen: &loadgen,
            etcd35: &tools.etcd35,
            etcd34: &tools.etcd34,
            work,
            logs: &logs,
            runs: args.runs,
            lengths: args.replay_revisions.clone(),
        };
        Some(replay::run(&r)?)
    } else {
        None
    };
    let b = Bench {
        bin: bin.to_path_buf(),
        etcd_dir: tools.etcd35.clone(),
        endpoint: etcd.client_url.clone(),
        s3,
        work: work.to_path_buf(),
        logs,
        runs: args.runs,
        age_keygen: tools.age.with_file_name("age-keygen"),
        loadgen: bin.with_file_name("loadgen"),
        etcd_pid: etcd.child.0.id(),
    };
    let machine = machine();
    let mut sizes = Vec::new();
    let mut loaded = 0;
    for &size in args.sizes_mib.iter().filter(|_| !per_size.is_empty()) {
        servers::load(&tools.etcd35.join("etcdctl"), &b.endpoint, loaded, size, 6)?;
        loaded = size;
        // One snapshot made by etcd's own tool, read by the restore and status scenarios.
        let snap = work.join("reference.db");
        let _ = std::fs::remove_file(&snap);
        Measure::default().run(etcdctl(&b).args(["snapshot", "save"]).arg(&snap), &b.logs.join("setup.log"))?;
        let snap_bytes = std::fs::metadata(&snap)?.len();
        eprintln!("xtask bench: {size} MiB of values, snapshot {:.1} MiB", snap_bytes as f64 / MIB);
        let mut rows = Vec::new();
        for &sc in &per_size {
            eprintln!("xtask bench: {size} MiB: {} ({} runs each, interleaved)", sc.key(), b.runs);
            let row = match sc {
                Scenario::Limit => bench_limit(&b)?,
                Scenario::Save => bench_save(&b)?,
                Scenario::SaveS3 => bench_save_s3(&b)?,
                Scenario::Restore => bench_restore(&b, &snap, Scenario::Restore)?,
                Scenario::RestoreNoBump => bench_restore(&b, &snap, Scenario::RestoreNoBump)?,
                Scenario::Status => bench_status(&b, &snap, Scenario::Status)?,
                Scenario::StatusFast => bench_status(&b, &snap, Scenario::StatusFast)?,
                Scenario::SaveS3Age => bench_save_s3_age(&b)?,
                Scenario::RestoreS3 => bench_restore_s3(&b, &snap)?,
                Scenario::DeltaOverhead | Scenario::Replay => unreachable!("not a per-size scenario"),
            };
            rows.push(row);
        }
        print_report(size, snap_bytes, args.runs, &rows);
        sizes.push((size, snap_bytes, rows));
    }
    drop(etcd);

    let mut results = results_json(&machine, args.runs, &sizes);
    if let Some(d) = delta_overhead {
        results["delta_overhead"] = d;
    }
    if let Some(r) = replay {
        if let (Ok(_), Some(rows)) = (chart::font(), r["rows"].as_array()) {
            let png = out_dir.join("bench-replay.png");
            chart::draw_replay(&png, rows)?;
            println!("wrote {}", png.display());
        }
        results["replay"] = r;
    }
    let path = out_dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")?;
    println!("\nwrote {}", path.display());
    if args.chart {
        let png = out_dir.join("bench.png");
        chart::draw(&png, &sizes.iter().map(|(s, _, rows)| (*s, rows.as_slice())).collect::<Vec<_>>())?;
        println!("wrote {}", png.display());
    }
    Ok(())
}

const MIB: f64 = 1024.0 * 1024.0;

fn etcdctl(b: &Bench) -> Command {
    let mut c = Command::new(b.etcd_dir.join("etcdctl"));
    c.args(["--endpoints", &b.endpoint]);
    c
}

/// Our binary with a clean environment for the variables it reads.
fn ours(b: &Bench) -> Command {
    ours_at(&b.bin)
}

/// Our binary with none of our environment variables set.
fn ours_at(bin: &Path) -> Command {
    let mut c = Command::new(bin);
    for v in crate::OUR_ENV {
        c.env_remove(v);
    }
    c
}

fn our_save(b: &Bench, dir: &Path) -> Command {
    let mut c = ours(b);
    c.args(["etcd-snapshot", "save", "--etcd-endpoints", &b.endpoint, "--node-name", "bench", "--name", "bench"])
        .arg("--data-dir")
        .arg(b.work.join("k3s"))
        .arg("--dir")
        .arg(dir);
    c
}

fn reset_dir(d: &Path) -> Result<()> {
    if d.exists() {
        std::fs::remove_dir_all(d).with_context(|| format!("remove {}", d.display()))?;
    }
    std::fs::create_dir_all(d)?;
    Ok(())
}

/// One reference run: its wall time and peak RSS (KiB).
type RefRun = (Duration, u64);

/// Runs both sides `b.runs` times, interleaved, alternating which goes first (reference, ours,
/// ours, reference, …) so that neither always runs right after the other's writeback.
fn interleaved(
    b: &Bench,
    scenario: Scenario,
    mut reference: impl FnMut() -> Result<RefRun>,
    mut ours: impl FnMut() -> Result<Measured>,
) -> Result<Row> {
    let mut row = Row::new(scenario);
    for i in 0..b.runs {
        let mut ref_run = |row: &mut Row| -> Result<()> {
            let ((wall, rss), cpu) = b.with_servers_cpu(&mut reference)?;
            row.reference.push(wall);
            row.reference_rss_kib.push(rss);
            row.reference_servers_cpu.push(cpu);
            Ok(())
        };
        let mut our_run = |row: &mut Row| -> Result<()> {
            let (m, cpu) = b.with_servers_cpu(&mut ours)?;
            row.ours.push(m);
            row.ours_servers_cpu.push(cpu);
            Ok(())
        };
        if i % 2 == 0 {
            ref_run(&mut row)?;
            our_run(&mut row)?;
        } else {
            our_run(&mut row)?;
            ref_run(&mut row)?;
        }
    }
    Ok(row)
}

/// The limit: `loadgen snapshot` discarding the stream (reference) and writing it to a file with
/// one fsync (ours), interleaved the same way as every scenario.
fn bench_limit(b: &Bench) -> Result<Row> {
    let dir = b.work.join("limit");
    let log = b.logs.join("limit.log");
    let limit = |out: Option<&Path>| -> Result<Measured> {
        reset_dir(&dir)?;
        measure::sync();
        let mut c = Command::new(&b.loadgen);
        c.args(["snapshot", "--endpoints", &b.endpoint]);
        if let Some(f) = out {
            c.arg("--out").arg(f);
        }
        let m = Measure::default().run(&mut c, &log)?;
        if let Some(f) = out {
            if std::fs::metadata(f).map(|m| m.len()).unwrap_or(0) == 0 {
                bail!("loadgen snapshot --out wrote nothing; see {}", log.display());
            }
        }
        reset_dir(&dir)?;
        Ok(m)
    };
    let file = dir.join("limit.db");
    interleaved(b, Scenario::Limit, || limit(None).map(|m| (m.wall, m.maxrss_kib)), || limit(Some(&file)))
}

fn bench_save(b: &Bench) -> Result<Row> {
    let (dir_ref, dir_ours) = (b.work.join("save-ref"), b.work.join("save-ours"));
    let log = b.logs.join("save.log");
    let reference = || {
        reset_dir(&dir_ref)?;
        measure::sync();
        let m = Measure::default().run(etcdctl(b).args(["snapshot", "save"]).arg(dir_ref.join("etcdctl.db")), &log)?;
        reset_dir(&dir_ref)?;
        Ok((m.wall, m.maxrss_kib))
    };
    let our_run = || {
        reset_dir(&dir_ours)?;
        measure::sync();
        let m = Measure::sampled().run(&mut our_save(b, &dir_ours), &log)?;
        reset_dir(&dir_ours)?;
        Ok(m)
    };
    interleaved(b, Scenario::Save, reference, our_run)
}

fn bench_save_s3(b: &Bench) -> Result<Row> {
    let (dir_ref, dir_ours) = (b.work.join("s3-ref"), b.work.join("s3-ours"));
    let log = b.logs.join("save-s3.log");
    let reference = || {
        reset_dir(&dir_ref)?;
        b.s3.clear()?;
        measure::sync();
        let file = dir_ref.join("etcdctl.db");
        let save = Measure::default().run(etcdctl(b).args(["snapshot", "save"]).arg(&file), &log)?;
        if std::fs::metadata(&file)?.len() > SINGLE_PUT_LIMIT {
            // One PUT cannot carry it (S3's limit), and curl does no multipart: the reference is
            // etcdctl's save alone, the issue's own yardstick for save+s3.
            eprintln!("xtask bench: the snapshot is above S3's 5 GiB single-PUT limit; the save+s3 reference is etcdctl's save alone");
            reset_dir(&dir_ref)?;
            return Ok((save.wall, save.maxrss_kib));
        }
        let put = Measure::default().run(&mut b.s3.curl_put(&file, "etcdctl.db"), &log)?;
        if std::fs::metadata(b.s3.root.join(servers::BUCKET).join("etcdctl.db"))?.len()
            != std::fs::metadata(&file)?.len()
        {
            bail!("the curl upload did not store the whole snapshot");
        }
        reset_dir(&dir_ref)?;
        Ok((save.wall + put.wall, save.maxrss_kib.max(put.maxrss_kib)))
    };
    let our_run = || our_save_s3(b, &dir_ours, &log, None);
    let row = interleaved(b, Scenario::SaveS3, reference, our_run)?;
    b.s3.clear()?;
    Ok(row)
}

/// One `etcd-snapshot save --s3` into an empty dir and bucket, encrypted to `recipients` if given.
fn our_save_s3(b: &Bench, dir: &Path, log: &Path, recipients: Option<&Path>) -> Result<Measured> {
    reset_dir(dir)?;
    b.s3.clear()?;
    measure::sync();
    let mut c = our_save(b, dir);
    c.args(["--s3", "--s3-endpoint", &b.s3.endpoint, "--s3-insecure", "--s3-bucket", servers::BUCKET]).args([
        "--s3-access-key",
        servers::ACCESS_KEY,
        "--s3-secret-key",
        servers::SECRET_KEY,
    ]);
    if let Some(r) = recipients {
        c.arg("--snapshot-encryption-recipients-file").arg(r);
    }
    let m = Measure::sampled().run(&mut c, log)?;
    if std::fs::read_dir(b.s3.root.join(servers::BUCKET))?.count() == 0 {
        bail!("etcd-snapshot save --s3 uploaded nothing; see {}", log.display());
    }
    if recipients.is_some()
        && !std::fs::read_dir(dir)?.flatten().any(|e| e.file_name().to_string_lossy().ends_with(".age"))
    {
        bail!("etcd-snapshot save with recipients wrote no .age file; see {}", log.display());
    }
    reset_dir(dir)?;
    Ok(m)
}

/// Encrypted save+S3 against our own unencrypted save+S3, interleaved the same way.
fn bench_save_s3_age(b: &Bench) -> Result<Row> {
    let (dir_plain, dir_age) = (b.work.join("s3-plain"), b.work.join("s3-age"));
    let log = b.logs.join("save-s3-age.log");
    let key = b.work.join("age.key");
    let _ = std::fs::remove_file(&key);
    run_checked(Command::new(&b.age_keygen).arg("-o").arg(&key), "age-keygen")?;
    let public = Command::new(&b.age_keygen).arg("-y").arg(&key).output().context("age-keygen -y")?;
    if !public.status.success() {
        bail!("age-keygen -y {} failed", key.display());
    }
    let recipients = b.work.join("age.pub");
    std::fs::write(&recipients, &public.stdout)?;
    let reference = || {
        let m = our_save_s3(b, &dir_plain, &log, None)?;
        Ok((m.wall, m.maxrss_kib))
    };
    let encrypted = || our_save_s3(b, &dir_age, &log, Some(&recipients));
    let row = interleaved(b, Scenario::SaveS3Age, reference, encrypted)?;
    b.s3.clear()?;
    Ok(row)
}

/// S3's largest single PUT: above it the save+s3 reference (one curl PUT) cannot run.
const SINGLE_PUT_LIMIT: u64 = 5 << 30;

/// The reference restore of `snap` in `dir`: `etcdutl snapshot restore`, etcd started on it until
/// `/health` is true, SIGTERM and wait. Returns its wall time and etcdutl's peak RSS.
fn reference_restore(b: &Bench, snap: &Path, dir: &Path, log: &Path) -> Result<(Duration, u64)> {
    let spec = EtcdSpec::new("bench", dir.join("etcd"))?;
    let mut c = Command::new(b.etcd_dir.join("etcdutl"));
    c.args(["snapshot", "restore"])
        .arg(snap)
        .arg(format!("--data-dir={}", spec.data_dir.display()))
        .arg(format!("--name={}", spec.name))
        .arg(format!("--initial-cluster={}", spec.initial_cluster()))
        .arg(format!("--initial-advertise-peer-urls={}", spec.peer_url()));
    let started = std::time::Instant::now();
    let restore = Measure::default().run(&mut c, log)?;
    let etcd = servers::start_etcd(&b.etcd_dir, &spec, &[], log)?;
    etcd.stop()?;
    Ok((started.elapsed(), restore.maxrss_kib))
}

/// `server --cluster-reset --cluster-reset-restore-path PATH` on the data dir `dir`, on free ports.
fn our_restore(b: &Bench, dir: &Path, path: &str) -> Result<Command> {
    our_restore_with(&b.bin, &b.etcd_dir, dir, path)
}

/// `server --cluster-reset` of `path` into the data dir `dir`, with etcd from `etcd_dir`, on
/// free loopback ports.
fn our_restore_with(bin: &Path, etcd_dir: &Path, dir: &Path, path: &str) -> Result<Command> {
    let mut c = ours_at(bin);
    c.args(["server", "--cluster-reset", "--cluster-reset-restore-path", path])
        .arg("--data-dir")
        .arg(dir)
        .arg("--etcd-bin-dir")
        .arg(etcd_dir)
        .args(["--node-name", "bench", "--token", "bench-token", "--bind-address", "127.0.0.1"])
        .args(["--etcd-client-port", &crate::child::free_port()?.to_string()])
        .args(["--etcd-peer-port", &crate::child::free_port()?.to_string()])
        .args(["--https-listen-port", &crate::child::free_port()?.to_string()]);
    Ok(c)
}

/// `restore` bumps the revision (the default); `restore-nobump` passes
/// `--cluster-reset-restore-bump-revision=0`, so the two rows give the bump's cost.
fn bench_restore(b: &Bench, snap: &Path, sc: Scenario) -> Result<Row> {
    let (dir_ref, dir_ours) = (b.work.join("restore-ref"), b.work.join("restore-ours"));
    let log = b.logs.join("restore.log");
    let reference = || {
        reset_dir(&dir_ref)?;
        measure::sync();
        let r = reference_restore(b, snap, &dir_ref, &log)?;
        reset_dir(&dir_ref)?;
        Ok(r)
    };
    let our_run = || {
        reset_dir(&dir_ours)?;
        measure::sync();
        let mut c = our_restore(b, &dir_ours, &snap.display().to_string())?;
        if sc == Scenario::RestoreNoBump {
            c.arg("--cluster-reset-restore-bump-revision=0");
        }
        let m = Measure::sampled().run(&mut c, &log)?;
        reset_dir(&dir_ours)?;
        Ok(m)
    };
    interleaved(b, sc, reference, our_run)
}

/// `restore-s3`: the snapshot as an object in the bucket (put with one curl PUT, untimed),
/// restored by its name: ours downloads, checks and restores it in one command (`--etcd-s3 …`);
/// the reference downloads it with one signed curl GET, then restores as above.
///
/// The object goes in through S3, not as a file linked into s3s-fs's directory: s3s-fs keeps the
/// ETag a PUT computed, as every S3 server does, and recomputes the MD5 of the whole object on
/// every GET and HEAD of a file it did not receive (2.4 s per request at 1.2 GB), which no real
/// store does and which made every ranged GET cost a pass over the object.
fn bench_restore_s3(b: &Bench, snap: &Path) -> Result<Row> {
    let (dir_ref, dir_ours) = (b.work.join("restore-s3-ref"), b.work.join("restore-s3-ours"));
    let log = b.logs.join("restore-s3.log");
    let name = "etcd-snapshot-bench-1";
    b.s3.clear()?;
    Measure::default()
        .run(&mut b.s3.curl_put(snap, name), &log)
        .with_context(|| format!("put {} into the bucket", snap.display()))?;
    let reference = || {
        reset_dir(&dir_ref)?;
        measure::sync();
        let file = dir_ref.join(name);
        let started = std::time::Instant::now();
        let get = Measure::default().run(&mut b.s3.curl_get(name, &file), &log)?;
        if std::fs::metadata(&file)?.len() != std::fs::metadata(snap)?.len() {
            bail!("the curl download did not fetch the whole snapshot; see {}", log.display());
        }
        let (_, rss) = reference_restore(b, &file, &dir_ref, &log)?;
        let wall = started.elapsed();
        reset_dir(&dir_ref)?;
        Ok((wall, rss.max(get.maxrss_kib)))
    };
    let our_run = || {
        reset_dir(&dir_ours)?;
        measure::sync();
        let mut c = our_restore(b, &dir_ours, name)?;
        c.args(["--etcd-s3", "--etcd-s3-endpoint", &b.s3.endpoint, "--etcd-s3-insecure"])
            .args(["--etcd-s3-bucket", servers::BUCKET, "--etcd-s3-access-key", servers::ACCESS_KEY])
            .args(["--etcd-s3-secret-key", servers::SECRET_KEY]);
        let m = Measure::sampled().run(&mut c, &log)?;
        reset_dir(&dir_ours)?;
        Ok(m)
    };
    let row = interleaved(b, Scenario::RestoreS3, reference, our_run)?;
    b.s3.clear()?;
    Ok(row)
}

fn bench_status(b: &Bench, snap: &Path, sc: Scenario) -> Result<Row> {
    let log = b.logs.join("status.log");
    let scratch = b.work.join("status-dir");
    let reference = || {
        let mut c = Command::new(b.etcd_dir.join("etcdutl"));
        c.args(["snapshot", "status", "-w", "json"]).arg(snap);
        let m = Measure::default().run(&mut c, &log)?;
        Ok((m.wall, m.maxrss_kib))
    };
    let our_run = || {
        reset_dir(&scratch)?;
        let mut c = ours(b);
        c.args(["etcd-snapshot", "status", "-o", "json"])
            .args((sc == Scenario::StatusFast).then_some("--skip-hash-check"))
            .arg(snap)
            .arg("--data-dir")
            .arg(b.work.join("k3s"))
            .arg("--dir")
            .arg(&scratch);
        Measure::sampled().run(&mut c, &log)
    };
    interleaved(b, sc, reference, our_run)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args> {
        parse_args(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn defaults_are_one_gib_three_runs_every_scenario() {
        let a = parse(&[]).unwrap();
        assert_eq!(
            (a.sizes_mib, a.runs, a.only, a.chart, a.keep),
            (vec![1024], 3, Scenario::ALL.to_vec(), false, false)
        );
    }

    #[test]
    fn every_flag_parses() {
        let a =
            parse(&["--size-mib", "512,128,512", "--runs", "5", "--only", "s3,status", "--chart", "--keep"]).unwrap();
        assert_eq!(a.sizes_mib, vec![128, 512], "sorted and deduplicated");
        assert_eq!(a.runs, 5);
        assert_eq!(a.only, vec![Scenario::SaveS3, Scenario::Status]);
        assert_eq!(parse(&["--only", "s3-age"]).unwrap().only, vec![Scenario::SaveS3Age]);
        assert!(a.chart && a.keep);
    }

    #[test]
    fn bad_values_are_refused() {
        for bad in [
            &["--runs", "0"][..],
            &["--size-mib", "0"],
            &["--size-mib", "x"],
            &["--only", "load"],
            &["--frobnicate"],
            &["--runs"],
            &["--chart"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}
