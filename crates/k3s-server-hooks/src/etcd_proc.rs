//! Running the real `etcd`: finding its binaries, starting it from its own config file (as k3s
//! does) with TLS everywhere, forwarding its logs into `tracing`, waiting until it is ready,
//! noticing when it dies, and stopping it.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k3s_snapshot_core::etcd::{EtcdClientConfig, EtcdConnection};
use k3s_snapshot_core::etcd_config::{EtcdConfigFile, TransportSecurity};
use k3s_snapshot_core::store::create_private_dir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::tls::TlsFiles;
use crate::{Error, Result};

/// How many of etcd's last log lines an error report carries.
const LAST_LINES: usize = 12;

/// `etcd` and the restore tool found beside it.
#[derive(Debug, Clone)]
pub struct EtcdBinaries {
    pub etcd: PathBuf,
    /// etcd 3.5+: `etcdutl snapshot restore`.
    pub etcdutl: Option<PathBuf>,
    /// etcd 3.4: `ETCDCTL_API=3 etcdctl snapshot restore`.
    pub etcdctl: Option<PathBuf>,
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

impl EtcdBinaries {
    /// Looks in `--etcd-bin-dir` when given, else on `PATH`.
    pub fn find(bin_dir: Option<&Path>) -> Result<Self> {
        let etcd = match bin_dir {
            Some(dir) => {
                let p = dir.join("etcd");
                if !is_executable(&p) {
                    return Err(Error::Binary {
                        program: "etcd".into(),
                        detail: format!("{} is not an executable; check --etcd-bin-dir (K3S_ETCD_BIN_DIR)", p.display()),
                    });
                }
                p
            }
            None => std::env::var_os("PATH")
                .iter()
                .flat_map(std::env::split_paths)
                .map(|d| d.join("etcd"))
                .find(|p| is_executable(p))
                .ok_or_else(|| Error::Binary {
                    program: "etcd".into(),
                    detail: "it is not on PATH; install etcd or point --etcd-bin-dir (K3S_ETCD_BIN_DIR) at the directory that holds it".into(),
                })?,
        };
        let dir = etcd.parent().unwrap_or(Path::new("/")).to_path_buf();
        let beside = |n: &str| Some(dir.join(n)).filter(|p| is_executable(p));
        Ok(EtcdBinaries { etcdutl: beside("etcdutl"), etcdctl: beside("etcdctl"), etcd })
    }
}

/// Everything etcd is started with. etcd gets it as its own config file
/// (`<data dir>/config`, see [`EtcdConfigFile`]) and `--config-file`, as k3s runs its embedded
/// etcd, so that tools find etcd from the same file on our nodes and on k3s's.
#[derive(Debug, Clone)]
pub struct EtcdLaunch {
    pub name: String,
    pub data_dir: PathBuf,
    /// `https://ADVERTISE:CLIENT_PORT`
    pub client_url: String,
    /// `https://PEER_ADDRESS:PEER_PORT`
    pub peer_url: String,
    /// `name=peer_url,...`
    pub initial_cluster: String,
    /// `new` or `existing` (joining).
    pub initial_cluster_state: String,
    pub force_new_cluster: bool,
    pub metrics_url: Option<String>,
    pub tls: TlsFiles,
    /// `--etcd-arg` values: `key=value` with or without leading dashes.
    pub extra_args: Vec<String>,
}

/// etcd's defaults (milliseconds), written out because k3s's file always carries both keys.
const HEARTBEAT_INTERVAL_MS: u64 = 100;
const ELECTION_TIMEOUT_MS: u64 = 1000;

impl EtcdLaunch {
    /// `<data dir>/config`: where k3s keeps etcd's config file (`${data-dir}/server/db/etcd/config`).
    pub fn config_path(&self) -> PathBuf {
        self.data_dir.join("config")
    }

    /// The client URL on loopback (`https://127.0.0.1:CLIENT_PORT`, or `[::1]` for an IPv6
    /// address). etcd listens there beside the advertised URL, as under k3s, and local clients
    /// (this server, `etcd-snapshot`, k3s's tools) connect there.
    pub fn loopback_client_url(&self) -> String {
        let (scheme, rest) = self.client_url.split_once("://").unwrap_or(("https", &self.client_url));
        let port = rest.rsplit_once(':').map(|(_, p)| p).unwrap_or("2379");
        let host = if rest.starts_with('[') { "[::1]" } else { "127.0.0.1" };
        format!("{scheme}://{host}:{port}")
    }

