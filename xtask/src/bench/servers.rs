//! The programs the benchmark runs against: a plain-http etcd on loopback, s3s-fs with
//! authentication on, and the loader that fills etcd with incompressible 1 MiB values.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::child::{free_port, KillOnDrop};

/// A running etcd, killed on drop.
pub struct Etcd {
    pub child: KillOnDrop,
    pub client_url: String,
}

/// How an etcd is laid out: its name, data dir and ports.
pub struct EtcdSpec {
    pub name: String,
    pub data_dir: PathBuf,
    pub client_port: u16,
    pub peer_port: u16,
}

impl EtcdSpec {
    pub fn new(name: &str, data_dir: PathBuf) -> Result<Self> {
        Ok(EtcdSpec { name: name.into(), data_dir, client_port: free_port()?, peer_port: free_port()? })
    }

    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    pub fn initial_cluster(&self) -> String {
        format!("{}={}", self.name, self.peer_url())
    }
}

/// Starts etcd (plain http on loopback) and returns once `/health` says true.
pub fn start_etcd(bin_dir: &Path, spec: &EtcdSpec, extra: &[&str], log: &Path) -> Result<Etcd> {
    let client = format!("http://127.0.0.1:{}", spec.client_port);
    let peer = spec.peer_url();
    let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let child = Command::new(bin_dir.join("etcd"))
        .arg(format!("--name={}", spec.name))
        .arg(format!("--data-dir={}", spec.data_dir.display()))
        .arg(format!("--listen-client-urls={client}"))
        .arg(format!("--advertise-client-urls={client}"))
        .arg(format!("--listen-peer-urls={peer}"))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg(format!("--initial-cluster={}", spec.initial_cluster()))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .context("start etcd")?;
    let mut etcd = Etcd { child: KillOnDrop(child), client_url: client };
    wait_healthy(&mut etcd.child.0, spec.client_port, log)?;
    Ok(etcd)
}

impl Etcd {
    /// SIGTERM, then waits for etcd to exit (it closes its db cleanly).
    pub fn stop(mut self) -> Result<()> {
        super::measure::terminate(self.child.0.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.child.0.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("etcd did not stop within 30s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Polls `GET /health` every few milliseconds: etcd answers true once it has a leader and serves.
fn wait_healthy(child: &mut Child, port: u16, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if health(port) {
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            bail!("etcd exited with {st} before it was healthy; see {}", log.display());
        }
        if Instant::now() > deadline {
            bail!("etcd was not healthy within 120s; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn health(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

/// s3s-fs with SigV4 authentication on, serving `root/<bucket>`.
pub struct S3 {
    _child: KillOnDrop,
    pub endpoint: String,
    pub root: PathBuf,
}

pub const ACCESS_KEY: &str = "k3s-snapshot-bench";
pub const SECRET_KEY: &str = "bench-Secret-7Hq2LmX9";
pub const BUCKET: &str = "bench";

pub fn start_s3(bin: &Path, root: &Path, log: &Path) -> Result<S3> {
    std::fs::create_dir_all(root.join(BUCKET))?;
    let port = free_port()?;
    let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let child = Command::new(bin)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--access-key",
            ACCESS_KEY,
            "--secret-key",
            SECRET_KEY,
        ])
        .arg(root)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .context("start s3s-fs")?;
    let mut child = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_err() {
        if let Some(st) = child.0.try_wait()? {
            bail!("s3s-fs exited with {st}; see {}", log.display());
        }
        if Instant::now() > deadline {
            bail!("s3s-fs did not listen within 20s; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(S3 { _child: child, endpoint: format!("127.0.0.1:{port}"), root: root.to_path_buf() })
}

impl S3 {
    /// s3s-fs's process id, for its CPU time.
    pub fn pid(&self) -> u32 {
        self._child.0.id()
    }

    /// Empties the bucket between runs (s3s-fs keeps objects as files under its root).
    pub fn clear(&self) -> Result<()> {
        let b = self.root.join(BUCKET);
        std::fs::remove_dir_all(&b)?;
        std::fs::create_dir_all(&b)?;
        Ok(())
    }

    /// A single SigV4-signed GET of `key` into `file` with curl.
    pub fn curl_get(&self, key: &str, file: &Path) -> Command {
        let mut c = Command::new("curl");
        c.args(["--silent", "--show-error", "--fail", "--output"])
            .arg(file)
            .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user", &format!("{ACCESS_KEY}:{SECRET_KEY}")])
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .arg(format!("http://{}/{BUCKET}/{key}", self.endpoint));
        c
    }

    /// A single SigV4-signed PUT of `file` with curl (UNSIGNED-PAYLOAD, as large uploads do).
    pub fn curl_put(&self, file: &Path, key: &str) -> Command {
        let mut c = Command::new("curl");
        c.args(["--silent", "--show-error", "--fail", "--output", "/dev/null"])
            .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user", &format!("{ACCESS_KEY}:{SECRET_KEY}")])
            .args([
                "-H",
                "x-amz-content-sha256: UNSIGNED-PAYLOAD",
                "-H",
                "Content-Type: application/octet-stream",
                "-T",
            ])
            .arg(file)
            .arg(format!("http://{}/{BUCKET}/{key}", self.endpoint));
        c
    }
}

/// Puts keys `/bench/key-<from..to>` with 1 MiB values from /dev/urandom, `parallel` etcdctl
/// processes at a time, each reading its value from stdin.
pub fn load(etcdctl: &Path, endpoint: &str, from: usize, to: usize, parallel: usize) -> Result<()> {
    let next = AtomicUsize::new(from);
    let started = Instant::now();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..parallel)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut urandom = std::fs::File::open("/dev/urandom")?;
                    let mut value = vec![0u8; 1 << 20];
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= to {
                            return Ok(());
                        }
                        urandom.read_exact(&mut value)?;
                        let mut child = Command::new(etcdctl)
                            .args(["--endpoints", endpoint, "put", &format!("/bench/key-{i:06}")])
                            .stdin(Stdio::piped())
                            .stdout(Stdio::null())
                            .stderr(Stdio::piped())
                            .spawn()
                            .context("start etcdctl put")?;
                        child.stdin.take().context("etcdctl stdin")?.write_all(&value)?;
                        let out = child.wait_with_output()?;
                        if !out.status.success() {
                            bail!(
                                "etcdctl put /bench/key-{i:06} failed: {}",
                                String::from_utf8_lossy(&out.stderr).trim()
                            );
                        }
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().map_err(|_| anyhow::anyhow!("a loader thread panicked"))?)
    })?;
    eprintln!("xtask bench: loaded {} MiB of values in {:.1}s", to - from, started.elapsed().as_secs_f64());
    Ok(())
}
