//! Per-snapshot metadata: `.metadata/<file>` beside the snapshot dir, and `folder/.metadata/<file>` on S3.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Directory (or key prefix) that holds metadata, one JSON document per snapshot, same file name.
pub const METADATA_DIR: &str = ".metadata";

/// What we record about a snapshot when it is saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotMetadata {
    /// File name as stored (with `.zip` when compressed).
    pub name: String,
    pub node_name: String,
    /// Size in bytes of the stored file.
    pub size: u64,
    pub created_at: DateTime<Utc>,
    pub compressed: bool,
    /// SHA-256 of the stored bytes (of the zip when compressed), lowercase hex.
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_revision: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_version: Option<String>,
    /// Number of keys in the snapshot, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_key: Option<u64>,
    /// First 12 hex digits of sha256(token); never the token itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_hash: Option<String>,
}

impl SnapshotMetadata {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("metadata always serializes")
    }

    pub fn from_json(bytes: &[u8]) -> serde_json::Result<Self> {
        serde_json::from_slice(bytes)
    }

    /// Key of the metadata object for a snapshot file name.
    pub fn key_for(file: &str) -> String {
        format!("{METADATA_DIR}/{file}")
    }
}
