//! `cargo xtask e2e`: the product end to end on a small network of Linux network namespaces, one
//! `k3s-snapshot server` per host and s3s-fs on its own host, on etcd 3.5.1 and 3.4.23:
//! restore on one server, restore from S3, HA restore with rejoining servers, and faults (the S3
//! link cut mid-upload, a partitioned etcd member, `kill -9` at random moments, a full disk).
//! Prints a table of results and fails when any scenario failed or was blocked.
//!
//! Needs root (namespaces, tmpfs) and iproute2. Everything it creates carries the `k3se2e`
//! prefix and is removed on exit, on failure and on Ctrl-C; a run that was killed is cleaned up by
//! the next one.

mod faults;
mod net;
mod node;
mod rpo;
mod scenarios;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::provision::{self, workspace_root};
use crate::run_checked;
use net::Net;
pub use node::{Etcd, Node, S3Host};

/// Marks a scenario that could not run because a feature it needs is missing; reported as
/// BLOCKED (and fails the run), never as a pass.
#[derive(Debug)]
pub struct Blocked(pub String);

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Blocked {}

struct Opts {
    seed: u64,
    iterations: usize,
    only: Vec<String>,
    versions: Vec<String>,
    keep: bool,
    no_build: bool,
    rpo_rates: Vec<u32>,
}

const USAGE: &str =
    "usage: cargo xtask e2e [--seed N] [--iterations N] [--only NAME[,NAME…]] [--etcd 3.5|3.4] [--rpo-rates N[,N…]] [--keep] [--no-build]\n\
scenarios: restore, s3-restore, ha-restore, s3-link-cut, s3-trickle, partition, kill9, disk-full, rpo";

fn parse(args: &[String]) -> Result<Opts> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64;
    let mut o = Opts {
        seed: now % 1_000_000,
        iterations: 6,
        only: Vec::new(),
        versions: Vec::new(),
        keep: false,
        no_build: false,
        rpo_rates: rpo::RATES.to_vec(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) => (f, Some(v.to_string())),
            None => (a.as_str(), None),
        };
        let mut value =
            || inline.clone().or_else(|| it.next().cloned()).with_context(|| format!("{flag} needs a value\n{USAGE}"));
        match flag {
            "--seed" => o.seed = value()?.parse().context("--seed")?,
            "--iterations" => o.iterations = value()?.parse().context("--iterations")?,
            "--only" => o.only.extend(value()?.split(',').map(String::from)),
            "--etcd" => o.versions.push(value()?),
            "--rpo-rates" => {
                o.rpo_rates = value()?
                    .split(',')
                    .map(|r| {
                        r.trim()
                            .parse::<u32>()
                            .ok()
                            .filter(|&r| r > 0)
                            .with_context(|| format!("--rpo-rates: {r:?} is not a positive number of writes/s"))
                    })
                    .collect::<Result<_>>()?
            }
            "--keep" => o.keep = true,
            "--no-build" => o.no_build = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => bail!("unknown argument {a:?}\n{USAGE}"),
        }
    }
    Ok(o)
}

/// Everything a scenario gets: the binary, the network, the hosts, the S3 server, options.
pub struct Ctx {
    pub bin: PathBuf,
    /// The load generator (`crates/loadgen`), built with the binary.
    pub loadgen: PathBuf,
    pub net: Net,
    pub s3: S3Host,
    /// Server hosts: (name, namespace, address).
    hosts: Vec<(String, String, String)>,
    pub seed: u64,
    pub iterations: usize,
    /// Write rates of the `rpo` scenario (default [`rpo::RATES`]).
    pub rpo_rates: Vec<u32>,
}

impl Ctx {
    /// The three server hosts with data dirs under `dir`, on `etcd`.
    pub fn nodes(&self, dir: &Path, etcd: &Etcd) -> Vec<Node> {
        self.hosts
            .iter()
            .map(|(name, ns, ip)| Node {
                name: name.clone(),
                ns: ns.clone(),
                ip: ip.clone(),
                dir: dir.join(name),
                etcd: etcd.clone(),
                bin: self.bin.clone(),
            })
            .collect()
    }
}

type Scenario = fn(&Ctx, &Etcd, &Path) -> Result<String>;

const SCENARIOS: &[(&str, Scenario)] = &[
    ("restore", scenarios::restore),
    ("s3-restore", scenarios::s3_restore),
    ("ha-restore", scenarios::ha_restore),
    ("s3-link-cut", faults::s3_link_cut),
    ("s3-trickle", faults::s3_trickle),
    ("partition", faults::partition),
    ("kill9", faults::kill9),
    ("disk-full", faults::disk_full),
    ("rpo", rpo::rpo),
];

struct Row {
    scenario: &'static str,
    etcd: &'static str,
    result: &'static str,
    secs: f64,
    detail: String,
}

/// Only one e2e run at a time (they share the namespace names and the address range): a lock
/// file holding our pid, taken over when its owner is dead.
struct RunLock(PathBuf);

