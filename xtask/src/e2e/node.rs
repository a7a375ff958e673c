//! The programs of the e2e hosts: `k3s-snapshot server` in a node's namespace, `etcd-snapshot`
//! and `etcdctl` run there too (as an operator on that node would), and s3s-fs on its own host.
//! Every process is killed and reaped on drop; readiness is observed (a log line, a port), never
//! slept for.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::net::{check_interrupted, tick};

/// The log line that says the server is up: etcd answered over TLS, the API listens.
pub const RUNNING: &str = "server is running";
pub const RESET_DONE: &str =
    "Managed etcd cluster membership has been reset, restart without --cluster-reset flag now.";
pub const S3_ACCESS_KEY: &str = "k3s-e2e-access";
pub const S3_SECRET_KEY: &str = "k3s-e2e-Secret-7Hq2Lw9x";
pub const S3_IP: &str = "10.77.0.100";
pub const S3_PORT: u16 = 9000;

const POLL: Duration = Duration::from_millis(100);

/// `ip netns exec NS PROGRAM`, in its own process group so that a Ctrl-C reaches only us (we
/// then stop it in order).
pub fn in_ns(ns: &str, program: &Path) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program).stdin(Stdio::null()).process_group(0);
    for v in crate::OUR_ENV {
        c.env_remove(v);
    }
    c
}

/// What a finished command printed.
pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    /// The status, then the last lines of stderr, for error messages.
    pub fn describe(&self) -> String {
        format!("{}; stderr: {}", self.status, tail(&self.stderr, 8))
    }

    pub fn check(self, what: &str) -> Result<Out> {
        if !self.ok() {
            bail!("{what} failed ({})", self.describe());
        }
        Ok(self)
    }
}

/// The last `n` lines of a text, joined with " | ".
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Runs a command to completion with its output captured; killed when `timeout` passes.
pub fn run(cmd: &mut Command, timeout: Duration, what: &str) -> Result<Out> {
    run_stdin(cmd, None, timeout, what)
}

/// [`run`] with bytes fed to stdin.
pub fn run_stdin(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration, what: &str) -> Result<Out> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().with_context(|| format!("cannot start {:?} to {what}", cmd.get_program()))?;
    if let Some(bytes) = stdin {
        use std::io::Write;
        let mut w = child.stdin.take().expect("piped");
        w.write_all(bytes).with_context(|| format!("write stdin to {what}"))?;
    }
    let mut so = child.stdout.take().expect("piped");
    let mut se = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = so.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = se.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline || check_interrupted().is_err() {
            let _ = child.kill();
            let _ = child.wait();
            check_interrupted()?;
            bail!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
    Ok(Out { status, stdout, stderr })
}

/// Polls `cond` until it holds; fails after `timeout` naming `what`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tick(POLL)?;
    }
}

/// Pids of live processes of `programs` (file names) with an argument starting with `needle`.
pub fn pids_with_arg(programs: &[&str], needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        // A zombie has an empty command line, so a match is a live process.
        let cmd = String::from_utf8_lossy(&cmd);
        let mut args = cmd.split('\0');
        let program = args.next().and_then(|a| a.rsplit('/').next()).unwrap_or_default();
        if programs.contains(&program) && args.any(|a| a.starts_with(needle)) {
            out.push(pid);
        }
    }
    out
}

/// Live etcd processes of a `server/db` dir: the server starts etcd with
/// `--config-file=<db>/etcd/config` (an etcd of an earlier version had `--data-dir=<db>/etcd`).
fn etcd_pids_under(db: &Path) -> Vec<u32> {
    let mut v = pids_with_arg(&["etcd"], &format!("--config-file={}", db.display()));
    v.extend(pids_with_arg(&["etcd"], &format!("--data-dir={}", db.display())));
    v
}

/// Whether a process has released its files and sockets: gone, or a zombie with no thread left.
/// (Its command line empties before its sockets close, and a multi-threaded process's leader
/// turns zombie while its other threads still hold the descriptor table, so neither alone says
/// that a successor can bind its ports.)
fn exited(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return true };
    let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map(|rd| rd.count()).unwrap_or(0);
    matches!(state, Some('Z' | 'X') | None) && threads <= 1
}

