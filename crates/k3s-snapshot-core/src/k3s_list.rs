//! The `ETCDSnapshotFileList` that `k3s etcd-snapshot ls -o json|yaml` prints and that a k3s
//! server's `/db/snapshot` list operation answers, so that scripts written for k3s work unchanged,
//! and both our CLI and our server's supervisor API produce (and read back) the same document.
//!
//! k3s (pkg/etcd/snapshot.go `ListSnapshots`, types in pkg/apis/k3s.cattle.io/v1, conversion in
//! pkg/etcd/snapshot/types.go) answers a `v1` `List` of `k3s.cattle.io/v1` `ETCDSnapshotFile`
//! items. The same shape here, field by field. Our own metadata document (sha256, etcd revision
//! and version, key count, token hash) appears in `spec.metadata`, where k3s itself shows the
//! `.metadata` document it reads.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::list::{ls_order, SnapshotEntry};
use crate::metadata::MetadataDoc;

/// Label k3s puts on an `ETCDSnapshotFile`: the node holding the file, or `s3`.
const LABEL_STORAGE_NODE: &str = "etcd.k3s.cattle.io/snapshot-storage-node";
/// Annotation k3s puts on an `ETCDSnapshotFile` when the token hash is known.
const ANNOTATION_TOKEN_HASH: &str = "etcd.k3s.cattle.io/snapshot-token-hash";
/// S3 user metadata k3s (and this tool) writes on a snapshot object (pkg/etcd/s3/s3.go).
const USER_META_NODE: &str = "k3s-node-name";
const USER_META_TOKEN_HASH: &str = "k3s-token-hash";

/// Where the S3 rows come from, as k3s shows it in `spec.s3`. Never credentials.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct S3Origin {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub endpoint: String,
    #[serde(rename = "endpointCA", skip_serializing_if = "String::is_empty")]
    pub endpoint_ca: String,
    #[serde(rename = "skipSSLVerify", skip_serializing_if = "is_false")]
    pub skip_ssl_verify: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub bucket: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub region: String,
    /// The folder (k3s calls it the prefix here).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    #[serde(skip_serializing_if = "is_false")]
    pub insecure: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One row: a local snapshot (held by `node`) or an S3 one.
pub struct Row<'a> {
    pub entry: SnapshotEntry,
    pub s3: Option<&'a S3Origin>,
}

/// Local rows (held by this node) and S3 rows, in `ls` order.
pub fn rows<'a>(local: Vec<SnapshotEntry>, remote: Vec<SnapshotEntry>, s3: Option<&'a S3Origin>) -> Vec<Row<'a>> {
    let mut rows: Vec<Row<'a>> = local.into_iter().map(|entry| Row { entry, s3: None }).collect();
    rows.extend(remote.into_iter().map(|entry| Row { entry, s3 }));
    rows.sort_by(|a, b| ls_order(&a.entry, &b.entry));
    rows
}

/// `kind: List` of `ETCDSnapshotFile` items, in `ls` order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotFileList {
    pub kind: String,
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub items: Vec<Item>,
    /// Continuous backup's delta chains, answered by our server's list so that `ls --etcd-server`
    /// can show them under its table. Not part of k3s's document: absent when empty (so `ls -o
    /// json|yaml`, which never fills it, prints k3s's shape), and k3s's client, which decodes the
    /// answer with Go's `encoding/json`, ignores a field its struct lacks.
    #[serde(default, rename = "deltaChains", skip_serializing_if = "Vec::is_empty")]
    pub delta_chains: Vec<crate::delta::Chain>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Item {
    pub kind: String,
    pub api_version: String,
    pub metadata: ObjectMeta,
    pub spec: Spec,
    pub status: Status,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    /// Always null: the items are not API objects (k3s prints the same).
    pub creation_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    pub snapshot_name: String,
    pub node_name: String,
    pub location: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Origin>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// A Kubernetes quantity, as k3s's `resource.Quantity`: `"1234"`, `"20480k"`.
    pub size: String,
    pub creation_time: String,
    pub ready_to_use: bool,
}

/// The `ETCDSnapshotFile` item of a row. `node` is this node's name: k3s gives local snapshots
/// the lister's node, and S3 ones the node named in the object's user metadata.
fn item(row: &Row<'_>, node: &str) -> Item {
    let e = &row.entry;
    let ours = e.metadata.as_ref().and_then(MetadataDoc::ours);
    let (key_prefix, storage, node_name) = match row.s3 {
        None => ("local-", node.to_string(), node.to_string()),
        Some(_) => {
            let from =
                e.user_metadata(USER_META_NODE).map(str::to_string).or_else(|| ours.map(|m| m.node_name.clone()));
            ("s3-", "s3".to_string(), from.filter(|n| !n.is_empty()).unwrap_or_else(|| "s3".into()))
        }
    };
    let token_hash = e
        .user_metadata(USER_META_TOKEN_HASH)
        .map(str::to_string)
        .or_else(|| ours.and_then(|m| m.token_hash.clone()))
        .filter(|t| !t.is_empty());
    Item {
        kind: "ETCDSnapshotFile".into(),
        api_version: "k3s.cattle.io/v1".into(),
        metadata: ObjectMeta {
            name: format!("{key_prefix}{}", key_safe(&e.name)),
            creation_timestamp: None,
            labels: BTreeMap::from([(LABEL_STORAGE_NODE.to_string(), storage)]),
            annotations: token_hash
                .map(|t| BTreeMap::from([(ANNOTATION_TOKEN_HASH.to_string(), t)]))
                .unwrap_or_default(),
        },
        spec: Spec {
            snapshot_name: e.name.clone(),
            node_name,
            location: e.location.clone(),
            metadata: e.metadata.as_ref().map(MetadataDoc::to_map).unwrap_or_default(),
            s3: row.s3.cloned(),
        },
        status: Status {
            size: quantity(e.size),
            creation_time: e.created.to_rfc3339_opts(SecondsFormat::Secs, true),
            ready_to_use: true,
        },
    }
}

