//! The stock `age` CLI (Debian `age`, 1.x): keys made by `age-keygen`, files decrypted by `age -d`,
//! so that the tests check our encrypted snapshots against the reference implementation rather
//! than against our own reader.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `age`: `K3S_SNAPSHOT_AGE`, else on `PATH`. Panics, naming `cargo xtask test`, when missing.
pub fn age_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("K3S_SNAPSHOT_AGE").map(PathBuf::from) {
        assert!(
            p.is_file(),
            "K3S_SNAPSHOT_AGE={} is not a file: run `cargo xtask test`, which installs age",
            p.display()
        );
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join("age")).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!("the age CLI is not installed (K3S_SNAPSHOT_AGE unset and not on PATH): run `cargo xtask test`, which installs Debian age")
    })
}

/// `age-keygen`, beside `age`.
pub fn age_keygen_bin() -> PathBuf {
    let p = age_bin().with_file_name("age-keygen");
    assert!(p.is_file(), "{} is missing: run `cargo xtask test`, which installs Debian age", p.display());
    p
}

/// A key pair made by `age-keygen`: the identity file (0600, as age-keygen writes it), a
/// recipients file holding its public key, and the public key.
pub struct AgeKey {
    pub identity: PathBuf,
    pub recipients: PathBuf,
    pub public: String,
}

impl AgeKey {
    /// The private key line (`AGE-SECRET-KEY-1…`), for checks that it never shows up.
    pub fn secret(&self) -> String {
        std::fs::read_to_string(&self.identity)
            .unwrap()
            .lines()
            .find(|l| l.starts_with("AGE-SECRET-KEY-"))
            .expect("age-keygen wrote a secret key")
            .to_string()
    }
}

/// Makes `<dir>/<name>.key` with `age-keygen` and `<dir>/<name>.pub` with its public key, in the
/// recipients-file format (`age -R`): a comment, then the key.
pub fn keygen(dir: &Path, name: &str) -> AgeKey {
    let identity = dir.join(format!("{name}.key"));
    let out = Command::new(age_keygen_bin()).arg("-o").arg(&identity).output().unwrap();
    assert!(out.status.success(), "age-keygen: {}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(age_keygen_bin()).arg("-y").arg(&identity).output().unwrap();
    assert!(out.status.success(), "age-keygen -y: {}", String::from_utf8_lossy(&out.stderr));
    let public = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let recipients = dir.join(format!("{name}.pub"));
    std::fs::write(&recipients, format!("# {name}, made by age-keygen\n{public}\n")).unwrap();
    AgeKey { identity, recipients, public }
}

/// `age -d -i identity -o out src`; panics with age's message when it refuses.
#[track_caller]
pub fn decrypt(key: &AgeKey, src: &Path, out: &Path) {
    let o =
        Command::new(age_bin()).arg("-d").arg("-i").arg(&key.identity).arg("-o").arg(out).arg(src).output().unwrap();
    assert!(o.status.success(), "age -d {}: {}", src.display(), String::from_utf8_lossy(&o.stderr));
}

/// Whether `p` starts with the first line of an age v1 file.
pub fn is_age_file(p: &Path) -> bool {
    let mut head = Vec::new();
    let f = std::fs::File::open(p).unwrap();
    std::io::Read::read_to_end(&mut std::io::Read::take(f, 22), &mut head).unwrap();
    head == b"age-encryption.org/v1\n"
}