impl RunLock {
    fn take(path: PathBuf) -> Result<RunLock> {
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        for _ in 0..3 {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    use std::io::Write;
                    writeln!(f, "{}", std::process::id())?;
                    return Ok(RunLock(path));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_to_string(&path).unwrap_or_default().trim().parse::<u32>().ok();
                    // A live owner has a command line (a zombie's is empty) naming xtask.
                    let alive = |p: &u32| {
                        std::fs::read(format!("/proc/{p}/cmdline"))
                            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("xtask"))
                    };
                    if let Some(pid) = owner.filter(alive) {
                        bail!(
                            "another `cargo xtask e2e` runs (pid {pid}, lock {}); wait for it or stop it",
                            path.display()
                        );
                    }
                    std::fs::remove_file(&path)?;
                }
                Err(e) => return Err(e).with_context(|| format!("create {}", path.display())),
            }
        }
        bail!("cannot take the e2e lock {}", path.display())
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn run(args: &[String]) -> Result<()> {
    let opts = parse(args)?;
    for name in &opts.only {
        if !SCENARIOS.iter().any(|(n, _)| n == name) {
            bail!("unknown scenario {name:?}\n{USAGE}");
        }
    }
    if !Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false) {
        bail!("cargo xtask e2e needs root (network namespaces, tmpfs mounts); run it as root");
    }
    let started = Instant::now();
    let tools = provision::ensure_all()?;
    let root = workspace_root();
    let bin = root.join("target/debug/k3s-snapshot");
    let loadgen = root.join("target/debug/loadgen");
    if opts.no_build {
        for b in [&bin, &loadgen] {
            if !b.is_file() {
                bail!("--no-build, but {} is not built", b.display());
            }
        }
    } else {
        let mut build = tools.cargo();
        build.args(["build", "--locked", "-p", "k3s-snapshot-cli", "-p", "loadgen"]);
        run_checked(&mut build, "build the k3s-snapshot binary and the load generator")?;
    }

    let e2e_root = root.join("target/e2e");
    let _lock = RunLock::take(e2e_root.join("lock"))?;
    net::install_interrupt_handler();
    net::sweep(&e2e_root)?;
    let work = e2e_root.join("last");
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("remove {}", work.display()))?;
    }
    std::fs::create_dir_all(&work)?;

    let mut versions = vec![
        Etcd { label: "3.5.1", bin_dir: tools.etcd35.clone() },
        Etcd { label: "3.4.23", bin_dir: tools.etcd34.clone() },
    ];
    if !opts.versions.is_empty() {
        versions.retain(|v| opts.versions.iter().any(|w| v.label.starts_with(w.as_str())));
        if versions.is_empty() {
            bail!("--etcd takes 3.5 or 3.4");
        }
    }

    println!(
        "e2e: seed {} (repeat with --seed {}), {} kill -9 iterations, logs in {}",
        opts.seed,
        opts.seed,
        opts.iterations,
        work.display()
    );
    let mut net = Net::create()?;
    let mut hosts = Vec::new();
    for (i, name) in ["node1", "node2", "node3"].iter().enumerate() {
        let ip = format!("10.77.0.{}", i + 1);
        let ns = net.add_host(name, &ip)?;
        hosts.push((name.to_string(), ns, ip));
    }
    let s3_ns = net.add_host("objstore", node::S3_IP)?;
    let s3 = S3Host::start(&s3_ns, &tools.s3s_fs, &work.join("objstore"))?;
    let ctx = Ctx {
        bin,
        loadgen,
        net,
        s3,
        hosts,
        seed: opts.seed,
        iterations: opts.iterations,
        rpo_rates: opts.rpo_rates.clone(),
    };

    let mut rows = Vec::new();
    for (name, scenario) in SCENARIOS {
        if !opts.only.is_empty() && !opts.only.iter().any(|o| o == name) {
            continue;
        }
        for etcd in &versions {
            let dir = work.join(format!("{name}-{}", etcd.short()));
            std::fs::create_dir_all(&dir)?;
            println!("e2e: {name} on etcd {} …", etcd.label);
            let t = Instant::now();
            let outcome = scenario(&ctx, etcd, &dir);
            let secs = t.elapsed().as_secs_f64();
            let (result, detail) = match &outcome {
                Ok(note) => ("PASS", note.clone()),
                Err(e) if e.downcast_ref::<Blocked>().is_some() => ("BLOCKED", format!("{e:#}")),
                Err(e) => ("FAIL", format!("{e:#}")),
            };
            println!(
                "e2e: {name} on etcd {}: {result} in {secs:.1}s{}",
                etcd.label,
                if detail.is_empty() { String::new() } else { format!(": {detail}") }
            );
            net::check_interrupted()?;
            if result == "PASS" && !opts.keep {
                remove_dir_all_unmounted(&dir);
            }
            rows.push(Row { scenario: name, etcd: etcd.label, result, secs, detail });
        }
    }
    drop(ctx);

    println!("\n{:<12}  {:<7}  {:<8}  {:>7}  detail", "scenario", "etcd", "result", "time");
    for r in &rows {
        let mut detail = r.detail.replace('\n', " ");
        if detail.len() > 160 {
            let mut cut = 157;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
            detail.push_str("...");
        }
        println!("{:<12}  {:<7}  {:<8}  {:>6.1}s  {detail}", r.scenario, r.etcd, r.result, r.secs);
    }
    println!(
        "total {:.0}s (seed {}); logs of failed scenarios in {}",
        started.elapsed().as_secs_f64(),
        opts.seed,
        work.display()
    );
    let bad = rows.iter().filter(|r| r.result != "PASS").count();
    if bad > 0 {
        bail!("{bad} of {} e2e scenarios did not pass", rows.len());
    }
    if rows.is_empty() {
        bail!("no scenario selected");
    }
    Ok(())
}

fn remove_dir_all_unmounted(dir: &Path) {
    net::unmount_below(dir);
    let _ = std::fs::remove_dir_all(dir);
}

/// A small deterministic generator (xorshift64*) for `--seed`.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[0, n)` (from the high bits, the better ones of xorshift).
    pub fn below(&mut self, n: u64) -> u64 {
        (self.next() >> 16) % n.max(1)
    }

    /// Uniform in `[0, d]`, in milliseconds.
    pub fn duration_upto(&mut self, d: Duration) -> Duration {
        Duration::from_millis(self.below(d.as_millis() as u64 + 1))
    }
}