/// k3s's item name: the file name with every character outside `[-._a-zA-Z0-9]` replaced by `_`.
fn key_safe(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "-._".contains(c) { c } else { '_' }).collect()
}

/// A byte count as a canonical decimal-SI Kubernetes quantity: trailing zeros folded into the
/// largest suffix that keeps the number whole (`1000` is `1k`, `1500` stays `1500`).
pub fn quantity(n: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "k", "M", "G", "T", "P", "E"];
    let (mut mantissa, mut i) = (n, 0);
    while mantissa != 0 && mantissa % 1000 == 0 && i + 1 < SUFFIXES.len() {
        mantissa /= 1000;
        i += 1;
    }
    format!("{mantissa}{}", SUFFIXES[i])
}

/// Parses what [`quantity`] writes (and any whole decimal-SI or binary-SI quantity k3s may send).
pub fn parse_quantity(q: &str) -> Option<u64> {
    const SUFFIXES: [(&str, u64); 12] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("Pi", 1 << 50),
        ("Ei", 1 << 60),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("P", 1_000_000_000_000_000),
        ("E", 1_000_000_000_000_000_000),
    ];
    let (digits, factor) = SUFFIXES.iter().find_map(|(s, f)| q.strip_suffix(s).map(|d| (d, *f))).unwrap_or((q, 1));
    digits.parse::<u64>().ok()?.checked_mul(factor)
}

impl SnapshotFileList {
    /// The list of `rows`; `node` is the lister's node name (it holds the local rows).
    pub fn new(rows: &[Row<'_>], node: &str) -> SnapshotFileList {
        SnapshotFileList {
            kind: "List".into(),
            api_version: "v1".into(),
            metadata: BTreeMap::new(),
            items: rows.iter().map(|r| item(r, node)).collect(),
            delta_chains: Vec::new(),
        }
    }
}

impl Item {
    /// The size in bytes (`status.size` read back).
    pub fn size_bytes(&self) -> Option<u64> {
        parse_quantity(&self.status.size)
    }

    /// `status.creationTime` read back.
    pub fn created(&self) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(&self.status.creation_time).ok().map(|t| t.with_timezone(&Utc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_canonical_decimal_si_quantities() {
        for (n, q) in [(0, "0"), (1, "1"), (999, "999"), (1000, "1k"), (1500, "1500"), (20_480_000, "20480k")] {
            assert_eq!(quantity(n), q, "{n}");
        }
        assert_eq!(quantity(3_000_000), "3M");
        assert_eq!(quantity(5_000_000_000_000_000_000), "5E");
    }

    #[test]
    fn quantities_read_back() {
        for n in [0, 1, 999, 1000, 1500, 20_480_000, 3_000_000, u64::MAX] {
            assert_eq!(parse_quantity(&quantity(n)), Some(n), "{n}");
        }
        assert_eq!(parse_quantity("2Ki"), Some(2048));
        assert_eq!(parse_quantity("20E"), None, "beyond u64");
        assert_eq!(parse_quantity("1.5k"), None);
        assert_eq!(parse_quantity(""), None);
    }

    #[test]
    fn delta_chains_are_an_extra_top_level_field_only_when_there_are_some() {
        let mut list = SnapshotFileList::new(&[], "n1");
        let plain = serde_json::to_value(&list).unwrap();
        let keys: Vec<&String> = plain.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["apiVersion", "items", "kind", "metadata"], "k3s's List keys only");
        list.delta_chains = crate::delta::chains(
            "s3://b/f",
            &[
                crate::delta::SegmentName::new(5, 9, "n1", 1, true),
                crate::delta::SegmentName::new(10, 12, "n1", 2, false),
            ],
            &[],
            &Default::default(),
        );
        let text = serde_json::to_string(&list).unwrap();
        let back: SnapshotFileList = serde_json::from_str(&text).unwrap();
        assert_eq!(back.delta_chains, list.delta_chains);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v["deltaChains"],
            serde_json::json!([{"location": "s3://b/f", "fromRevision": 5, "toRevision": 12, "segments": 2, "encrypted": 1, "revisions": 8, "bytes": 0}])
        );
        // A k3s server's answer (no such field) reads back with no chains.
        let k3s: SnapshotFileList = serde_json::from_value(plain).unwrap();
        assert!(k3s.delta_chains.is_empty());
    }

    #[test]
    fn item_names_are_made_key_safe_as_k3s_does() {
        assert_eq!(key_safe("on-demand-n1-17.zip"), "on-demand-n1-17.zip");
        assert_eq!(key_safe("on-demand-node:1+x-17"), "on-demand-node_1_x-17");
    }
}
