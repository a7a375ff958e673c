//! The processes we start (etcd, etcdutl, etcdctl): what environment they get, and a register of
//! the running ones so that a forced exit still stops them.
//!
//! Environment: an allowlist. etcd reads any `ETCD_*` variable as a flag, so a stray
//! `ETCD_LISTEN_CLIENT_URLS` in a unit file would reconfigure it behind our back; and our own
//! environment carries secrets (`K3S_TOKEN`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), the
//! rest of the S3 credential chain (`AWS_PROFILE`, `AWS_SHARED_CREDENTIALS_FILE`,
//! `AWS_EC2_METADATA_SERVICE_ENDPOINT`, which are ours to read, not etcd's) and the S3 proxy (`--etcd-s3-proxy` sets `HTTPS_PROXY` for the S3 client), which must not route
//! etcd's peer traffic. Children get only what a Go program needs to run and to log sensibly.
//!
//! Lifetime: every child dies with us, even when we are SIGKILLed or crash ([`spawn`]). Each is
//! started with `PR_SET_PDEATHSIG` = SIGKILL, and checks right after setting it that its parent is
//! still the process that forked it (if we died between the fork and the `prctl`, the signal
//! would never come, so it exits instead). SIGKILL rather than SIGTERM: a dead server cannot
//! supervise an orderly stop, SIGTERM lets etcd take its time (a leader hands over leadership
//! first) while a restarted server finds the ports still taken, and etcd is built to survive a
//! kill (its WAL is fsynced before anything is acknowledged), which is also what the service
//! manager's control-group kill does. The signal fires when the *thread* that forked the child
//! exits, not the process, so children are forked by one thread that lives as long as the
//! process (`k3s-children`): never by a tokio worker or blocking-pool thread, which the runtime
//! may end (idle blocking threads exit after 10 s) while the child should go on.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::sync::{mpsc, Mutex, OnceLock};

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

type Job = Box<dyn FnOnce() + Send>;

/// The thread that forks every child: started on first use, it never ends (the sender lives in
/// a static), so a child's death signal fires only when the whole process is gone.
fn spawner() -> &'static mpsc::Sender<Job> {
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("k3s-children".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .expect("cannot start the thread that starts etcd and its tools");
        tx
    })
}

/// Makes the child started by `cmd` get SIGKILL when the thread that forks it exits (see the
/// module docs: only [`spawn`]'s thread forks), and exit at once if this process is already gone.
/// A `nice` above 0 (the asking thread's, see [`spawn`]) is given to the child before it runs.
fn die_with_us(cmd: &mut tokio::process::Command, nice: i32) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed. It makes system calls (prctl(PR_SET_PDEATHSIG), getppid, setpriority)
    // through nix's and rustix's thin wrappers and builds an io::Error from an errno, none of
    // which allocates, locks or touches state shared with the parent's other threads.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)?;
            // Forked by a parent that died before the prctl: we were already reparented and
            // the signal will never come.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            if nice > 0 {
                rustix::process::setpriority_process(None, nice).map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
}

/// Starts `cmd` as a child that cannot outlive this process (see the module docs), forked by the
/// `k3s-children` thread; the child is watched by the current tokio runtime as any
/// `tokio::process::Child`. It gets the niceness of the thread that asks for it, as if that thread
/// had forked it: a restore drill's thread runs at the lowest priority, and so do its etcd and
/// etcdutl (an I/O priority that was never set follows the niceness: best effort, level 7 at
/// nice 19).
pub async fn spawn(mut cmd: tokio::process::Command) -> std::io::Result<tokio::process::Child> {
    let nice = rustix::process::getpriority_process(None).unwrap_or(0);
    die_with_us(&mut cmd, nice);
    let runtime = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    spawner()
        .send(Box::new(move || {
            let _entered = runtime.enter();
            let _ = tx.send(cmd.spawn());
        }))
        .map_err(|_| std::io::Error::other("the thread that starts child processes is gone"))?;
    rx.await.map_err(|_| std::io::Error::other("the thread that starts child processes stopped"))?
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

    fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
    }

    /// The death signal fires when the thread that forked a child exits: a child asked for by a
    /// thread that then ends (as tokio's idle blocking threads do) must live on, because the
    /// long-lived `k3s-children` thread forked it.
    #[test]
    fn a_child_outlives_the_thread_that_asked_for_it() {
        let pid = std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let mut cmd = tokio::process::Command::new("sleep");
                cmd.arg("60");
                spawn(cmd).await.unwrap().id().unwrap() as i32
            })
        })
        .join()
        .unwrap();
        // The asking thread is gone; a death signal tied to it would arrive within microseconds.
        // Checking that something does not happen needs a bound: 500 ms.
        for _ in 0..20 {
            assert!(alive(pid), "the child died with the thread that asked for it");
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        let pid = nix::unistd::Pid::from_raw(pid);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        let _ = nix::sys::wait::waitpid(pid, None);
    }
}