    /// `listen-client-urls`: loopback first, then the advertised URL (once, if they are the same).
    fn listen_client_urls(&self) -> String {
        let lo = self.loopback_client_url();
        if lo == self.client_url {
            lo
        } else {
            format!("{lo},{}", self.client_url)
        }
    }

    /// etcd's config file for this launch.
    pub fn config_file(&self) -> EtcdConfigFile {
        EtcdConfigFile {
            name: self.name.clone(),
            data_dir: self.data_dir.clone(),
            listen_client_urls: self.listen_client_urls(),
            advertise_client_urls: self.client_url.clone(),
            listen_peer_urls: self.peer_url.clone(),
            initial_advertise_peer_urls: self.peer_url.clone(),
            initial_cluster: self.initial_cluster.clone(),
            initial_cluster_state: self.initial_cluster_state.clone(),
            listen_metrics_urls: self.metrics_url.clone().unwrap_or_default(),
            client_transport_security: TransportSecurity {
                cert_file: self.tls.etcd_server_cert.clone(),
                key_file: self.tls.etcd_server_key.clone(),
                trusted_ca_file: self.tls.etcd_server_ca.clone(),
                client_cert_auth: true,
            },
            peer_transport_security: TransportSecurity {
                cert_file: self.tls.etcd_peer_cert.clone(),
                key_file: self.tls.etcd_peer_key.clone(),
                trusted_ca_file: self.tls.etcd_peer_ca.clone(),
                client_cert_auth: true,
            },
            force_new_cluster: self.force_new_cluster,
            heartbeat_interval: HEARTBEAT_INTERVAL_MS,
            election_timeout: ELECTION_TIMEOUT_MS,
            logger: "zap".into(),
            log_outputs: vec!["stderr".into()],
            extra_args: self.extra_args.clone(),
        }
    }

    /// etcd's command line: only the config file (etcd ignores other flags when given one).
    pub fn args(&self) -> Vec<String> {
        vec![format!("--config-file={}", self.config_path().display())]
    }

    /// What our own checks, the scheduler and the API use to reach this etcd: the loopback
    /// listener, with the tools' client certificate.
    pub fn client_config(&self) -> EtcdClientConfig {
        EtcdClientConfig {
            endpoints: vec![self.loopback_client_url()],
            cacert: Some(self.tls.etcd_server_ca.clone()),
            cert: Some(self.tls.etcd_client_cert.clone()),
            key: Some(self.tls.etcd_client_key.clone()),
        }
    }
}

/// A running etcd. Killed and reaped when dropped.
pub struct EtcdProcess {
    child: Child,
    last: Arc<Mutex<VecDeque<String>>>,
    logs: Vec<tokio::task::JoinHandle<()>>,
    _registered: Option<crate::children::Registered>,
}

fn remember(last: &Mutex<VecDeque<String>>, line: String) {
    let mut l = last.lock().expect("etcd log buffer");
    if l.len() == LAST_LINES {
        l.pop_front();
    }
    l.push_back(line);
}

/// Forwards one line of etcd's zap JSON log (or plain text) to `tracing` and returns its message.
fn forward(line: &str) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_str(line).ok();
    let Some(v) = parsed.filter(|v| v.is_object()) else {
        tracing::info!(target: "etcd", "{line}");
        return line.to_string();
    };
    let level = v.get("level").and_then(|l| l.as_str()).unwrap_or("info");
    let msg = v.get("msg").and_then(|m| m.as_str()).unwrap_or_default();
    let err = v.get("error").and_then(|m| m.as_str());
    let summary = match err {
        Some(e) => format!("{msg}: {e}"),
        None => msg.to_string(),
    };
    match level {
        "debug" => tracing::debug!(target: "etcd", "{summary}"),
        "info" => tracing::info!(target: "etcd", "{summary}"),
        "warn" => tracing::warn!(target: "etcd", "{summary}"),
        _ => tracing::error!(target: "etcd", "{summary}"),
    }
    summary
}

/// Fails with [`Error::Port`] when a port cannot be bound now (etcd would fail later, less clearly).
pub fn check_port_free(what: &'static str, addr: std::net::SocketAddr) -> Result<()> {
    std::net::TcpListener::bind(addr).map(drop).map_err(|cause| Error::Port { what, addr, cause })
}

