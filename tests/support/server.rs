//! `k3s-snapshot server` as a child process on free loopback ports, with a real etcd, stopped on drop.
//!
//! Readiness is observed, never slept for: [`Server::start`] returns once the server logged that it
//! is running (etcd answered over TLS by then), and the wait helpers poll a condition with a deadline.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use k3s_snapshot_core::etcd::{EtcdClientConfig, EtcdConnection};

use super::etcd::{free_port, EtcdVersion};

/// The log line that says the server is up (etcd ready, API listening, scheduler started), with
/// the start of its fields: S3 errors say "check ... that the s3 server is running", which a
/// server started while S3 is down may log first.
pub const RUNNING: &str = "server is running node=";

/// A data dir that outlives server processes (start, stop, reset, start again).
pub struct DataDir {
    pub tmp: tempfile::TempDir,
    pub version: EtcdVersion,
    pub node: String,
    pub api_port: u16,
    pub client_port: u16,
    pub peer_port: u16,
    /// Advertise and bind address: `127.0.0.1`, or another loopback address for a cluster.
    pub ip: String,
}

impl DataDir {
    pub fn new(version: EtcdVersion) -> DataDir {
        DataDir::on(version, "node-a", "127.0.0.1")
    }

    /// A data dir for a server named `node` on loopback address `ip` (all of 127.0.0.0/8 is
    /// loopback on Linux), so that three servers can run side by side.
    pub fn on(version: EtcdVersion, node: &str, ip: &str) -> DataDir {
        DataDir {
            tmp: tempfile::tempdir().unwrap(),
            version,
            node: node.into(),
            api_port: free_port(),
            client_port: free_port(),
            peer_port: free_port(),
            ip: ip.into(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.tmp.path().join("k3s")
    }

    pub fn db(&self) -> PathBuf {
        self.path().join("server/db")
    }

    pub fn snapshots(&self) -> PathBuf {
        self.db().join("snapshots")
    }

    /// `k3s-snapshot server` with this data dir, its ports, the etcd of its version, no jitter.
    pub fn command(&self, extra: &[&str]) -> Command {
        let mut c = super::bin::cmd();
        c.arg("server");
        let defaults = [
            ("--data-dir", self.path().display().to_string()),
            ("--node-name", self.node.clone()),
            ("--https-listen-port", self.api_port.to_string()),
            ("--etcd-client-port", self.client_port.to_string()),
            ("--etcd-peer-port", self.peer_port.to_string()),
            ("--etcd-bin-dir", self.version.bin_dir().display().to_string()),
            ("--etcd-snapshot-jitter", "0s".to_string()),
        ];
        let address = [("--advertise-address", self.ip.clone()), ("--bind-address", self.ip.clone())];
        let defaults = defaults.into_iter().chain(address.into_iter().filter(|_| self.ip != "127.0.0.1"));
        // A flag given in `extra` (as --flag=value) replaces its default.
        for (flag, value) in defaults {
            if !extra.iter().any(|e| e.starts_with(&format!("{flag}="))) {
                c.arg(format!("{flag}={value}"));
            }
        }
        c.args(extra);
        c
    }

    /// Runs a command to completion (a reset, a refused start), its output captured.
    pub fn run(&self, extra: &[&str]) -> super::bin::Run {
        super::bin::run(&mut self.command(extra))
    }

    /// Starts a server and waits until it runs.
    pub fn start(&self, extra: &[&str]) -> Server {
        let mut s = self.spawn(extra);
        s.wait_for_log(RUNNING, Duration::from_secs(120));
        s
    }

    /// Starts a server without waiting for it (a member that needs its peers to have quorum).
    pub fn spawn(&self, extra: &[&str]) -> Server {
        self.spawn_command(self.command(extra))
    }

    /// Starts `cmd` (from [`DataDir::command`], changed by the caller) without waiting for it.
    pub fn spawn_command(&self, mut cmd: Command) -> Server {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self.tmp.path().join(format!("server-{n}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start k3s-snapshot server: {e}"));
        Server { child: Some(child), log, data_dir: self.path(), api_port: self.api_port, ip: self.ip.clone() }
    }

    /// `https://IP:API_PORT`: what a joining server passes to `--server`.
    pub fn url(&self) -> String {
        format!("https://{}:{}", self.ip, self.api_port)
    }

    /// The cluster token this server wrote (`server/token`).
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.path().join("server/token")).unwrap().trim().to_string()
    }

    /// `--server` and `--token` to join the cluster of `first`.
    pub fn join_args(first: &DataDir, token: &str) -> Vec<String> {
        vec![format!("--server={}", first.url()), format!("--token={token}")]
    }

    /// How tools reach this server's etcd, found from the config file it wrote for etcd.
    pub fn etcd_config(&self) -> EtcdClientConfig {
        EtcdClientConfig::for_data_dir(&self.path()).unwrap()
    }
}

/// A running `k3s-snapshot server`.
pub struct Server {
    child: Option<Child>,
    pub log: PathBuf,
    pub data_dir: PathBuf,
    pub api_port: u16,
    pub ip: String,
}

