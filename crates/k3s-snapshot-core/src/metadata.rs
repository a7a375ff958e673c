//! Per-snapshot metadata: `.metadata/<file>` beside the snapshot dir, and `folder/.metadata/<file>` on S3.
//!
//! k3s reads these documents into a `map[string]string`, so ours is written as a flat JSON object
//! whose values are all strings (`{"size": "1234", "compressed": "false", ...}`). Three kinds of
//! document are read ([`MetadataDoc::parse`]):
//! - ours, flat;
//! - ours in the typed form earlier versions wrote (numbers and booleans as JSON numbers and
//!   booleans);
//! - k3s's own: the data of its `k3s-etcd-snapshot-extra-metadata` ConfigMap, any flat string map.
//!   It says nothing about the file, so no size or SHA-256 is known: the snapshot's own SHA-256
//!   trailer is then what vouches for it.
//!
//! Restore drills (`etcd-snapshot verify`) add two groups of optional keys, read from either kind
//! of document: [`LiveHash`] (etcd's `HashKV` of the live cluster at the snapshot's revision, taken
//! right after the save; a delta segment's own document holds the one at its last revision) and
//! [`Verified`] (the last successful drill). Keys this version does not know are kept as they
//! were when a document is rewritten.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
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
    /// Encrypted with age (the stored file is `<…>[.zip].age`; `size` and `sha256` are those of
    /// the encrypted bytes).
    #[serde(default)]
    pub encrypted: bool,
    /// The age public keys (`age1…`) it was encrypted to; never a private key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
    /// etcd's cluster ID when it was taken (16 hex digits): the history whose delta segments
    /// may follow it. Absent in k3s's documents and ours from before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    /// The live cluster's `HashKV` at the snapshot's revision, when it was recorded.
    #[serde(skip)]
    pub live_hash: Option<LiveHash>,
    /// The last restore drill that proved this snapshot.
    #[serde(skip)]
    pub verified: Option<Verified>,
    /// Keys of the flat document this version does not know, written back as they were.
    #[serde(skip)]
    pub extra: BTreeMap<String, String>,
}

/// etcd's `HashKV` of a keyspace at a revision: the hash of every key revision kept between the
/// compaction and `revision` (so it covers the history, not only the latest values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveHash {
    pub revision: i64,
    pub hash: u32,
    /// The compaction the hash was taken under (etcd's `compact_revision` in the answer): an
    /// etcd holding the same history hashes the same at `revision` once compacted to it.
    pub compact_revision: i64,
}

impl LiveHash {
    /// Reads the `hashKV*` keys of a flat document; `None` when absent or not numbers.
    pub fn from_map(m: &BTreeMap<String, String>) -> Option<LiveHash> {
        Some(LiveHash {
            hash: m.get(key::HASH_KV)?.parse().ok()?,
            revision: m.get(key::HASH_KV_REVISION)?.parse().ok()?,
            compact_revision: m.get(key::HASH_KV_COMPACT_REVISION).and_then(|v| v.parse().ok()).unwrap_or(0),
        })
    }

    /// Writes the `hashKV*` keys into a flat document.
    pub fn put_into(&self, m: &mut BTreeMap<String, String>) {
        m.insert(key::HASH_KV.into(), self.hash.to_string());
        m.insert(key::HASH_KV_REVISION.into(), self.revision.to_string());
        m.insert(key::HASH_KV_COMPACT_REVISION.into(), self.compact_revision.to_string());
    }

    /// The document of a delta segment (`.metadata/<segment file>`): the live hash at its last
    /// revision, a flat string map as every metadata document.
    pub fn segment_document(&self) -> Vec<u8> {
        let mut m = BTreeMap::new();
        self.put_into(&mut m);
        serde_json::to_vec_pretty(&m).expect("a string map always serializes")
    }
}

/// What a successful restore drill recorded about a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub at: DateTime<Utc>,
    /// The measured recovery time, end to end, in milliseconds.
    pub rto_ms: u64,
    /// The revision the drill restored to (the snapshot's, or the end of its replayed chain).
    pub revision: i64,
    /// The `HashKV` that matched the live cluster's; `None` when no live hash was recorded, so
    /// content was not compared.
    pub hash_kv: Option<u32>,
}

