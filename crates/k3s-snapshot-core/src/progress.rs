//! Progress reporting without printing: the core calls these hooks; the CLI draws a bar.

/// Receives progress of a long transfer. All methods default to doing nothing.
pub trait Progress: Send + Sync {
    /// A transfer starts; `total` is known for uploads and downloads, not for etcd's stream.
    fn start(&self, _what: &str, _total: Option<u64>) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}

/// No progress reporting.
pub struct NoProgress;
impl Progress for NoProgress {}
