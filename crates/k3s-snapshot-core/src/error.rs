//! The one error type of the core crate. Every variant carries what failed and, where there is
//! something to do about it, what to do next. Messages are lowercase, one line, no trailing period.
//! Underlying causes are formatted into the message (field `cause`) rather than chained, so that a
//! caller printing with `{:#}` gets one line without repetition.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A cause that has already been reduced to one line of text.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid snapshot name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },

    #[error("snapshot {name} not found in {location}")]
    NotFound { name: String, location: String },

    #[error("cannot {action} {path}: {}", one_line(cause))]
    Io { action: &'static str, path: PathBuf, cause: std::io::Error },

    #[cfg(feature = "etcd")]
    #[error("cannot reach etcd at {endpoints}: {}; check --etcd-endpoints (or the server's etcd config) and that etcd is running", one_line(cause))]
    EtcdUnreachable { endpoints: String, cause: etcd_client::Error },

    #[cfg(feature = "etcd")]
    #[error(
        "etcd snapshot stream from {endpoints} failed after {received} bytes: {}; no snapshot was kept",
        one_line(cause)
    )]
    EtcdStream { endpoints: String, received: u64, cause: etcd_client::Error },

    #[cfg(feature = "etcd")]
    #[error("etcd at {endpoints} cannot confirm that it is part of a quorum ({detail}); no snapshot was taken, because a member cut off from its cluster may hold stale data; check its connection to the other members")]
    NoQuorum { endpoints: String, detail: String },

    #[cfg(feature = "etcd")]
    #[error("etcd at {endpoints}: {}", one_line(cause))]
    Etcd { endpoints: String, cause: etcd_client::Error },

    #[error("snapshot {name} failed its sha256 check: expected {expected}, got {actual}")]
    Checksum { name: String, expected: String, actual: String },

    #[error("snapshot {name} is truncated: {detail}")]
    Truncated { name: String, detail: String },

    #[error("{store}: cannot {op} {key}: {}", one_line(cause.as_ref()))]
    Storage { store: String, op: &'static str, key: String, retryable: bool, cause: Cause },

    #[error("zip {path}: {detail}")]
    Zip { path: PathBuf, detail: String },

    #[error("metadata {path}: {detail}")]
    Metadata { path: PathBuf, detail: String },

    #[error("{what} {path} {detail}; {fix}")]
    UnsafeDir { what: &'static str, path: PathBuf, detail: String, fix: String },

    #[error("not enough space in {dir} for {what}: it needs {need} bytes, {free} are free and {margin} must stay free; free some space or use another directory")]
    NoSpace { dir: PathBuf, what: String, need: u64, free: u64, margin: u64 },

    #[error("{flag} {path} {detail}")]
    KeyFile { flag: &'static str, path: PathBuf, detail: String },

    #[error("snapshot {name} is encrypted (age): give --etcd-snapshot-encryption-identity-file with the private key of one of its recipients; nothing was changed")]
    NeedIdentity { name: String },

    #[error("snapshot {name} cannot be decrypted: {detail}; nothing was changed")]
    Decrypt { name: String, detail: String },

    #[error("{0}")]
    Invalid(String),

    #[error("cancelled")]
    Cancelled,
}

impl Error {
    pub fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |cause| Error::Io { action, path, cause }
    }

    /// Whether trying the same operation again may succeed (network hiccups, throttling, 5xx).
    /// Only storage backends set this; everything else is final.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Storage { retryable: true, .. })
    }
}

/// Formats an error and its sources on one line, `a: b: c`, dropping repeats.
pub fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out.replace(['\n', '\r'], " ")
}
