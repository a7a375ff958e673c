//! `cargo xtask demo`: what this project does, in one minute, against a real etcd.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::child::{free_port, KillOnDrop};
use crate::provision::{self, workspace_root};
use crate::run_checked;

/// Starts a throwaway plain-http etcd on loopback and waits until it answers.
pub fn start_etcd(bin_dir: &Path, data: &Path) -> Result<(KillOnDrop, String)> {
    let (cp, pp) = (free_port()?, free_port()?);
    let client = format!("http://127.0.0.1:{cp}");
    let peer = format!("http://127.0.0.1:{pp}");
    let log = std::fs::File::create(data.with_extension("log"))?;
    let child = Command::new(bin_dir.join("etcd"))
        .arg("--name=demo")
        .arg(format!("--data-dir={}", data.display()))
        .arg(format!("--listen-client-urls={client}"))
        .arg(format!("--advertise-client-urls={client}"))
        .arg(format!("--listen-peer-urls={peer}"))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg(format!("--initial-cluster=demo={peer}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("start etcd")?;
    let child = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = Command::new(bin_dir.join("etcdctl"))
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &client, "endpoint", "health"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Ok((child, client));
        }
        if Instant::now() > deadline {
            bail!("etcd did not become healthy within 30s; see {}", data.with_extension("log").display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn show(cmd: &mut Command) -> Result<()> {
    let shown: Vec<String> =
        std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|a| a.to_string_lossy().into_owned()).collect();
    println!("\n$ {}", shown.join(" "));
    run_checked(cmd, "run a demo step")
}

pub fn run() -> Result<()> {
    let tools = provision::ensure_all()?;
    let root = workspace_root();
    let mut build = tools.cargo();
    build.args(["build", "--quiet", "--locked", "-p", "k3s-snapshot-cli"]);
    run_checked(&mut build, "build k3s-snapshot")?;
    let bin = root.join("target/debug/k3s-snapshot");

    let work: PathBuf = root.join(format!("target/demo-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = demo(&tools, &bin, &work);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn demo(tools: &provision::Tools, bin: &Path, work: &Path) -> Result<()> {
    let etcd_dir = &tools.etcd35;
    println!("== starting a throwaway etcd 3.5.1 on loopback");
    let (_etcd, endpoint) = start_etcd(etcd_dir, &work.join("etcd-data"))?;
    println!("etcd is healthy at {endpoint}; writing 200 keys");
    for i in 0..200 {
        let st = Command::new(etcd_dir.join("etcdctl"))
            .args(["--endpoints", &endpoint, "put", &format!("/registry/demo/key-{i:03}"), &format!("value-{i}")])
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("etcdctl put failed");
        }
    }
    let dir = work.join("snapshots");
    let snap = |args: &[&str]| {
        let mut c = Command::new(bin);
        c.arg("etcd-snapshot")
            .args(args)
            .args(["--etcd-endpoints", &endpoint, "--node-name", "demo-node", "--dir"])
            .arg(&dir);
        c
    };
    println!("\n== three on-demand snapshots, one compressed");
    show(&mut snap(&["save", "--name", "demo"]))?;
    show(&mut snap(&["save", "--name", "demo"]))?;
    show(&mut snap(&["save", "--name", "demo", "--snapshot-compress"]))?;
    println!("\n== listing them");
    show(&mut snap(&["ls"]))?;
    println!("\n== pruning to the 2 newest of --name demo");
    show(&mut snap(&["prune", "--name", "demo", "--snapshot-retention", "2"]))?;
    show(&mut snap(&["ls", "-o", "json"]))?;
    let newest_raw = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_none())
        .max()
        .context("no uncompressed snapshot left")?;
    println!("\n== etcd's own tool agrees the snapshot is sound");
    show(Command::new(etcd_dir.join("etcdutl")).args(["snapshot", "status", "-w", "table"]).arg(&newest_raw))?;

    println!("\n== S3: a real S3 server (s3s-fs, SigV4 on) on loopback; save uploads in the same pass");
    let s3 = crate::bench::servers::start_s3(&tools.s3s_fs, &work.join("s3"), &work.join("s3s-fs.log"))?;
    let with_s3 = |args: &[&str]| {
        let mut c = snap(args);
        c.args(["--s3", "--s3-insecure", "--s3-endpoint", &s3.endpoint, "--s3-bucket"])
            .arg(crate::bench::servers::BUCKET)
            .args(["--s3-folder", "demo-cluster"])
            // The keys go through the environment, so the command line shown carries no secret.
            .env("AWS_ACCESS_KEY_ID", crate::bench::servers::ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", crate::bench::servers::SECRET_KEY);
        c
    };
    show(&mut with_s3(&["save", "--name", "demo-s3"]))?;
    show(&mut with_s3(&["ls"]))?;
    drop(s3);
    drop(_etcd);
    server_demo(etcd_dir, bin, work)?;
    println!("\nDemo done: snapshots were taken from a real etcd, listed, pruned, checked with etcdutl and");
    println!("uploaded to a real S3 server;");
    println!("the server ran etcd with TLS, took scheduled snapshots and kept 3 of them.");
    Ok(())
}

/// The server: etcd with TLS in k3s's data-dir layout, a snapshot every 3 seconds, retention 3.
fn server_demo(etcd_dir: &Path, bin: &Path, work: &Path) -> Result<()> {
    let data = work.join("k3s");
    let log_path = work.join("server.log");
    let args: Vec<String> = vec![
        "server".into(),
        format!("--data-dir={}", data.display()),
        "--node-name=demo-node".into(),
        "--advertise-address=127.0.0.1".into(),
        format!("--https-listen-port={}", free_port()?),
        format!("--etcd-client-port={}", free_port()?),
        format!("--etcd-peer-port={}", free_port()?),
        format!("--etcd-bin-dir={}", etcd_dir.display()),
        "--etcd-snapshot-schedule-cron=@every 3s".into(),
        "--etcd-snapshot-retention=3".into(),
    ];
    println!("\n== the server: etcd with TLS in k3s's layout, a scheduled snapshot every 3s, retention 3");
    println!("$ {} {}", bin.display(), args.join(" "));
    let log = std::fs::File::create(&log_path)?;
    let child = Command::new(bin).args(&args).stdout(Stdio::null()).stderr(log).spawn().context("start the server")?;
    let mut server = KillOnDrop(child);
    let snapshots = data.join("server/db/snapshots");
    let count = || {
        std::fs::read_dir(&snapshots)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().starts_with("etcd-snapshot-"))
                    .count()
            })
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    // Wait for five scheduled runs (retention keeps three), watching the server's log.
    while std::fs::read_to_string(&log_path).unwrap_or_default().matches("saved snapshot").count() < 5 {
        if let Some(st) = server.0.try_wait()? {
            bail!("the server exited ({st}); its log:\n{}", std::fs::read_to_string(&log_path).unwrap_or_default());
        }
        if Instant::now() > deadline {
            bail!(
                "no scheduled snapshots within 90s; the server's log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("five scheduled snapshots taken; retention kept {}", count());
    println!("\n== etcd-snapshot finds the server's etcd (TLS, client certificate) from --data-dir alone");
    show(Command::new(bin).args(["etcd-snapshot", "save", "--node-name", "demo-node", "--data-dir"]).arg(&data))?;
    show(Command::new(bin).args(["etcd-snapshot", "ls", "--data-dir"]).arg(&data))?;
    println!("\n== the server's log (excerpt)");
    for line in std::fs::read_to_string(&log_path)?.lines().filter(|l| !l.contains("etcd:")).take(14) {
        println!("  {line}");
    }
    // SIGTERM: the server stops etcd and exits 0.
    crate::signal(server.0.id(), nix::sys::signal::Signal::SIGTERM).context("stop the server")?;
    let st = server.0.wait()?;
    println!("\nserver stopped on SIGTERM ({st})");
    Ok(())
}