/// SIGKILL and wait (up to 10 s) until the processes have released their ports and files.
pub fn kill_and_wait(pids: &[u32]) {
    kill(pids, "KILL");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pids.iter().all(|p| exited(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn kill(pids: &[u32], signal: &str) {
    if pids.is_empty() {
        return;
    }
    let Ok(signal) = signal.parse::<nix::sys::signal::Signal>().or_else(|_| format!("SIG{signal}").parse()) else {
        return;
    };
    for pid in pids {
        let _ = crate::signal(*pid, signal);
    }
}

/// Files in a directory, sorted (empty when it does not exist).
pub fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// An etcd release and where its binaries are.
#[derive(Clone, Debug)]
pub struct Etcd {
    /// "3.5.1" or "3.4.23"
    pub label: &'static str,
    pub bin_dir: PathBuf,
}

impl Etcd {
    /// "35" or "34", for bucket and directory names.
    pub fn short(&self) -> String {
        self.label.split('.').take(2).collect()
    }
}

/// One server host of a scenario: its namespace and address, and a data dir for this scenario.
#[derive(Clone)]
pub struct Node {
    pub name: String,
    pub ns: String,
    pub ip: String,
    /// Scenario dir of this node: logs and `k3s/` (the data dir).
    pub dir: PathBuf,
    pub etcd: Etcd,
    pub bin: PathBuf,
}

impl Node {
    pub fn data(&self) -> PathBuf {
        self.dir.join("k3s")
    }

    pub fn db(&self) -> PathBuf {
        self.data().join("server/db")
    }

    pub fn snapshots(&self) -> PathBuf {
        self.db().join("snapshots")
    }

    pub fn token(&self) -> Result<String> {
        let p = self.data().join("server/token");
        Ok(std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?.trim().to_string())
    }

    /// `https://IP:6443`, what joiners pass to `--server`.
    pub fn url(&self) -> String {
        format!("https://{}:6443", self.ip)
    }

    /// `k3s-snapshot server` on this node with its data dir, address and etcd; `extra` last.
    pub fn server_cmd(&self, extra: &[String]) -> Command {
        let mut c = in_ns(&self.ns, &self.bin);
        c.arg("server")
            .arg(format!("--data-dir={}", self.data().display()))
            .arg(format!("--node-name={}", self.name))
            .arg(format!("--advertise-address={}", self.ip))
            .arg(format!("--etcd-bin-dir={}", self.etcd.bin_dir.display()))
            .arg("--etcd-snapshot-jitter=0s")
            .args(extra);
        c
    }

    fn next_log(&self, what: &str) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        for n in 1.. {
            let p = self.dir.join(format!("{what}-{n}.log"));
            if !p.exists() {
                return Ok(p);
            }
        }
        unreachable!()
    }

    /// Starts a server, its stderr in a log file, without waiting.
    pub fn spawn(&self, extra: &[String]) -> Result<Server> {
        let log = self.next_log("server")?;
        let file = std::fs::File::create(&log)?;
        let child = self
            .server_cmd(extra)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .context("cannot start k3s-snapshot server")?;
        Ok(Server { child: Some(child), log, node: self.name.clone(), data: self.data() })
    }

    /// Starts a server and waits until it logs [`RUNNING`].
    pub fn start(&self, extra: &[String]) -> Result<Server> {
        let mut s = self.spawn(extra)?;
        s.wait_for_log(RUNNING, Duration::from_secs(120))?;
        Ok(s)
    }

    /// Runs the server to completion (a reset, a refused start), its output in a log file.
    pub fn run_server(&self, extra: &[String], timeout: Duration) -> Result<Out> {
        let out = run(&mut self.server_cmd(extra), timeout, &format!("server on {}", self.name))?;
        std::fs::write(self.next_log("run")?, &out.stderr)?;
        Ok(out)
    }

    /// `k3s-snapshot etcd-snapshot ARGS --data-dir D --node-name N` on this node.
    pub fn snapshot_cmd(&self, args: &[String]) -> Command {
        let mut c = in_ns(&self.ns, &self.bin);
        c.arg("etcd-snapshot")
            .args(args)
            .arg(format!("--data-dir={}", self.data().display()))
            .arg(format!("--node-name={}", self.name));
        c
    }

    pub fn snapshot(&self, args: &[String]) -> Result<Out> {
        run(
            &mut self.snapshot_cmd(args),
            Duration::from_secs(180),
            &format!("etcd-snapshot {} on {}", args.join(" "), self.name),
        )
    }

    /// `etcd-snapshot save ARGS`; returns the new snapshot's file name.
    pub fn save(&self, args: &[String]) -> Result<String> {
        let before = files(&self.snapshots());
        let mut a = vec!["save".to_string()];
        a.extend_from_slice(args);
        self.snapshot(&a)?.check(&format!("etcd-snapshot save on {}", self.name))?;
        let new: Vec<String> =
            files(&self.snapshots()).into_iter().filter(|f| !before.contains(f) && !f.ends_with(".part")).collect();
        match new.as_slice() {
            [one] => Ok(one.clone()),
            _ => bail!("expected one new snapshot in {}, found {new:?}", self.snapshots().display()),
        }
    }

    /// etcdctl of this node's etcd version against this node's etcd, with the client certificate.
    pub fn etcdctl(&self, args: &[&str]) -> Command {
        let tls = self.data().join("server/tls/etcd");
        let mut c = in_ns(&self.ns, &self.etcd.bin_dir.join("etcdctl"));
        c.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints=https://{}:2379", self.ip))
            .arg(format!("--cacert={}", tls.join("server-ca.crt").display()))
            .arg(format!("--cert={}", tls.join("client.crt").display()))
            .arg(format!("--key={}", tls.join("client.key").display()))
            .arg("--command-timeout=8s")
            .args(args);
        c
    }

    pub fn ctl(&self, args: &[&str]) -> Result<Out> {
        run(&mut self.etcdctl(args), Duration::from_secs(30), &format!("etcdctl {} on {}", args.join(" "), self.name))?
            .check(&format!("etcdctl {} on {}", args.first().copied().unwrap_or_default(), self.name))
    }

    pub fn put(&self, kvs: &[(&str, &str)]) -> Result<()> {
        for (k, v) in kvs {
            self.ctl(&["put", k, v])?;
        }
        Ok(())
    }

    pub fn del(&self, k: &str) -> Result<()> {
        self.ctl(&["del", k]).map(drop)
    }

    /// `mib` values of 1 MiB under `/bulk/`, so that snapshots take a moment.
    pub fn load_bulk(&self, mib: usize) -> Result<()> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (mib as u64);
        for i in 0..mib {
            let value: Vec<u8> = (0..(1 << 20))
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    b'!' + (state % 90) as u8
                })
                .collect();
            let key = format!("/bulk/{i:04}");
            run_stdin(&mut self.etcdctl(&["put", &key]), Some(&value), Duration::from_secs(30), "etcdctl put (bulk)")?
                .check("etcdctl put of a bulk value")?;
        }
        Ok(())
    }

    /// Every key in etcd (names only), sorted.
    pub fn keys(&self) -> Result<Vec<String>> {
        let out = self.ctl(&["get", "", "--prefix", "--keys-only"])?;
        let mut v: Vec<String> = out.stdout.lines().filter(|l| !l.is_empty()).map(String::from).collect();
        v.sort();
        Ok(v)
    }

    /// Keys and values under `/e2e/`, sorted.
    pub fn small_kvs(&self) -> Result<Vec<(String, String)>> {
        let out = self.ctl(&["get", "/e2e/", "--prefix"])?;
        let lines: Vec<&str> = out.stdout.lines().collect();
        Ok(lines.chunks(2).filter(|c| c.len() == 2).map(|c| (c[0].to_string(), c[1].to_string())).collect())
    }

    /// The revision this node's etcd reports (`etcdctl get -w json`'s header).
    pub fn revision(&self) -> Result<i64> {
        let out = self.ctl(&["get", "/", "-w", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out.stdout)
            .map_err(|e| anyhow::anyhow!("etcdctl get -w json on {} is not JSON: {e}", self.name))?;
        v["header"]["revision"].as_i64().ok_or_else(|| anyhow::anyhow!("no header.revision from {}", self.name))
    }

    pub fn member_count(&self) -> Result<usize> {
        let out = self.ctl(&["member", "list"])?;
        Ok(out.stdout.lines().filter(|l| !l.trim().is_empty()).count())
    }

    /// Live etcd processes of this node's data dir.
    pub fn etcd_pids(&self) -> Vec<u32> {
        etcd_pids_under(&self.db())
    }

    /// Every process of this node's data dir: etcd, a restore tool, a server (or a child it
    /// forked that has not exec'd etcd yet).
    pub fn leftover_pids(&self) -> Vec<u32> {
        let mut v = self.etcd_pids();
        v.extend(self.restore_tool_pids());
        v.extend(pids_with_arg(&["k3s-snapshot"], &format!("--data-dir={}", self.data().display())));
        v
    }

    /// Live `etcdutl`/`etcdctl snapshot restore` processes writing into this node's data dir.
    pub fn restore_tool_pids(&self) -> Vec<u32> {
        pids_with_arg(&["etcdutl", "etcdctl"], &format!("--data-dir={}", self.db().display()))
    }
}

