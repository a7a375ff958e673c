//! The one error type of the server hooks. Messages are lowercase, one line, and say what to do
//! next where there is something to do.

use std::path::PathBuf;

use k3s_snapshot_core::error::one_line;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] k3s_snapshot_core::Error),

    #[error("cannot {action} {path}: {}", one_line(cause))]
    Io { action: &'static str, path: PathBuf, cause: std::io::Error },

    /// A flag or combination of flags that cannot work; found before anything starts.
    #[error("{0}")]
    Config(String),

    #[error("invalid --etcd-snapshot-schedule-cron {expr:?}: {reason}")]
    Cron { expr: String, reason: String },

    #[error("cannot find {program}: {detail}")]
    Binary { program: String, detail: String },

    #[error("cannot listen on {addr} ({what}): {}; stop whatever uses it or choose another port", one_line(cause))]
    Port { what: &'static str, addr: std::net::SocketAddr, cause: std::io::Error },

    #[error("another server is already running on data dir {data_dir} (lock {lock} is held); stop it first")]
    Locked { data_dir: PathBuf, lock: PathBuf },

    #[error("tls: cannot {action}: {detail}")]
    Tls { action: String, detail: String },

    #[error("token: {0}")]
    Token(String),

    #[error("etcd exited unexpectedly ({status}); its last lines: {last_lines}")]
    EtcdExited { status: String, last_lines: String },

    #[error("etcd at {endpoints} did not become ready within {waited_secs}s: {last}")]
    EtcdNotReady { endpoints: String, waited_secs: u64, last: String },

    #[error("{program} failed ({status}): {output}")]
    Tool { program: String, status: String, output: String },

    /// A cluster-reset pre-check or step that failed; nothing before it was changed unless said.
    #[error("cluster reset: {0}")]
    Reset(String),

    #[error("supervisor api: {0}")]
    Api(String),

    #[error("scheduled snapshots stopped ({0}); the server stops rather than run without them: see the log above, and start it again")]
    Scheduler(String),

    /// Joining a cluster with `--server`: a refusal or a failed step, saying what was left behind.
    #[error("join: {0}")]
    Join(String),

    /// An etcd data dir whose write-ahead log cannot be read.
    #[error("etcd wal: {0}")]
    Wal(String),

    #[error("cancelled")]
    Cancelled,
}

impl Error {
    pub fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |cause| Error::Io { action, path, cause }
    }
}
