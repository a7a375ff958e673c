//! moto's S3 server (`moto_server`, PyPI `moto[server]`, installed by `cargo xtask provision` into
//! `target/tools/moto`) on a free loopback port: unlike s3s-fs, it keeps the server-side
//! encryption a PUT or a multipart initiation asked for and returns it on a (signed) HEAD, as S3
//! does, and implements Object Lock (refusing a PUT without a checksum into a locked bucket),
//! versioning and STS. It does not check signatures or checksums, and drops a multipart upload's
//! lock at completion; s3s-fs, which checks signatures and trailing checksums, serves the other
//! tests.

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

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.endpoint.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// A request to `path` that moto takes as an authenticated one (it checks no signature, but
    /// answers anonymous requests for private objects with 403).
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        reqwest::Client::new().request(method, format!("http://{}/{path}", self.endpoint)).header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=moto/20250101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00",
        )
    }

    fn send(&self, what: &str, req: reqwest::RequestBuilder) -> (reqwest::header::HeaderMap, String) {
        block_on(async {
            let resp = req.send().await.unwrap();
            let (status, headers) = (resp.status(), resp.headers().clone());
            let body = resp.text().await.unwrap();
            assert!(status.is_success(), "{what}: {status} {body}");
            (headers, body)
        })
    }

    /// Creates a bucket with Object Lock (and so versioning) on, and the default retention
    /// `(mode, days)` if given.
    pub fn create_lock_bucket(&self, name: &str, default: Option<(&str, u32)>) {
        self.send(
            "create a bucket with object lock",
            self.request(reqwest::Method::PUT, name).header("x-amz-bucket-object-lock-enabled", "true"),
        );
        if let Some((mode, days)) = default {
            let doc = format!(
                "<ObjectLockConfiguration><ObjectLockEnabled>Enabled</ObjectLockEnabled><Rule><DefaultRetention><Mode>{mode}</Mode><Days>{days}</Days></DefaultRetention></Rule></ObjectLockConfiguration>"
            );
            self.send(
                "set the default retention",
                self.request(reqwest::Method::PUT, &format!("{name}?object-lock")).body(doc),
            );
        }
    }

    /// The headers of a HEAD of `bucket/key` (its lock: `x-amz-object-lock-*`).
    pub fn head(&self, bucket: &str, key: &str) -> reqwest::header::HeaderMap {
        self.send("head", self.request(reqwest::Method::HEAD, &format!("{bucket}/{key}"))).0
    }

    /// Sets the retention of `bucket/key` (moto lets a test shorten it, S3 would not in COMPLIANCE).
    pub fn set_retention(&self, bucket: &str, key: &str, mode: &str, until: chrono::DateTime<chrono::Utc>) {
        let until = until.format("%Y-%m-%dT%H:%M:%SZ");
        let doc = format!("<Retention><Mode>{mode}</Mode><RetainUntilDate>{until}</RetainUntilDate></Retention>");
        self.send(
            "set the retention",
            self.request(reqwest::Method::PUT, &format!("{bucket}/{key}?retention"))
                .header("x-amz-bypass-governance-retention", "true")
                .body(doc),
        );
    }

    /// What `ListObjectVersions` says under `prefix`: `(versions, delete markers)`.
    pub fn versions(&self, bucket: &str, prefix: &str) -> (usize, usize) {
        let (_, body) = self
            .send("list versions", self.request(reqwest::Method::GET, &format!("{bucket}?versions&prefix={prefix}")));
        (body.matches("<Version>").count(), body.matches("<DeleteMarker>").count())
    }

    /// The web identity role sessions moto's STS handed out: `(role ARN, session name, access key,
    /// session token)`, from moto's state dump.
    pub fn assumed_roles(&self) -> Vec<(String, String, String, String)> {
        let (_, body) = self.send("moto's state", self.request(reqwest::Method::GET, "moto-api/data.json"));
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        let field = |r: &serde_json::Value, k: &str| r[k].as_str().unwrap_or_default().to_string();
        doc["sts"]["AssumedRole"]
            .as_array()
            .map(|roles| {
                roles
                    .iter()
                    .map(|r| {
                        (
                            field(r, "role_arn"),
                            field(r, "session_name"),
                            field(r, "access_key_id"),
                            field(r, "session_token"),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
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