/// A running `k3s-snapshot server`, killed (with its etcd) on drop.
pub struct Server {
    child: Option<Child>,
    pub log: PathBuf,
    pub node: String,
    data: PathBuf,
}

impl Server {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    fn etcd_pids(&self) -> Vec<u32> {
        let db = self.data.join("server/db");
        let mut v = etcd_pids_under(&db);
        v.extend(pids_with_arg(&["etcdutl", "etcdctl"], &format!("--data-dir={}", db.display())));
        v
    }

    /// Waits until the log contains `needle`; fails if the server exits first.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        self.wait_for_log_count(needle, 1, timeout)
    }

    pub fn log_count(&self, needle: &str) -> usize {
        self.log_text().matches(needle).count()
    }

    /// Waits until `needle` appears `n` times in the log.
    pub fn wait_for_log_count(&mut self, needle: &str, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_count(needle) >= n {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().map(Child::try_wait).transpose()?.flatten() {
                self.child = None;
                bail!(
                    "server on {} exited ({status}) before logging {needle:?}: {}",
                    self.node,
                    tail(&self.log_text(), 10)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "server on {} did not log {needle:?} within {timeout:?}: {}",
                    self.node,
                    tail(&self.log_text(), 10)
                );
            }
            tick(POLL)?;
        }
    }

    /// Waits for the server to exit on its own.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().ok_or_else(|| anyhow!("server on {} is not running", self.node))?;
        loop {
            if let Some(s) = child.try_wait()? {
                self.child = None;
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("server on {} did not exit within {timeout:?}: {}", self.node, tail(&self.log_text(), 10));
            }
            tick(POLL)?;
        }
    }

    /// SIGTERM, wait for exit 0, and check that its etcd is gone too.
    pub fn stop(mut self) -> Result<()> {
        kill(&[self.pid()], "TERM");
        let s = self.wait(Duration::from_secs(60))?;
        if !s.success() {
            bail!("server on {} exited with {s} after SIGTERM: {}", self.node, tail(&self.log_text(), 10));
        }
        let left = self.etcd_pids();
        if !left.is_empty() {
            bail!("etcd (pids {left:?}) still runs after the server on {} stopped", self.node);
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        kill_and_wait(&self.etcd_pids());
    }
}

