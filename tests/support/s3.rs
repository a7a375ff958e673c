//! A real S3 server for tests: `s3s-fs` on a free loopback port with authentication on, storing in
//! a temporary directory; optionally nginx in front of it terminating TLS with a CA and server
//! certificate made here. Both are killed on drop. Plus two broken endpoints: a closed port and
//! one that accepts connections and never answers.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use s3_backend::S3Config;

pub use super::etcd::free_port;

/// Access key of every test server.
pub const ACCESS_KEY: &str = "k3s-snapshot-test";
/// Secret key of every test server; tests check it never shows up in messages.
pub const SECRET_KEY: &str = "s3cr3t-Zq8vN2kW7xR4pL9m";

/// `s3s-fs`: `K3S_SNAPSHOT_S3S_FS`, else on `PATH`. Panics, naming `cargo xtask test`, when missing.
pub fn s3s_fs_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("K3S_SNAPSHOT_S3S_FS").map(PathBuf::from) {
        assert!(
            p.is_file(),
            "K3S_SNAPSHOT_S3S_FS={} is not a file: run `cargo xtask test`, which installs s3s-fs",
            p.display()
        );
        return p;
    }
    which("s3s-fs").unwrap_or_else(|| {
        panic!("s3s-fs is not installed (K3S_SNAPSHOT_S3S_FS unset and not on PATH): run `cargo xtask test`, which installs it")
    })
}