impl Verified {
    pub fn from_map(m: &BTreeMap<String, String>) -> Option<Verified> {
        let at = DateTime::parse_from_rfc3339(m.get(key::VERIFIED_AT)?).ok()?.with_timezone(&Utc);
        Some(Verified {
            at,
            rto_ms: m
                .get(key::VERIFIED_RTO)
                .and_then(|v| v.trim_end_matches('s').parse::<f64>().ok())
                .map_or(0, |s| (s * 1000.0).round() as u64),
            revision: m.get(key::VERIFIED_REVISION).and_then(|v| v.parse().ok()).unwrap_or(0),
            hash_kv: m.get(key::VERIFIED_HASH_KV).and_then(|v| v.parse().ok()),
        })
    }

    pub fn put_into(&self, m: &mut BTreeMap<String, String>) {
        m.insert(key::VERIFIED_AT.into(), self.at.to_rfc3339_opts(SecondsFormat::Secs, true));
        m.insert(key::VERIFIED_RTO.into(), format!("{}.{:03}s", self.rto_ms / 1000, self.rto_ms % 1000));
        m.insert(key::VERIFIED_REVISION.into(), self.revision.to_string());
        match self.hash_kv {
            Some(h) => m.insert(key::VERIFIED_HASH_KV.into(), h.to_string()),
            None => m.remove(key::VERIFIED_HASH_KV),
        };
    }
}

/// Keys of the flat document. Those in [`REQUIRED`] are always written; a string map that holds
/// all of them is ours, any other string map is k3s's extra metadata.
mod key {
    pub const NAME: &str = "name";
    pub const NODE_NAME: &str = "nodeName";
    pub const SIZE: &str = "size";
    pub const CREATED_AT: &str = "createdAt";
    pub const COMPRESSED: &str = "compressed";
    pub const SHA256: &str = "sha256";
    pub const ETCD_REVISION: &str = "etcdRevision";
    pub const ETCD_VERSION: &str = "etcdVersion";
    pub const TOTAL_KEY: &str = "totalKey";
    pub const TOKEN_HASH: &str = "tokenHash";
    pub const ENCRYPTED: &str = "encrypted";
    pub const RECIPIENTS: &str = "encryptionRecipients";
    pub const CLUSTER_ID: &str = "etcdClusterId";
    pub const HASH_KV: &str = "hashKV";
    pub const HASH_KV_REVISION: &str = "hashKVRevision";
    pub const HASH_KV_COMPACT_REVISION: &str = "hashKVCompactRevision";
    pub const VERIFIED_AT: &str = "verifiedAt";
    pub const VERIFIED_RTO: &str = "verifiedRTO";
    pub const VERIFIED_REVISION: &str = "verifiedRevision";
    pub const VERIFIED_HASH_KV: &str = "verifiedHashKV";
    pub const KNOWN: [&str; 20] = [
        NAME,
        NODE_NAME,
        SIZE,
        CREATED_AT,
        COMPRESSED,
        SHA256,
        ETCD_REVISION,
        ETCD_VERSION,
        TOTAL_KEY,
        TOKEN_HASH,
        ENCRYPTED,
        RECIPIENTS,
        CLUSTER_ID,
        HASH_KV,
        HASH_KV_REVISION,
        HASH_KV_COMPACT_REVISION,
        VERIFIED_AT,
        VERIFIED_RTO,
        VERIFIED_REVISION,
        VERIFIED_HASH_KV,
    ];
    pub const REQUIRED: [&str; 6] = [NAME, NODE_NAME, SIZE, CREATED_AT, COMPRESSED, SHA256];
}

