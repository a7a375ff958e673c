//! moto's S3 server (`moto_server`, PyPI `moto[server]`, installed by `cargo xtask provision` into
//! `target/tools/moto`) on a free loopback port: unlike s3s-fs, it keeps the server-side
//! encryption a PUT or a multipart initiation asked for and returns it on a (signed) HEAD, as S3
//! does. It does not check signatures; s3s-fs, which does, serves the other tests.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use s3_backend::S3Config;

use super::etcd::free_port;
use super::server::block_on;

/// `moto_server`: `K3S_SNAPSHOT_MOTO_SERVER`, else `target/tools/moto/bin/moto_server`.
pub fn moto_server_bin() -> PathBuf {
    let p = std::env::var_os("K3S_SNAPSHOT_MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/tools/moto/bin/moto_server"));
    assert!(
        p.is_file(),
        "moto's S3 server is not installed at {}: run `cargo xtask test`, which installs it (pip, into target/tools/moto)",
        p.display()
    );
    p
}

pub struct MotoServer {
    /// `127.0.0.1:PORT`
    pub endpoint: String,
    child: Child,
    log: tempfile::NamedTempFile,
}

impl MotoServer {
    /// Starts the server and waits until it answers HTTP.
    pub fn start() -> MotoServer {
        let port = free_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(moto_server_bin())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start moto_server: {e}; run `cargo xtask test`, which installs it"));
        let mut m = MotoServer { endpoint: format!("127.0.0.1:{port}"), child, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(st)) = m.child.try_wait() {
                panic!("moto_server exited with {st}:\n{}", m.log());
            }
            // Any HTTP answer means it serves.
            if answers(&format!("http://{}/", m.endpoint)) {
                return m;
            }
            assert!(Instant::now() < deadline, "moto_server did not answer within 60 s:\n{}", m.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Creates a bucket (moto takes unsigned requests).
    pub fn create_bucket(&self, name: &str) {
        let status = block_on(async {
            reqwest::Client::new().put(format!("http://{}/{name}", self.endpoint)).send().await.unwrap().status()
        });
        assert!(status.is_success(), "create bucket {name}: {status}");
    }

    /// `server`/`etcd-snapshot` flags for `bucket` on this server (plain http, any credentials).
    pub fn flags(&self, bucket: &str) -> Vec<String> {
        vec![
            "--etcd-s3".into(),
            format!("--etcd-s3-endpoint={}", self.endpoint),
            "--etcd-s3-insecure".into(),
            "--etcd-s3-access-key=moto".into(),
            "--etcd-s3-secret-key=moto-secret".into(),
            format!("--etcd-s3-bucket={bucket}"),
        ]
    }

    /// Plain-http configuration for `bucket`, with a 30 s timeout.
    pub fn config(&self, bucket: &str) -> S3Config {
        S3Config {
            endpoint: self.endpoint.clone(),
            insecure: true,
            access_key: "moto".into(),
            secret_key: "moto-secret".into(),
            bucket: bucket.into(),
            timeout: Duration::from_secs(30),
            ..S3Config::default()
        }
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether anything answers a HEAD request to `url` within a second.
fn answers(url: &str) -> bool {
    block_on(async { reqwest::Client::new().head(url).timeout(Duration::from_secs(1)).send().await.is_ok() })
}
