//! `cargo xtask`: the project's own tasks. It provisions the real programs the tests need
//! (protoc, etcd 3.4.23 and 3.5.1, the s3s-fs S3 server, nginx for TLS), then runs the suite, the
//! demo or the benchmark. It depends on no crate that needs a system tool to build (no protoc, no
//! C library), because it is what installs everything else.

mod bench;
mod child;
mod demo;
mod dist;
mod e2e;
mod provision;

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Environment variables `k3s-snapshot` reads (its clap `env` names), cleared from every command
/// of ours that the bench and the e2e start, so that the caller's shell cannot leak in. The test
/// suite keeps the same list in `tests/support/bin.rs`.
pub const OUR_ENV: &[&str] = &[
    "K3S_DATA_DIR",
    "K3S_NODE_NAME",
    "K3S_TOKEN",
    "K3S_TOKEN_FILE",
    "K3S_ETCD_SERVER",
    "K3S_ETCD_TOKEN",
    "K3S_URL",
    "K3S_CONFIG_FILE",
    "K3S_CLUSTER_INIT",
    "K3S_CLUSTER_RESET",
    "K3S_ETCD_BIN_DIR",
    "K3S_SNAPSHOT_JITTER",
    "K3S_ETCD_SNAPSHOT_ENCRYPTION_RECIPIENTS_FILE",
    "K3S_ETCD_SNAPSHOT_ENCRYPTION_IDENTITY_FILE",
    "K3S_DEBUG",
    "K3S_LOG_FORMAT",
    "K3S_SNAPSHOT_LOG",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT",
    "AWS_EC2_METADATA_DISABLED",
    "NOTIFY_SOCKET",
];

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let task = args.next().unwrap_or_else(|| "help".into());
    let rest: Vec<String> = args.collect();
    match task.as_str() {
        "provision" => match rest.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
            ["--check"] => provision::report(&provision::check_all()),
            [] => {
                let tools = provision::ensure_all()?;
                for (k, v) in tools.env() {
                    println!("export {k}={}", v.display());
                }
                Ok(())
            }
            _ => bail!("usage: cargo xtask provision [--check]"),
        },
        "test" => test(&rest),
        "demo" => demo::run(),
        "dist" => dist::run(&rest),
        "e2e" => e2e::run(&rest),
        "bench" => bench::run(&rest),
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n\n\
                 tasks:\n  \
                 test [ARGS]   provision etcd 3.4.23 + 3.5.1, s3s-fs and nginx if missing, then run the whole suite\n  \
                 e2e [--seed N] [--iterations N] [--only NAME,…] [--etcd 3.5|3.4]\n                \
                 network namespaces (root): restore, S3 restore, HA restore, faults and continuous backup's RPO, on etcd 3.5.1 and 3.4.23\n  \
                 demo          provision, start a throwaway etcd and show save, ls and prune\n  \
                 bench [--size-mib N[,N…]] [--runs N] [--only save,s3,restore,status,delta-overhead] [--chart] [--keep]\n                \
                 release k3s-snapshot vs etcdctl/etcdutl: save, save+S3, reset-restore, status; medians, peak RSS;\n                \
                 the delta follower's cost to put latency\n  \
                 dist          build the release binary and write target/dist/k3s-snapshot-<version>-<triple>.tar.gz\n                \
                 (+ .sha256): binary, man pages, completions, systemd unit, example config, dashboard, alerts\n  \
                 provision     install what is missing, check each tool by using it, print the environment\n                \
                 the build and the tests use (`eval \"$(cargo xtask provision)\"` before a plain cargo build)\n  \
                 provision --check   only check each tool by using it; installs nothing"
            );
            if task == "help" {
                Ok(())
            } else {
                bail!("unknown task {task:?}")
            }
        }
    }
}

/// Provisions, builds the binary, runs every test of the workspace with the tools' locations in
/// the environment.
fn test(extra: &[String]) -> Result<()> {
    let tools = provision::ensure_all()?;
    let root = provision::workspace_root();
    let mut build = tools.cargo();
    build.args(["build", "--locked", "-p", "k3s-snapshot-cli"]);
    run_checked(&mut build, "build the k3s-snapshot binary")?;
    // The core as the fuzz targets and etcd-less embedders use it: without the `etcd` feature.
    let mut lean = tools.cargo();
    lean.args(["check", "--locked", "-p", "k3s-snapshot-core", "--no-default-features", "--lib"]);
    run_checked(&mut lean, "check k3s-snapshot-core without its etcd feature")?;
    // The release tarball's contents, packed around the debug binary, for the suite's dist tests.
    let bin = root.join("target/debug/k3s-snapshot");
    let tarball = dist::package(&bin, &root.join("target/debug/dist"))?;
    let mut test = tools.cargo();
    test.args(["test", "--locked", "--workspace", "--exclude", "xtask"]).args(extra);
    test.env("K3S_SNAPSHOT_BIN", &bin);
    test.env("K3S_SNAPSHOT_DIST", &tarball);
    run_checked(&mut test, "run the test suite")
}

/// Sends `sig` to `pid` (no `kill` binary: a minimal Debian has none without procps).
pub fn signal(pid: u32, sig: nix::sys::signal::Signal) -> Result<()> {
    let pid = i32::try_from(pid).context("pid out of range")?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).with_context(|| format!("send {sig} to {pid}"))
}

pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

pub fn run_checked(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {:?} to {what}", cmd.get_program()))?;
    if !status.success() {
        bail!("failed to {what} ({status})");
    }
    Ok(())
}
