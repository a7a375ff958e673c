//! A real etcd on free loopback ports in a temporary directory, killed on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The two etcd versions the project supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtcdVersion {
    V3_4,
    V3_5,
}

impl EtcdVersion {
    pub const ALL: [EtcdVersion; 2] = [EtcdVersion::V3_5, EtcdVersion::V3_4];

    pub fn label(self) -> &'static str {
        match self {
            EtcdVersion::V3_4 => "3.4.23",
            EtcdVersion::V3_5 => "3.5.1",
        }
    }

    /// Directory holding `etcd` and `etcdctl` (and `etcdutl` for 3.5).
    pub fn bin_dir(self) -> PathBuf {
        let var = match self {
            EtcdVersion::V3_4 => "K3S_SNAPSHOT_ETCD34_BIN_DIR",
            EtcdVersion::V3_5 => "K3S_SNAPSHOT_ETCD35_BIN_DIR",
        };
        let dir = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
            panic!(
                "{var} is not set: etcd {} is needed; run the suite with `cargo xtask test`, which installs it",
                self.label()
            )
        });
        assert!(
            dir.join("etcd").is_file(),
            "etcd {} is not at {}: run `cargo xtask test` (or `cargo xtask provision`) to install it",
            self.label(),
            dir.display()
        );
        dir
    }

    pub fn etcd(self) -> PathBuf {
        self.bin_dir().join("etcd")
    }

    pub fn etcdctl(self) -> PathBuf {
        self.bin_dir().join("etcdctl")
    }
}

/// `etcdutl` of 3.5.1, which reads snapshots of both versions.
pub fn etcdutl() -> PathBuf {
    EtcdVersion::V3_5.bin_dir().join("etcdutl")
}

/// A port free on every address right now, for a server a test is about to start.
///
/// Not the kernel's choice (`bind(:0)`): that comes from the ephemeral range (32768-60999 here),
/// where any outgoing connection of a parallel test may take the same number as its source port
/// between this call and the server's bind. Ports come from 20000-31999 instead, handed out by a
/// process-wide counter (no two tests of this process get the same), starting at an offset from
/// the process id (a second test process starts elsewhere).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id() % 60) * 200;
    for _ in 0..COUNT {
        let port = (FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % COUNT) as u16;
        if TcpListener::bind(("0.0.0.0", port)).is_ok() && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}-{}", FIRST + COUNT - 1);
}

/// A running etcd with plain-http client and peer URLs on 127.0.0.1.
pub struct Etcd {
    pub version: EtcdVersion,
    pub endpoint: String,
    pub data_dir: PathBuf,
    child: Option<Child>,
    _tmp: tempfile::TempDir,
}

impl Etcd {
    pub fn start(version: EtcdVersion) -> Etcd {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        let (cp, pp) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{cp}");
        let peer = format!("http://127.0.0.1:{pp}");
        let log = std::fs::File::create(tmp.path().join("etcd.log")).unwrap();
        let child = Command::new(version.etcd())
            .arg("--name=test")
            .arg(format!("--data-dir={}", data_dir.display()))
            .arg(format!("--listen-client-urls={endpoint}"))
            .arg(format!("--advertise-client-urls={endpoint}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .arg("--quota-backend-bytes=8589934592")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd {}: {e}; run `cargo xtask test`", version.label()));
        let etcd = Etcd { version, endpoint, data_dir, child: Some(child), _tmp: tmp };
        etcd.wait_healthy();
        etcd
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.ctl(&["endpoint", "health"]).status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd {} did not become healthy in 30s: {}",
                self.version.label(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._tmp.path().join("etcd.log")).unwrap_or_default()
    }

    /// Runs etcdctl (API v3) against this etcd.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(self.version.etcdctl())
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint))
            .args(args)
            .output()
            .unwrap()
    }

    #[track_caller]
    pub fn put(&self, key: &str, value: &str) {
        let o = self.ctl(&["put", key, value]);
        assert!(o.status.success(), "etcdctl put: {}", String::from_utf8_lossy(&o.stderr));
    }

    /// Writes `n` keys `prefix00000…` with small values, through one etcdctl process per key.
    pub fn put_many(&self, prefix: &str, n: usize) {
        for i in 0..n {
            self.put(&format!("{prefix}{i:05}"), &format!("value-{i}"));
        }
    }

    /// Grows the database by about `mib` MiB of incompressible values (1 MiB each), quickly.
    pub fn load_mib(&self, prefix: &str, mib: usize) {
        let endpoint = self.endpoint.clone();
        let prefix = prefix.to_string();
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async move {
            let mut c = etcd_client::Client::connect([endpoint], None).await.unwrap();
            let mut state = 0x9e3779b97f4a7c15u64;
            for i in 0..mib {
                let mut v = vec![0u8; 1 << 20];
                for chunk in v.chunks_mut(8) {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
                }
                c.put(format!("{prefix}{i:05}"), v, None).await.unwrap();
            }
        });
    }

    /// The current revision, from `etcdctl endpoint status`.
    pub fn revision(&self) -> i64 {
        let o = self.ctl(&["endpoint", "status", "-w", "json"]);
        assert!(o.status.success(), "etcdctl endpoint status: {}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v[0]["Status"]["header"]["revision"].as_i64().unwrap()
    }

    /// Kills etcd at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `etcdutl snapshot status -w json` of a file: (revision, totalKey, hash, totalSize).
pub fn etcdutl_status(path: &Path) -> serde_json::Value {
    let o = Command::new(etcdutl()).args(["snapshot", "status", "-w", "json"]).arg(path).output().unwrap();
    assert!(o.status.success(), "etcdutl snapshot status {}: {}", path.display(), String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `etcdutl snapshot restore` into a fresh dir; returns the process output.
pub fn etcdutl_restore(path: &Path, into: &Path) -> std::process::Output {
    Command::new(etcdutl())
        .args(["snapshot", "restore"])
        .arg(path)
        .arg(format!("--data-dir={}", into.display()))
        .output()
        .unwrap()
}
