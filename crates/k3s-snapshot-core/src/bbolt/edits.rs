//! What a write of a bbolt image takes and gives, shared by the bulk rewrite ([`super::writer`]),
//! the in-place commit (`commit`) and the append ([`super::append`]): [`Edits`] and bbolt's size
//! limits on them, [`Written`], and [`WriteError`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::BoltError;

/// bbolt's largest key and value (`MaxKeySize`, `MaxValueSize`).
pub const MAX_KEY_SIZE: usize = 32768;
pub const MAX_VALUE_SIZE: usize = (1 << 31) - 2;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Read(#[from] BoltError),
    #[error("cannot {action} {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid edit: {0}")]
    Edit(String),
    #[error("bbolt image {} cannot be rewritten: {detail}", .path.display())]
    Source { detail: String, path: PathBuf },
}

pub(super) type KeyEdits = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Puts and deletes of keys in top-level buckets, applied while an image is copied. A bucket
/// named by an edit that the image lacks is created.
#[derive(Debug, Default, Clone)]
pub struct Edits {
    pub(super) buckets: BTreeMap<Vec<u8>, KeyEdits>,
}

impl Edits {
    pub fn put(&mut self, bucket: &[u8], key: &[u8], value: &[u8]) -> &mut Self {
        self.buckets.entry(bucket.to_vec()).or_default().insert(key.to_vec(), Some(value.to_vec()));
        self
    }

    pub fn delete(&mut self, bucket: &[u8], key: &[u8]) -> &mut Self {
        self.buckets.entry(bucket.to_vec()).or_default().insert(key.to_vec(), None);
        self
    }

    pub(super) fn validate(&self) -> Result<(), WriteError> {
        for (b, keys) in &self.buckets {
            if b.is_empty() || b.len() > MAX_KEY_SIZE {
                return Err(WriteError::Edit(format!("bucket name of {} bytes", b.len())));
            }
            for (k, v) in keys {
                if k.is_empty() || k.len() > MAX_KEY_SIZE {
                    return Err(WriteError::Edit(format!("key of {} bytes", k.len())));
                }
                if v.as_ref().is_some_and(|v| v.len() > MAX_VALUE_SIZE) {
                    return Err(WriteError::Edit("value larger than bbolt allows".into()));
                }
            }
        }
        Ok(())
    }
}

/// What was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Pages in the new image (its high-water mark).
    pub pages: u64,
    /// Bytes of the new file.
    pub size: u64,
}