impl SnapshotMetadata {
    /// The flat document: a JSON object of strings, which k3s can read.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(&self.to_map()).expect("a string map always serializes")
    }

    /// The document as the string map k3s sees (and `ls -o json` shows as `spec.metadata`).
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut m = self.extra.clone();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_string(), v);
        };
        put(key::NAME, self.name.clone());
        put(key::NODE_NAME, self.node_name.clone());
        put(key::SIZE, self.size.to_string());
        put(key::CREATED_AT, self.created_at.to_rfc3339_opts(SecondsFormat::AutoSi, true));
        put(key::COMPRESSED, self.compressed.to_string());
        put(key::SHA256, self.sha256.clone());
        if let Some(r) = self.etcd_revision {
            put(key::ETCD_REVISION, r.to_string());
        }
        if let Some(v) = &self.etcd_version {
            put(key::ETCD_VERSION, v.clone());
        }
        if let Some(n) = self.total_key {
            put(key::TOTAL_KEY, n.to_string());
        }
        if let Some(t) = &self.token_hash {
            put(key::TOKEN_HASH, t.clone());
        }
        if let Some(c) = &self.cluster_id {
            put(key::CLUSTER_ID, c.clone());
        }
        // Only on encrypted snapshots, so that plain ones keep exactly the keys k3s knows.
        if self.encrypted {
            put(key::ENCRYPTED, "true".into());
            put(key::RECIPIENTS, self.recipients.join(","));
        }
        if let Some(h) = &self.live_hash {
            h.put_into(&mut m);
        }
        if let Some(v) = &self.verified {
            v.put_into(&mut m);
        }
        m
    }

    /// Reads our flat document; `Ok(None)` when the map lacks one of our required keys (then it
    /// is not ours). A value of ours that does not parse is an error naming the key.
    fn from_map(m: &BTreeMap<String, String>) -> Result<Option<Self>, String> {
        if !key::REQUIRED.iter().all(|k| m.contains_key(*k)) {
            return Ok(None);
        }
        fn parsed<T: std::str::FromStr>(
            m: &BTreeMap<String, String>,
            k: &str,
            what: &str,
        ) -> Result<Option<T>, String> {
            m.get(k).map(|v| v.parse::<T>().map_err(|_| format!("{k:?} is {v:?}, not {what}"))).transpose()
        }
        let created = &m[key::CREATED_AT];
        let created_at = DateTime::parse_from_rfc3339(created)
            .map_err(|_| format!("{:?} is {created:?}, not an RFC 3339 time", key::CREATED_AT))?
            .with_timezone(&Utc);
        let sha256 = m[key::SHA256].clone();
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{:?} is {sha256:?}, not 64 hex digits", key::SHA256));
        }
        Ok(Some(SnapshotMetadata {
            name: m[key::NAME].clone(),
            node_name: m[key::NODE_NAME].clone(),
            size: parsed(m, key::SIZE, "a size in bytes")?.unwrap_or_default(),
            created_at,
            compressed: parsed(m, key::COMPRESSED, "true or false")?.unwrap_or_default(),
            sha256,
            etcd_revision: parsed(m, key::ETCD_REVISION, "a revision")?,
            etcd_version: m.get(key::ETCD_VERSION).cloned(),
            total_key: parsed(m, key::TOTAL_KEY, "a key count")?,
            token_hash: m.get(key::TOKEN_HASH).cloned(),
            encrypted: parsed(m, key::ENCRYPTED, "true or false")?.unwrap_or_default(),
            recipients: m
                .get(key::RECIPIENTS)
                .map(|r| r.split(',').map(str::trim).filter(|r| !r.is_empty()).map(str::to_string).collect())
                .unwrap_or_default(),
            cluster_id: m.get(key::CLUSTER_ID).cloned(),
            live_hash: LiveHash::from_map(m),
            verified: Verified::from_map(m),
            extra: m
                .iter()
                .filter(|(k, _)| !key::KNOWN.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }))
    }

    /// Key of the metadata object for a snapshot file name.
    pub fn key_for(file: &str) -> String {
        format!("{METADATA_DIR}/{file}")
    }
}

/// A `.metadata/<file>` document as read.
#[derive(Debug, Clone, PartialEq, Eq)]
// A handful of documents are alive at a time (one per listed snapshot): boxing the larger
// variant would buy nothing measurable and cost every match on it.
#[allow(clippy::large_enum_variant)]
pub enum MetadataDoc {
    /// Ours: written by this tool, flat or in the earlier typed form.
    Ours(SnapshotMetadata),
    /// k3s's: the data of its extra-metadata ConfigMap at the time of the snapshot. Nothing about
    /// the file (size, SHA-256, node) is known from it.
    K3s(BTreeMap<String, String>),
}

