//! The service manager's readiness protocol (`sd_notify(3)`, through the `sd-notify` crate): one
//! datagram per state change to the unix socket `NOTIFY_SOCKET` names, which systemd sets for a
//! `Type=notify` unit. Without the variable every call does nothing.
//!
//! [`server::run`](crate::server::run) sends `READY=1` once etcd answered its health check and the
//! supervisor API listens, `STOPPING=1` when it begins to shut down, and `STATUS=` lines for what
//! a start or a `--cluster-reset` restore is doing (`systemctl status` shows the last one).
//! `NOTIFY_SOCKET` stays in our environment but never reaches etcd or its tools (their
//! environment is an allowlist, see `etcd_proc`), so etcd's own sd_notify support stays silent.
//! A failure to send is a warning: the server never stops over it.

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    // `false`: keep NOTIFY_SOCKET, so every later state change reaches the manager too.
    if let Err(e) = sd_notify::notify(false, states) {
        let what: Vec<String> = states.iter().map(|s| s.to_string()).collect();
        tracing::warn!(error = %e, state = %what.join(" "), "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STOPPING=1` with a status line.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// A `STATUS=` line. Newlines would end the assignment early, so they become spaces.
pub fn status(status: &str) {
    send(&[NotifyState::Status(&status.replace('\n', " "))]);
}