/// nginx: `K3S_SNAPSHOT_NGINX`, else on `PATH`, else `/usr/sbin/nginx`.
pub fn nginx_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("K3S_SNAPSHOT_NGINX").map(PathBuf::from) {
        assert!(
            p.is_file(),
            "K3S_SNAPSHOT_NGINX={} is not a file: run `cargo xtask test`, which installs nginx",
            p.display()
        );
        return p;
    }
    which("nginx").or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| p.is_file())).unwrap_or_else(|| {
        panic!("nginx is not installed (K3S_SNAPSHOT_NGINX unset, not on PATH or in /usr/sbin): run `cargo xtask test`, which installs it")
    })
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// Polls until `port` on 127.0.0.1 accepts connections, checking that `child` is still running.
fn wait_listening(port: u16, child: &mut Child, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited with {status} before listening on port {port}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on port {port} within 20s:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `s3s-fs` with SigV4 authentication, serving buckets that are directories of `root`.
pub struct S3Server {
    /// `127.0.0.1:PORT`
    pub endpoint: String,
    pub port: u16,
    /// Where s3s-fs keeps buckets (one directory each), objects and upload state.
    pub root: PathBuf,
    child: Option<Child>,
    tmp: tempfile::TempDir,
}

impl S3Server {
    pub fn start() -> S3Server {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let port = free_port();
        let mut s = S3Server { endpoint: format!("127.0.0.1:{port}"), port, root, child: None, tmp };
        s.spawn();
        s
    }

    fn log_path(&self) -> PathBuf {
        self.tmp.path().join("s3s-fs.log")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let mut child = Command::new(s3s_fs_bin())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&self.root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start s3s-fs: {e}; run `cargo xtask test`, which installs it"));
        wait_listening(self.port, &mut child, "s3s-fs", &self.log_path());
        self.child = Some(child);
    }

    /// Creates a bucket (s3s-fs keeps each bucket as a directory of its root).
    pub fn create_bucket(&self, name: &str) {
        std::fs::create_dir_all(self.root.join(name)).unwrap();
    }

    /// Kills the server at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and root.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `server` flags that keep snapshots in `bucket` on this server (plain http).
    pub fn server_flags(&self, bucket: &str) -> Vec<String> {
        vec![
            "--etcd-s3".into(),
            format!("--etcd-s3-endpoint={}", self.endpoint),
            "--etcd-s3-insecure".into(),
            format!("--etcd-s3-access-key={ACCESS_KEY}"),
            format!("--etcd-s3-secret-key={SECRET_KEY}"),
            format!("--etcd-s3-bucket={bucket}"),
        ]
    }

    /// Plain-http configuration for `bucket`, with a 20 s timeout.
    pub fn config(&self, bucket: &str) -> S3Config {
        S3Config {
            endpoint: self.endpoint.clone(),
            insecure: true,
            access_key: ACCESS_KEY.into(),
            secret_key: SECRET_KEY.into(),
            bucket: bucket.into(),
            timeout: Duration::from_secs(20),
            ..S3Config::default()
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// nginx terminating TLS on a free loopback port and passing requests to an [`S3Server`]
/// unchanged (Host included, so that signatures verify), with a certificate signed by a CA made
/// for this proxy.
pub struct TlsProxy {
    /// `127.0.0.1:PORT`
    pub endpoint: String,
    /// PEM of the CA that signed the server certificate.
    pub ca_file: PathBuf,
    child: Option<Child>,
    tmp: tempfile::TempDir,
}

impl TlsProxy {
    pub fn start(upstream: &S3Server) -> TlsProxy {
        TlsProxy::in_front_of(upstream.port, true)
    }

    /// nginx in front of any S3 server on loopback `port` (moto too), over TLS or, with `tls`
    /// false, plain http (then only a recorder of the requests).
    pub fn in_front_of(upstream_port: u16, tls: bool) -> TlsProxy {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (ca_pem, cert_pem, key_pem) = make_certs();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca_pem).unwrap();
        std::fs::write(dir.join("server.pem"), cert_pem).unwrap();
        std::fs::write(dir.join("server.key"), key_pem).unwrap();
        for d in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            std::fs::create_dir(dir.join(d)).unwrap();
        }
        let port = free_port();
        let d = dir.display();
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format requests '$request_method $request_uri ssec=$http_x_amz_server_side_encryption_customer_algorithm ssec_md5=$http_x_amz_server_side_encryption_customer_key_md5 sdk_checksum=$http_x_amz_sdk_checksum_algorithm lock=$http_x_amz_object_lock_mode auth=[$http_authorization] token=$http_x_amz_security_token';
    access_log {d}/access.log requests;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port}{ssl};
        {certs}
        client_max_body_size 0;
        proxy_request_buffering off;
        proxy_buffering off;
        location / {{
            proxy_pass http://127.0.0.1:{up};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header Connection "";
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
        }}
    }}
}}
"#,
            up = upstream_port,
            ssl = if tls { " ssl" } else { "" },
            certs = if tls {
                format!("ssl_certificate {d}/server.pem;\n        ssl_certificate_key {d}/server.key;")
            } else {
                String::new()
            },
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let log_path = dir.join("nginx.out");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = Command::new(nginx_bin())
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nginx: {e}; run `cargo xtask test`, which installs it"));
        wait_listening(port, &mut child, "nginx", &log_path);
        TlsProxy { endpoint: format!("127.0.0.1:{port}"), ca_file, child: Some(child), tmp }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("error.log")).unwrap_or_default()
    }

    /// One line per request passed on: `METHOD /path?query ssec=<customer key algorithm>
    /// ssec_md5=<its key MD5> sdk_checksum=<x-amz-sdk-checksum-algorithm> lock=<object lock mode>
    /// auth=[<authorization>] token=<x-amz-security-token>`, `-` for a header not sent.
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(self.tmp.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    /// HTTPS configuration for `bucket` behind this proxy (no CA given: add `endpoint_ca` or
    /// `skip_ssl_verify`).
    pub fn config(&self, bucket: &str) -> S3Config {
        S3Config {
            endpoint: self.endpoint.clone(),
            insecure: false,
            access_key: ACCESS_KEY.into(),
            secret_key: SECRET_KEY.into(),
            bucket: bucket.into(),
            timeout: Duration::from_secs(20),
            ..S3Config::default()
        }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A CA and a server certificate for 127.0.0.1 and localhost signed by it: (ca, cert, key) PEMs.
pub fn make_certs() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "k3s-snapshot test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, "127.0.0.1");
    leaf.use_authority_key_identifier_extension = true;
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    (ca_cert.pem(), leaf_cert.pem(), leaf_key.serialize_pem())
}

/// A loopback port that accepts TCP connections and never answers, until dropped.
pub struct HangingEndpoint {
    /// `127.0.0.1:PORT`
    pub endpoint: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HangingEndpoint {
    pub fn start() -> HangingEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let endpoint = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => held.push(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        HangingEndpoint { endpoint, stop, thread: Some(thread) }
    }
}

impl Drop for HangingEndpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A loopback address where nothing listens.
pub fn closed_endpoint() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// A TCP proxy in front of an S3 server that passes requests at a trickle (`bytes_per_sec`) and
/// answers at full speed: a steady but slow endpoint, which never stalls long enough to trip a
/// stall timeout. Runs until dropped.
pub struct TrickleProxy {
    /// `127.0.0.1:PORT`
    pub endpoint: String,
    stop: Arc<AtomicBool>,
}

impl TrickleProxy {
    pub fn start(upstream: &S3Server, bytes_per_sec: usize) -> TrickleProxy {
        use std::io::{Read, Write};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let endpoint = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, up) = (stop.clone(), upstream.port);
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let server = TcpStream::connect(("127.0.0.1", up)).unwrap();
                let (mut c_read, mut s_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut s_read, mut c_write) = (server, client);
                let f = flag.clone();
                // Requests: a slice per tick, paced to the rate.
                std::thread::spawn(move || {
                    let tick = Duration::from_millis(50);
                    let mut buf = vec![0u8; (bytes_per_sec / 20).max(1)];
                    while !f.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        match c_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) if s_write.write_all(&buf[..n]).is_err() => break,
                            Ok(_) => {}
                        }
                        std::thread::sleep(tick.saturating_sub(started.elapsed()));
                    }
                    let _ = s_write.shutdown(std::net::Shutdown::Write);
                });
                // Answers: as fast as they come.
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s_read, &mut c_write);
                    let _ = c_write.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        TrickleProxy { endpoint, stop }
    }
}

impl Drop for TrickleProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