impl MetadataDoc {
    /// Parses a document; the error says what is wrong with it, in one line.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON ({e})"))?;
        let serde_json::Value::Object(obj) = &value else {
            return Err("not a JSON object".into());
        };
        if obj.values().all(|v| v.is_string()) {
            let map: BTreeMap<String, String> =
                obj.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect();
            return Ok(match SnapshotMetadata::from_map(&map)? {
                Some(ours) => MetadataDoc::Ours(ours),
                None => MetadataDoc::K3s(map),
            });
        }
        // Not a string map, so not k3s's: the typed form of our earlier versions.
        serde_json::from_value::<SnapshotMetadata>(value)
            .map(MetadataDoc::Ours)
            .map_err(|e| format!("neither a string map nor our typed metadata ({e})"))
    }

    /// Ours, when it is.
    pub fn ours(&self) -> Option<&SnapshotMetadata> {
        match self {
            MetadataDoc::Ours(m) => Some(m),
            MetadataDoc::K3s(_) => None,
        }
    }

    /// The document as written: ours flat, k3s's as k3s marshals its map (compact, keys sorted).
    pub fn to_json(&self) -> Vec<u8> {
        match self {
            MetadataDoc::Ours(m) => m.to_json(),
            MetadataDoc::K3s(m) => serde_json::to_vec(m).expect("a string map always serializes"),
        }
    }

    /// The document as a string map, as k3s would read it.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        match self {
            MetadataDoc::Ours(m) => m.to_map(),
            MetadataDoc::K3s(m) => m.clone(),
        }
    }

    /// The live hash recorded at save time, in either kind of document.
    pub fn live_hash(&self) -> Option<LiveHash> {
        match self {
            MetadataDoc::Ours(m) => m.live_hash,
            MetadataDoc::K3s(m) => LiveHash::from_map(m),
        }
    }

    /// The last successful restore drill, in either kind of document.
    pub fn verified(&self) -> Option<Verified> {
        match self {
            MetadataDoc::Ours(m) => m.verified.clone(),
            MetadataDoc::K3s(m) => Verified::from_map(m),
        }
    }

    /// Records a successful drill: ours gets the fields, k3s's string map the same keys (it stays
    /// a string map k3s reads).
    pub fn set_verified(&mut self, v: Verified) {
        match self {
            MetadataDoc::Ours(m) => m.verified = Some(v),
            MetadataDoc::K3s(m) => v.put_into(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SnapshotMetadata {
        SnapshotMetadata {
            name: "on-demand-n1-1700000000.zip".into(),
            node_name: "n1".into(),
            size: 1234,
            created_at: DateTime::parse_from_rfc3339("2023-11-14T22:13:20.5Z").unwrap().with_timezone(&Utc),
            compressed: true,
            sha256: "ab".repeat(32),
            etcd_revision: Some(42),
            etcd_version: Some("3.5.1".into()),
            total_key: Some(7),
            token_hash: Some("0123456789ab".into()),
            encrypted: false,
            recipients: Vec::new(),
            cluster_id: None,
            live_hash: None,
            verified: None,
            extra: BTreeMap::new(),
        }
    }

    #[test]
    fn written_flat_with_every_value_a_string_and_read_back() {
        let m = sample();
        let doc: serde_json::Value = serde_json::from_slice(&m.to_json()).unwrap();
        let obj = doc.as_object().unwrap();
        assert!(obj.values().all(|v| v.is_string()), "{doc}");
        assert_eq!(doc["size"], "1234");
        assert_eq!(doc["compressed"], "true");
        assert_eq!(doc["etcdRevision"], "42");
        assert_eq!(doc["totalKey"], "7");
        assert_eq!(MetadataDoc::parse(&m.to_json()).unwrap(), MetadataDoc::Ours(m));
    }

    #[test]
    fn encryption_is_recorded_with_the_public_keys_only_when_encrypted() {
        let plain = sample().to_map();
        assert!(!plain.contains_key("encrypted") && !plain.contains_key("encryptionRecipients"), "{plain:?}");
        let m = SnapshotMetadata {
            name: "on-demand-n1-1700000000.zip.age".into(),
            encrypted: true,
            recipients: vec!["age1aaa".into(), "age1bbb".into()],
            cluster_id: None,
            ..sample()
        };
        let doc: serde_json::Value = serde_json::from_slice(&m.to_json()).unwrap();
        assert_eq!(doc["encrypted"], "true");
        assert_eq!(doc["encryptionRecipients"], "age1aaa,age1bbb");
        assert_eq!(MetadataDoc::parse(&m.to_json()).unwrap(), MetadataDoc::Ours(m));
    }

    #[test]
    fn live_hash_verification_and_unknown_keys_survive_a_rewrite() {
        let mut m = sample();
        m.live_hash = Some(LiveHash { revision: 42, hash: 4_000_000_001, compact_revision: 7 });
        let mut doc: BTreeMap<String, String> = serde_json::from_slice(&m.to_json()).unwrap();
        assert_eq!(doc["hashKV"], "4000000001");
        assert_eq!(doc["hashKVCompactRevision"], "7");
        doc.insert("writtenByANewerVersion".into(), "kept".into());
        let mut read = MetadataDoc::parse(&serde_json::to_vec(&doc).unwrap()).unwrap();
        assert_eq!(read.live_hash(), m.live_hash);
        let at = DateTime::parse_from_rfc3339("2024-01-02T03:04:05Z").unwrap().with_timezone(&Utc);
        read.set_verified(Verified { at, rto_ms: 12_346, revision: 42, hash_kv: Some(4_000_000_001) });
        let again: BTreeMap<String, String> = serde_json::from_slice(&read.to_json()).unwrap();
        assert_eq!(again["writtenByANewerVersion"], "kept");
        assert_eq!(again["verifiedAt"], "2024-01-02T03:04:05Z");
        assert_eq!(again["verifiedRTO"], "12.346s");
        assert_eq!(again["verifiedHashKV"], "4000000001");
        let v = MetadataDoc::parse(&read.to_json()).unwrap().verified().unwrap();
        assert_eq!((v.revision, v.hash_kv, v.rto_ms), (42, Some(4_000_000_001), 12_346));
        // k3s's string map takes the same keys and stays a string map.
        let mut k3s = MetadataDoc::parse(br#"{"foo":"bar"}"#).unwrap();
        k3s.set_verified(Verified { at, rto_ms: 1_000, revision: 9, hash_kv: None });
        let k: BTreeMap<String, String> = serde_json::from_slice(&k3s.to_json()).unwrap();
        assert_eq!((k["foo"].as_str(), k["verifiedRevision"].as_str()), ("bar", "9"));
        assert!(!k.contains_key("verifiedHashKV"), "content not compared: no hash recorded");
    }

    #[test]
    fn the_typed_form_of_earlier_versions_is_still_read() {
        let typed = br#"{"name":"on-demand-n1-1700000000.zip","nodeName":"n1","size":1234,
            "createdAt":"2023-11-14T22:13:20.500Z","compressed":true,"sha256":"abababababababababababababababababababababababababababababababab",
            "etcdRevision":42,"etcdVersion":"3.5.1","totalKey":7,"tokenHash":"0123456789ab"}"#;
        assert_eq!(MetadataDoc::parse(typed).unwrap(), MetadataDoc::Ours(sample()));
    }

    #[test]
    fn any_other_string_map_is_k3s_extra_metadata() {
        let doc = MetadataDoc::parse(br#"{"foo":"bar"}"#).unwrap();
        assert_eq!(doc, MetadataDoc::K3s(BTreeMap::from([("foo".to_string(), "bar".to_string())])));
        assert!(doc.ours().is_none());
        // Some of our keys, but not all: still k3s's, never an error.
        let partial = MetadataDoc::parse(br#"{"size":"big","sha256":"x"}"#).unwrap();
        assert!(matches!(partial, MetadataDoc::K3s(_)));
        assert!(matches!(MetadataDoc::parse(b"{}").unwrap(), MetadataDoc::K3s(m) if m.is_empty()));
    }

    #[test]
    fn broken_documents_say_what_is_wrong() {
        let mut m = sample().to_map();
        m.insert("size".into(), "twelve".into());
        let err = MetadataDoc::parse(&serde_json::to_vec(&m).unwrap()).unwrap_err();
        assert!(err.contains("\"size\"") && err.contains("twelve"), "{err}");
        assert!(MetadataDoc::parse(b"[1]").unwrap_err().contains("not a JSON object"));
        assert!(MetadataDoc::parse(b"{").unwrap_err().contains("not JSON"));
        assert!(MetadataDoc::parse(br#"{"size":1}"#).unwrap_err().contains("typed"));
    }
}