impl EtcdProcess {
    /// Writes etcd's config file into its data dir (creating it, 0700) and starts etcd with it.
    pub async fn start(bins: &EtcdBinaries, launch: &EtcdLaunch) -> Result<Self> {
        create_private_dir(&launch.data_dir)?;
        launch.config_file().save(&launch.config_path())?;
        let args = launch.args();
        tracing::info!(etcd = %bins.etcd.display(), name = %launch.name, client_url = %launch.client_url, peer_url = %launch.peer_url,
            force_new_cluster = launch.force_new_cluster, "starting etcd");
        let mut cmd = Command::new(&bins.etcd);
        cmd.args(&args)
            .env_clear()
            .envs(crate::children::env())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group: a Ctrl-C in a terminal reaches us only, and we stop etcd in
            // order. If we die without stopping it, it is SIGKILLed (`children::spawn`).
            .process_group(0);
        let mut child = crate::children::spawn(cmd).await.map_err(|e| Error::Binary {
            program: bins.etcd.display().to_string(),
            detail: format!("cannot start it: {e}"),
        })?;
        let last = Arc::new(Mutex::new(VecDeque::new()));
        let mut logs = Vec::new();
        macro_rules! pump {
            ($pipe:expr) => {
                if let Some(pipe) = $pipe {
                    let last = last.clone();
                    logs.push(tokio::spawn(async move {
                        let mut lines = BufReader::new(pipe).lines();
                        while let Ok(Some(line)) = lines.next_line().await {
                            let summary = forward(&line);
                            remember(&last, summary);
                        }
                    }));
                }
            };
        }
        pump!(child.stdout.take());
        pump!(child.stderr.take());
        let _registered = crate::children::register(child.id());
        Ok(EtcdProcess { child, last, logs, _registered })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// etcd's last log messages, `; `-separated, for error reports.
    pub fn last_lines(&self) -> String {
        let l = self.last.lock().expect("etcd log buffer");
        if l.is_empty() {
            return "(none)".into();
        }
        l.iter().cloned().collect::<Vec<_>>().join("; ")
    }

    async fn exited_error(&mut self, status: std::process::ExitStatus) -> Error {
        // Let the log pumps drain what etcd wrote before it died.
        for h in self.logs.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(2), h).await;
        }
        Error::EtcdExited { status: status.to_string(), last_lines: self.last_lines() }
    }

    /// Resolves when etcd exits, with the error that says so.
    pub async fn exited(&mut self) -> Error {
        match self.child.wait().await {
            Ok(status) => self.exited_error(status).await,
            Err(e) => Error::EtcdExited { status: format!("cannot wait for it: {e}"), last_lines: self.last_lines() },
        }
    }

    /// Waits until etcd answers a status request over TLS with the client certificate and has a
    /// leader; fails early if etcd exits, and after `timeout` otherwise.
    pub async fn wait_ready(
        &mut self,
        client: &EtcdClientConfig,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<EtcdConnection> {
        let started = tokio::time::Instant::now();
        let mut last = String::from("no answer yet");
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| Error::EtcdExited {
                status: format!("cannot wait for it: {e}"),
                last_lines: String::new(),
            })? {
                return Err(self.exited_error(status).await);
            }
            if started.elapsed() > timeout {
                return Err(Error::EtcdNotReady {
                    endpoints: client.endpoints_display(),
                    waited_secs: timeout.as_secs(),
                    last: format!("{last}; etcd's last lines: {}", self.last_lines()),
                });
            }
            let attempt = async {
                let mut conn = client.connect().await?;
                let status = conn
                    .client
                    .status()
                    .await
                    .map_err(|cause| k3s_snapshot_core::Error::Etcd { endpoints: conn.endpoints.clone(), cause })?;
                if status.leader() == 0 {
                    return Err(k3s_snapshot_core::Error::Invalid("etcd has no leader yet".into()));
                }
                Ok(conn)
            };
            tokio::select! {
                r = attempt => match r {
                    Ok(conn) => {
                        tracing::info!(endpoints = %client.endpoints_display(), version = %conn.version, "etcd is ready");
                        return Ok(conn);
                    }
                    Err(e) => {
                        last = e.to_string();
                        tracing::debug!(error = %last, "etcd not ready yet");
                    }
                },
                status = self.child.wait() => {
                    if let Ok(status) = status {
                        return Err(self.exited_error(status).await);
                    }
                }
                _ = cancel.cancelled() => return Err(Error::Cancelled),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = cancel.cancelled() => return Err(Error::Cancelled),
            }
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; always reaps.
    pub async fn stop(mut self, grace: Duration) -> Result<()> {
        if let Ok(Some(_)) = self.child.try_wait() {
            return Ok(());
        }
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) => {
                tracing::info!(%status, "etcd stopped");
            }
            _ => {
                tracing::warn!(grace_secs = grace.as_secs(), "etcd did not stop after SIGTERM; killing it");
                let _ = self.child.kill().await;
            }
        }
        for h in self.logs.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(2), h).await;
        }
        Ok(())
    }
}

