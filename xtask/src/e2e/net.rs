//! The e2e network: Linux network namespaces joined by a bridge, created with iproute2 and
//! removed again by [`Net`]'s drop (also after a failure or Ctrl-C), plus a sweep at start-up that
//! removes whatever an earlier, killed run left behind.
//!
//! ```text
//!   root ns: k3se2e-ctl 10.77.0.254 ──┐
//!                                     │  ns k3se2e-net: bridge br0
//!   ns k3se2e-node1: eth0 10.77.0.1 ──┤  (ports p-<host>; a port set down cuts that host off)
//!   ns k3se2e-node2: eth0 10.77.0.2 ──┤
//!   ns k3se2e-node3: eth0 10.77.0.3 ──┤
//!   ns k3se2e-objstore: eth0 10.77.0.100 (s3s-fs)
//! ```
//!
//! The bridge lives in its own namespace, so the host's firewall and bridge-netfilter settings
//! never see the traffic and nothing but one veth end is added to the host's own network.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Every namespace and root-namespace link this task creates starts with this.
pub const PREFIX: &str = "k3se2e";
const NET_NS: &str = "k3se2e-net";
const CTL_LINK: &str = "k3se2e-ctl";
pub const CTL_IP: &str = "10.77.0.254";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: i32) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set a flag that every wait loop checks, so that a Ctrl-C unwinds through
/// the guards (servers stopped, namespaces deleted, tmpfs unmounted) instead of killing us there.
#[allow(unsafe_code)]
pub fn install_interrupt_handler() {
    extern "C" {
        fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
    }
    // SAFETY: `signal` is the C library's; the handler only stores to an atomic, which is
    // async-signal-safe. 2 and 15 are SIGINT and SIGTERM on Linux.
    unsafe {
        signal(2, on_signal);
        signal(15, on_signal);
    }
}

/// Fails once SIGINT or SIGTERM arrived.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps one poll interval, failing if we were interrupted.
pub fn tick(d: Duration) -> Result<()> {
    check_interrupted()?;
    std::thread::sleep(d);
    check_interrupted()
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().context("cannot run `ip` (iproute2)")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn ip_out(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().context("cannot run `ip` (iproute2)")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn our_namespaces() -> Result<Vec<String>> {
    Ok(ip_out(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{PREFIX}-")))
        .map(String::from)
        .collect())
}

/// Kills every process inside a namespace (servers, their etcd, s3s-fs), then deletes it.
fn remove_namespace(ns: &str) {
    for _ in 0..50 {
        let pids: Vec<String> =
            ip_out(&["netns", "pids", ns]).unwrap_or_default().split_whitespace().map(String::from).collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids.iter().filter_map(|p| p.parse::<u32>().ok()) {
            let _ = crate::signal(pid, nix::sys::signal::Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = ip(&["netns", "del", ns]);
}

/// Unmounts every mount below `dir` (the disk-full tmpfs of a killed run).
pub fn unmount_below(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else { return };
    let prefix = dir.display().to_string();
    let mut points: Vec<&str> =
        mounts.lines().filter_map(|l| l.split_whitespace().nth(1)).filter(|p| p.starts_with(&prefix)).collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").arg("-l").arg(p).status();
    }
}

/// Removes what an earlier run left: its namespaces (and the processes in them), the controller
/// link, tmpfs mounts under `work_root`. Only called while holding the e2e lock, so no other run
/// owns these.
pub fn sweep(work_root: &Path) -> Result<()> {
    let leftovers = our_namespaces()?;
    if !leftovers.is_empty() {
        eprintln!("e2e: removing namespaces left by an earlier run: {}", leftovers.join(" "));
    }
    // Hosts first (their processes), the bridge namespace last.
    for ns in leftovers.iter().filter(|n| n.as_str() != NET_NS).chain(leftovers.iter().filter(|n| n.as_str() == NET_NS))
    {
        remove_namespace(ns);
    }
    if ip_out(&["-o", "link", "show"])?.contains(&format!(" {CTL_LINK}@")) {
        let _ = ip(&["link", "del", CTL_LINK]);
    }
    unmount_below(work_root);
    Ok(())
}

/// One run's network. Dropping it removes every namespace and link it created.
pub struct Net {
    namespaces: Vec<String>,
    ctl_link: bool,
}

impl Net {
    /// The bridge namespace and the controller's link into it (10.77.0.254 in the root ns).
    pub fn create() -> Result<Net> {
        let mut net = Net { namespaces: Vec::new(), ctl_link: false };
        ip(&["netns", "add", NET_NS])?;
        net.namespaces.push(NET_NS.into());
        ip(&["-n", NET_NS, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", NET_NS, "link", "set", "br0", "up"])?;
        ip(&["link", "add", CTL_LINK, "type", "veth", "peer", "name", "ctl", "netns", NET_NS])?;
        net.ctl_link = true;
        ip(&["-n", NET_NS, "link", "set", "ctl", "master", "br0", "up"])?;
        ip(&["addr", "add", &format!("{CTL_IP}/24"), "dev", CTL_LINK])?;
        ip(&["link", "set", CTL_LINK, "up"])?;
        Ok(net)
    }

    /// A host: namespace `k3se2e-<name>` whose eth0 (`ip`/24) is plugged into the bridge.
    pub fn add_host(&mut self, name: &str, ip_addr: &str) -> Result<String> {
        let ns = format!("{PREFIX}-{name}");
        ip(&["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        let port = port_name(name);
        ip(&["-n", NET_NS, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        ip(&["-n", NET_NS, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["-n", &ns, "addr", "add", &format!("{ip_addr}/24"), "dev", "eth0"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Cuts a host off the network (its bridge port down): its packets go nowhere, connections
    /// to and from it hang rather than being refused, as on a real link failure.
    pub fn cut(&self, name: &str) -> Result<()> {
        ip(&["-n", NET_NS, "link", "set", &port_name(name), "down"])
    }

    /// Plugs a host back in.
    pub fn heal(&self, name: &str) -> Result<()> {
        ip(&["-n", NET_NS, "link", "set", &port_name(name), "up"])
    }

    /// Slows what the bridge sends to a host to `rate` (a `tc` rate, e.g. `2mbit`): a link that
    /// works, steadily, at a trickle.
    pub fn throttle(&self, name: &str, rate: &str) -> Result<()> {
        let port = port_name(name);
        let status = Command::new("ip")
            .args(["netns", "exec", NET_NS, "tc", "qdisc", "replace", "dev", &port, "root", "tbf"])
            .args(["rate", rate, "burst", "32kbit", "latency", "2s"])
            .status()
            .context("run tc (Debian iproute2)")?;
        if !status.success() {
            bail!("tc could not throttle {port} to {rate} ({status})");
        }
        Ok(())
    }

    /// Takes a throttle off.
    pub fn unthrottle(&self, name: &str) -> Result<()> {
        let port = port_name(name);
        let _ = Command::new("ip")
            .args(["netns", "exec", NET_NS, "tc", "qdisc", "del", "dev", &port, "root"])
            .stderr(Stdio::null())
            .status();
        Ok(())
    }
}

fn port_name(host: &str) -> String {
    let mut p = format!("p-{host}");
    p.truncate(15);
    p
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            remove_namespace(ns);
        }
        if self.ctl_link {
            // Normally gone with its peer's namespace.
            let _ = Command::new("ip").args(["link", "del", CTL_LINK]).stderr(Stdio::null()).status();
        }
    }
}