impl Server {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits until the log contains `needle`; fails if the server exits first or time runs out.
    #[track_caller]
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_text().contains(needle) {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("server exited ({status}) before logging {needle:?}:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "server did not log {needle:?} within {timeout:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM to the server only (not its etcd).
    pub fn sigterm(&self) {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    }

    /// Waits for the server to exit.
    #[track_caller]
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                self.child = None;
                return s;
            }
            assert!(Instant::now() < deadline, "server did not exit within {timeout:?}:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and wait; asserts exit 0.
    #[track_caller]
    pub fn stop(mut self) {
        self.sigterm();
        let s = self.wait(Duration::from_secs(60));
        assert!(s.success(), "server exited with {s}:\n{}", self.log_text());
    }

    /// `https://IP:PORT`
    pub fn api(&self) -> String {
        format!("https://{}:{}", self.ip, self.api_port)
    }

    /// An https client that trusts the cluster CA.
    pub fn http(&self) -> reqwest::Client {
        let ca = std::fs::read(self.data_dir.join("server/tls/server-ca.crt")).unwrap();
        reqwest::Client::builder().add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap()).build().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            // The server was killed, so its etcd (in its own process group) is killed here.
            for pid in etcd_pids(&self.data_dir) {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

/// Pids of etcd processes (and restore tools) whose config file or data dir is under this k3s
/// data dir: the server starts etcd with `--config-file=<db>/etcd/config`, the restore tools run
/// with `--data-dir`.
pub fn etcd_pids(data_dir: &Path) -> Vec<u32> {
    let db = data_dir.join("server/db");
    let needles = [format!("--config-file={}", db.display()), format!("--data-dir={}", db.display())];
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.split('\0').any(|a| needles.iter().any(|n| a.starts_with(n.as_str()))) {
            // A zombie has an empty cmdline, so a match is a live process.
            out.push(pid);
        }
    }
    out
}

/// Connects to the server's etcd over TLS with the client certificate.
pub async fn connect(dd: &DataDir) -> EtcdConnection {
    dd.etcd_config().connect().await.unwrap()
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
#[track_caller]
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Files in a dir, sorted.
pub fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// A one-shot current-thread runtime for async helpers in sync tests.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

/// Writes keys through the server's etcd (TLS, client certificate).
pub fn put(dd: &DataDir, kvs: &[(&str, &str)]) {
    block_on(async {
        let mut c = connect(dd).await;
        for (k, v) in kvs {
            c.client.put(*k, *v, None).await.unwrap();
        }
    })
}

/// Deletes a key through the server's etcd.
pub fn delete(dd: &DataDir, k: &str) {
    block_on(async { connect(dd).await.client.delete(k, None).await.unwrap() });
}

/// Every key and value in the server's etcd, sorted.
pub fn all_keys(dd: &DataDir) -> Vec<(String, String)> {
    block_on(async {
        let mut c = connect(dd).await;
        let r = c.client.get("", Some(etcd_client::GetOptions::new().with_all_keys())).await.unwrap();
        r.kvs().iter().map(|kv| (kv.key_str().unwrap().to_string(), kv.value_str().unwrap().to_string())).collect()
    })
}

/// Owned key-value pairs, to compare with [`all_keys`].
pub fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// `etcd-snapshot save` against the running server; returns the new snapshot's path.
#[track_caller]
pub fn save(dd: &DataDir, extra: &[&str]) -> PathBuf {
    let before = files(&dd.snapshots());
    let data_dir = dd.path().display().to_string();
    let mut c = super::bin::cmd();
    c.args(["etcd-snapshot", "save", "--data-dir", &data_dir, "--node-name", &dd.node]).args(extra);
    super::bin::run(&mut c).assert_ok();
    let new: Vec<_> = files(&dd.snapshots()).into_iter().filter(|f| !before.contains(f)).collect();
    assert_eq!(new.len(), 1, "{new:?}");
    dd.snapshots().join(&new[0])
}

/// A server on `dd` (scheduled snapshots off) holding the key `from-s3`, and one snapshot of it
/// saved with `flags` (the S3 server flags, so it is uploaded too). Returns the running server,
/// the local snapshot's path and its file name (the object's name); the caller stops the server.
pub fn server_with_uploaded_snapshot(dd: &DataDir, flags: &[&str]) -> (Server, PathBuf, String) {
    let s = dd.start(&["--etcd-disable-snapshots"]);
    put(dd, &[("from-s3", "1")]);
    let snap = save(dd, flags);
    let name = snap.file_name().unwrap().to_string_lossy().into_owned();
    (s, snap, name)
}

/// What a cluster reset logs (exactly) when it is done.
pub const RESET_DONE: &str = "Managed etcd cluster membership has been reset, restart without --cluster-reset flag now. Backup and delete ${datadir}/server/db on each peer etcd server and rejoin the nodes";

/// A reset that succeeded: exit 0, [`RESET_DONE`] logged, `reset-flag` written.
#[track_caller]
pub fn assert_reset_done(r: &super::bin::Run, dd: &DataDir) {
    r.assert_ok();
    assert!(r.stderr.contains(RESET_DONE), "the reset message is missing:\n{}", r.stderr);
    assert!(dd.db().join("reset-flag").is_file());
}