/// Output of a short-lived tool (etcdutl, etcdctl) run to completion, its output logged at debug.
pub async fn run_tool(program: &Path, args: &[String], envs: &[(&str, &str)]) -> Result<()> {
    tracing::debug!(program = %program.display(), ?args, "running");
    let cannot = |e: std::io::Error| Error::Binary {
        program: program.display().to_string(),
        detail: format!("cannot run it: {e}"),
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(crate::children::env())
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = crate::children::spawn(cmd).await.map_err(cannot)?;
    let _registered = crate::children::register(child.id());
    let out = child.wait_with_output().await.map_err(cannot)?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    for line in text.lines() {
        tracing::debug!(target: "etcd", "{line}");
    }
    if !out.status.success() {
        let tail: Vec<&str> = text.lines().rev().take(6).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(Error::Tool {
            program: program.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
            status: out.status.to_string(),
            output: tail.join("; "),
        });
    }
    Ok(())
}

/// Kills etcd (and etcdutl/etcdctl restores) left running on this data dir by a server that was
/// itself killed (SIGKILL leaves its children running, and they hold the ports). Only called
/// while holding the data-dir lock, so no live server of ours owns them. Returns how many.
pub async fn reap_orphans(db_dir: &Path) -> usize {
    let db = std::fs::canonicalize(db_dir).unwrap_or_else(|_| db_dir.to_path_buf());
    let mut pids = orphans_on(&db);
    pids.retain(|&pid| {
        // A pidfd pins the process: once it is open, a pid reused since the scan cannot be
        // signalled by mistake, so the process is checked again through it before the kill.
        let fd = rustix::process::Pid::from_raw(pid)
            .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok());
        let Some(fd) = fd else {
            return false;
        };
        if !orphans_on(&db).contains(&pid) {
            return false;
        }
        tracing::warn!(pid, db = %db.display(), "stopping an etcd left running by a server that did not shut down");
        rustix::process::pidfd_send_signal(&fd, rustix::process::Signal::KILL).is_ok()
    });
    // Wait until they are gone, so that their ports and files are free.
    for _ in 0..200 {
        if pids.iter().all(|p| has_exited(*p)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    pids.len()
}

/// Whether a process has let go of everything: gone, or a zombie with no thread left. A
/// multi-threaded process (etcd is Go) killed with SIGKILL can show its main thread as a zombie
/// while other threads are still exiting and still hold its files, sockets included.
fn has_exited(pid: i32) -> bool {
    if !is_zombie(pid) {
        return false;
    }
    std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count() <= 1).unwrap_or(true)
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(true)
}

/// Whether `pid` runs as our effective user (the owner of `/proc/PID`).
fn owned_by_us(pid: i32) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}")).is_ok_and(|m| m.uid() == nix::unistd::geteuid().as_raw())
}

/// Processes named etcd/etcdutl/etcdctl whose `--data-dir` or `--config-file` lies under `db`.
fn orphans_on(db: &Path) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else { return Vec::new() };
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let args: Vec<String> = raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let Some(prog) = args
            .first()
            .map(|a| Path::new(a).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default())
        else {
            continue;
        };
        if !matches!(prog.as_str(), "etcd" | "etcdutl" | "etcdctl") {
            continue;
        }
        // etcd runs with `--config-file=<db>/etcd/config`; the restore tools (and an etcd started
        // by an earlier version of ours) with `--data-dir`.
        let path_arg = |flag: &str| {
            args.iter().enumerate().find_map(|(i, a)| match a.strip_prefix(flag) {
                Some(v) if v.starts_with('=') => Some(v[1..].to_string()),
                Some("") => args.get(i + 1).cloned(),
                _ => None,
            })
        };
        let Some(d) = path_arg("--data-dir").or_else(|| path_arg("--config-file")) else { continue };
        // Only our own user's processes: another user's etcd is not ours to kill, whatever its
        // command line says.
        if !owned_by_us(pid) {
            continue;
        }
        // A relative path is relative to that process's working directory, not ours.
        let d = PathBuf::from(&d);
        let d = if d.is_relative() {
            match std::fs::read_link(format!("/proc/{pid}/cwd")) {
                Ok(cwd) => cwd.join(d),
                Err(_) => continue,
            }
        } else {
            d
        };
        let d = std::fs::canonicalize(&d).unwrap_or(d);
        if d.starts_with(db) && !is_zombie(pid) {
            out.push(pid);
        }
    }
    out
}

