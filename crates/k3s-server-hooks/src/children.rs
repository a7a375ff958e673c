//! The processes we start (etcd, etcdutl, etcdctl): what environment they get, and a register of
//! the running ones so that a forced exit still stops them.
//!
//! Environment: an allowlist. etcd reads any `ETCD_*` variable as a flag, so a stray
//! `ETCD_LISTEN_CLIENT_URLS` in a unit file would reconfigure it behind our back; and our own
//! environment carries secrets (`K3S_TOKEN`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), the
//! rest of the S3 credential chain (`AWS_PROFILE`, `AWS_SHARED_CREDENTIALS_FILE`,
//! `AWS_EC2_METADATA_SERVICE_ENDPOINT`, which are ours to read, not etcd's) and the S3 proxy (`--etcd-s3-proxy` sets `HTTPS_PROXY` for the S3 client), which must not route
//! etcd's peer traffic. Children get only what a Go program needs to run and to log sensibly.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::sync::Mutex;

/// Variables passed through to children, when set.
const PASSED: &[&str] =
    &["PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "GOMAXPROCS", "GOGC", "GOMEMLIMIT"];

/// The environment a child starts with: the allowlisted variables of ours, plus `LC_*`.
pub fn env() -> Vec<(OsString, OsString)> {
    std::env::vars_os()
        .filter(|(k, _)| k.to_str().is_some_and(|k| PASSED.contains(&k) || k.starts_with("LC_")))
        .collect()
}

static RUNNING: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

/// Keeps a child's pid in the register until dropped.
pub struct Registered(u32);

impl Drop for Registered {
    fn drop(&mut self) {
        RUNNING.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.0);
    }
}

/// Puts a running child in the register.
pub fn register(pid: Option<u32>) -> Option<Registered> {
    let pid = pid?;
    RUNNING.lock().unwrap_or_else(|p| p.into_inner()).insert(pid);
    Some(Registered(pid))
}

/// SIGKILLs every registered child: for an exit that will not run destructors (a second
/// signal). etcd survives a kill (its WAL is fsynced); an etcd left running would not be stopped
/// by anyone.
pub fn kill_all() {
    let pids: Vec<u32> = RUNNING.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect();
    for pid in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allowlist_keeps_secrets_proxies_and_etcd_flags_out() {
        let shown: Vec<String> = env().into_iter().map(|(k, _)| k.to_string_lossy().into_owned()).collect();
        for k in &shown {
            assert!(PASSED.contains(&k.as_str()) || k.starts_with("LC_"), "{k} passed to children");
        }
        for k in [
            "K3S_TOKEN",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_SHARED_CREDENTIALS_FILE",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            "HTTPS_PROXY",
            "NO_PROXY",
            "ETCD_NAME",
        ] {
            assert!(!shown.iter().any(|s| s == k), "{k}");
        }
    }
}
