//! Running one child process and measuring it: wall time from spawn to reaping, and its peak
//! resident set size as the kernel accounts it (`wait4`'s `ru_maxrss`).
//!
//! `ru_maxrss` from `wait4` covers the child and the descendants it reaped itself (Linux
//! reports the larger of the two), so for a process that runs etcd (`server --cluster-reset`)
//! it is etcd's peak, not ours. [`Measure::sampled`] therefore also reads the child's own
//! `VmHWM` every few milliseconds (a high-water mark, so the last sample before exit is close to
//! the peak), and the largest `RssAnon` seen: `ru_maxrss` counts the pages of a file the process
//! has mapped (the snapshot, when it is read through mmap), which the kernel can drop at will;
//! `RssAnon` is the process's own heap and stacks.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long any one measured process may run before it is killed (a hung run is a failure,
/// not a measurement).
const DEADLINE: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub wall: Duration,
    /// `wait4` `ru_maxrss`, KiB: the child, or its largest reaped descendant.
    pub maxrss_kib: u64,
    /// The child's own `VmHWM`, KiB, when sampled.
    pub own_hwm_kib: Option<u64>,
    /// The largest `RssAnon` sampled, KiB.
    pub anon_peak_kib: Option<u64>,
    /// User + system CPU time of the child (and the descendants it reaped).
    pub cpu: Duration,
}

#[derive(Default)]
pub struct Measure {
    sample: bool,
}

impl Measure {
    /// Also sample the child's own `VmHWM` and `RssAnon` while it runs.
    pub fn sampled() -> Self {
        Measure { sample: true }
    }

    /// Runs `cmd` to completion with its stdout and stderr appended to `log`; fails, quoting the
    /// end of the log, when it exits unsuccessfully.
    pub fn run(&self, cmd: &mut Command, log: &Path) -> Result<Measured> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        let shown = format!(
            "{} {}",
            cmd.get_program().to_string_lossy(),
            cmd.get_args().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
        );
        let started = Instant::now();
        let child = cmd.spawn().with_context(|| format!("cannot start {shown}"))?;
        let pid = child.id() as i32;
        let done = AtomicBool::new(false);
        let (hwm, anon) = (AtomicU64::new(0), AtomicU64::new(0));
        let (status, (maxrss_kib, cpu), wall) = std::thread::scope(|s| {
            if self.sample {
                s.spawn(|| {
                    while !done.load(Ordering::Relaxed) {
                        if let Some((h, a)) = proc_status_kib(pid) {
                            hwm.fetch_max(h, Ordering::Relaxed);
                            anon.fetch_max(a, Ordering::Relaxed);
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                });
            }
            let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
            s.spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop_rx.recv_timeout(DEADLINE) {
                    eprintln!("xtask bench: {shown} still runs after {}s; killing it", DEADLINE.as_secs());
                    kill(pid);
                }
            });
            let r = wait4(pid);
            let wall = started.elapsed();
            done.store(true, Ordering::Relaxed);
            drop(stop_tx);
            r.map(|(st, rss)| (st, rss, wall))
        })?;
        // The child was reaped by wait4; std's handle must not wait for it again.
        drop(child);
        if !exited_ok(status) {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "{} failed (wait status {status:#x}); last lines of {}:\n{}",
                cmd.get_program().to_string_lossy(),
                log.display(),
                tail.join("\n")
            );
        }
        let sampled = |v: &AtomicU64| Some(v.load(Ordering::Relaxed)).filter(|k| self.sample && *k > 0);
        Ok(Measured { wall, maxrss_kib, own_hwm_kib: sampled(&hwm), anon_peak_kib: sampled(&anon), cpu })
    }
}

/// User + system CPU time a live process has used so far (`/proc/PID/stat`, fields 14 and 15),
/// or zero when it cannot be read.
pub fn process_cpu(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return Duration::ZERO };
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { return Duration::ZERO };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf only reads a constant of the running system.
    #[allow(unsafe_code)]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / hz)
}

/// `VmHWM` and `RssAnon` of a live process, KiB.
fn proc_status_kib(pid: i32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        s.lines().find(|l| l.starts_with(name))?.split_whitespace().nth(1)?.parse().ok()
    };
    Some((field("VmHWM:")?, field("RssAnon:")?))
}

fn exited_ok(status: i32) -> bool {
    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
}

/// Reaps `pid`, returning its wait status, `ru_maxrss` (KiB on Linux) and user + system time.
#[allow(unsafe_code)]
fn wait4(pid: i32) -> Result<(i32, (u64, Duration))> {
    let mut status: libc::c_int = 0;
    // SAFETY: all-zero bytes are a valid `rusage` (plain integers and timevals).
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `status` and `ru` are live, writable and of the types wait4 expects; `pid` is
        // our own unreaped child, so nothing else reaps it concurrently.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            let tv = |t: libc::timeval| {
                Duration::from_micros((t.tv_sec.max(0) as u64) * 1_000_000 + t.tv_usec.max(0) as u64)
            };
            return Ok((status, (ru.ru_maxrss.max(0) as u64, tv(ru.ru_utime) + tv(ru.ru_stime))));
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            bail!("wait4({pid}): {err}");
        }
    }
}

/// SIGTERM to a process; used for the etcd the benchmark started itself.
#[allow(unsafe_code)]
pub fn terminate(pid: u32) {
    // SAFETY: kill(2) takes plain integers; `pid` is a child we have not reaped yet.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
}

#[allow(unsafe_code)]
fn kill(pid: i32) {
    // SAFETY: as in `terminate`.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Flushes dirty pages, so that one run's writeback does not land in the next run's time.
#[allow(unsafe_code)]
pub fn sync() {
    // SAFETY: sync(2) takes nothing and cannot fail.
    unsafe { libc::sync() }
}