#[cfg(test)]
mod reap_tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    /// A stand-in whose command line reads `etcd … ARG`: a shell named etcd blocked in the `read`
    /// builtin on a pipe nobody writes to. It never forks (a `sleep` loop would, and its children
    /// carry the same command line until they exec, so a scan could count them too).
    fn fake_etcd_with(arg: String) -> std::process::Child {
        std::process::Command::new("/bin/sh")
            .arg0("etcd")
            .args(["-c", "read line", "etcd"])
            .arg(arg)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn fake_etcd(data_dir: &Path) -> std::process::Child {
        fake_etcd_with(format!("--data-dir={}", data_dir.display()))
    }

    #[tokio::test]
    async fn an_orphaned_etcd_on_this_data_dir_is_stopped_and_no_other() {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("server/db");
        std::fs::create_dir_all(db.join("etcd")).unwrap();
        std::fs::create_dir_all(tmp.path().join("elsewhere")).unwrap();
        std::fs::write(db.join("etcd/config"), b"name: n\n").unwrap();
        let mut ours = fake_etcd(&db.join("etcd"));
        let mut ours_by_config = fake_etcd_with(format!("--config-file={}", db.join("etcd/config").display()));
        let mut other = fake_etcd(&tmp.path().join("elsewhere"));
        // The stand-ins are up once their command lines read etcd (before the exec they are
        // copies of this test).
        for p in [ours.id(), ours_by_config.id(), other.id()] {
            while !std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c.starts_with(b"etcd\0")) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        assert_eq!(reap_orphans(&db).await, 2);
        for c in [&mut ours, &mut ours_by_config] {
            let st = c.wait().unwrap();
            assert!(!st.success(), "killed: {st}");
        }
        assert!(other.try_wait().unwrap().is_none(), "an etcd of another data dir is left alone");
        let _ = other.kill();
        let _ = other.wait();
    }

    /// The reaper's hostile cases: another user's etcd naming our data dir, and relative paths
    /// that only name our data dir when read against the wrong working directory.
    #[tokio::test]
    async fn another_users_etcd_and_relative_paths_of_other_dirs_are_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("server/db");
        std::fs::create_dir_all(db.join("etcd")).unwrap();
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir_all(elsewhere.join("server/db/etcd")).unwrap();
        let spawn = |arg: String, cwd: &Path, uid: Option<u32>| {
            let mut c = std::process::Command::new("/bin/sh");
            c.arg0("etcd").args(["-c", "read line", "etcd"]).arg(arg).current_dir(cwd);
            c.stdin(std::process::Stdio::piped());
            if let Some(u) = uid {
                c.uid(u);
            }
            c.spawn().unwrap()
        };
        // Relative to its own working directory this names our db: ours.
        let mut relative_ours = spawn("--data-dir=server/db/etcd".into(), tmp.path(), None);
        // The same relative path from another directory names another db: not ours.
        let mut relative_other = spawn("--data-dir=server/db/etcd".into(), &elsewhere, None);
        let mut foreign_user = nix::unistd::geteuid()
            .is_root()
            .then(|| spawn(format!("--data-dir={}", db.join("etcd").display()), Path::new("/"), Some(65534)));
        let mut pids = vec![relative_ours.id(), relative_other.id()];
        pids.extend(foreign_user.as_ref().map(|c| c.id()));
        for p in pids {
            while !std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c.starts_with(b"etcd\0")) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        assert_eq!(reap_orphans(&db).await, 1);
        assert!(!relative_ours.wait().unwrap().success());
        for c in std::iter::once(&mut relative_other).chain(foreign_user.as_mut()) {
            assert!(c.try_wait().unwrap().is_none(), "left alone");
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