/// s3s-fs on the object-store host, SigV4 on, buckets as directories of `root`.
pub struct S3Host {
    child: Option<Child>,
    pub root: PathBuf,
    log: PathBuf,
    ns: String,
    bin: PathBuf,
}

impl S3Host {
    pub fn start(ns: &str, bin: &Path, dir: &Path) -> Result<S3Host> {
        let root = dir.join("root");
        std::fs::create_dir_all(&root)?;
        let mut h = S3Host { child: None, root, log: dir.join("s3s-fs.log"), ns: ns.into(), bin: bin.into() };
        h.spawn()?;
        Ok(h)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut child = in_ns(&self.ns, &self.bin)
            .args(["--host", "0.0.0.0", "--port", &S3_PORT.to_string()])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(&self.root)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start s3s-fs")?;
        let addr: SocketAddr = format!("{S3_IP}:{S3_PORT}").parse()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok() {
                break;
            }
            if let Some(st) = child.try_wait()? {
                bail!(
                    "s3s-fs exited ({st}) before listening: {}",
                    tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 10)
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("s3s-fs did not listen on {addr} within 30s (is the e2e bridge forwarding?)");
            }
            tick(Duration::from_millis(50))?;
        }
        self.child = Some(child);
        Ok(())
    }

    /// A bucket is a directory of the root.
    pub fn create_bucket(&self, name: &str) -> Result<()> {
        Ok(std::fs::create_dir_all(self.root.join(name))?)
    }

    /// Where s3s-fs keeps object `folder/name` of `bucket`.
    pub fn object(&self, bucket: &str, key: &str) -> PathBuf {
        self.root.join(bucket).join(key)
    }
}

impl Drop for S3Host {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The S3 flags (the server's `--etcd-s3-*` spelling, which `etcd-snapshot` accepts too) for a
/// bucket on the object-store host, folder `k3s`.
pub fn s3_flags(bucket: &str, timeout: &str) -> Vec<String> {
    vec![
        "--etcd-s3".into(),
        format!("--etcd-s3-endpoint={S3_IP}:{S3_PORT}"),
        "--etcd-s3-insecure".into(),
        format!("--etcd-s3-access-key={S3_ACCESS_KEY}"),
        format!("--etcd-s3-secret-key={S3_SECRET_KEY}"),
        format!("--etcd-s3-bucket={bucket}"),
        "--etcd-s3-folder=k3s".into(),
        format!("--etcd-s3-timeout={timeout}"),
    ]
}
