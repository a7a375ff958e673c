//! What `etcd-snapshot ls` prints, shaped like `k3s etcd-snapshot ls` so that scripts written for
//! k3s work unchanged.
//!
//! k3s (pkg/cli/etcdsnapshot/etcd_snapshot.go) sorts by creation time then snapshot name, prints a
//! tab-aligned table `Name Location Size Created` (size in bytes, time in RFC 3339, local time),
//! and for `-o json|yaml` the list its server returns (pkg/etcd/snapshot.go `ListSnapshots`): a
//! `v1` `List` of `k3s.cattle.io/v1` `ETCDSnapshotFile` items (types in
//! pkg/apis/k3s.cattle.io/v1, conversion in pkg/etcd/snapshot/types.go). The same shape here,
//! field by field. Our own metadata document (sha256, etcd revision and version, key count, token
//! hash) appears in `spec.metadata`, where k3s itself shows the `.metadata` document it reads.

use std::collections::BTreeMap;
use std::io::Write;

use chrono::SecondsFormat;
use k3s_snapshot_core::list::{ls_order, SnapshotEntry};
use k3s_snapshot_core::metadata::MetadataDoc;
use serde::Serialize;

/// Label k3s puts on an `ETCDSnapshotFile`: the node holding the file, or `s3`.
const LABEL_STORAGE_NODE: &str = "etcd.k3s.cattle.io/snapshot-storage-node";
/// Annotation k3s puts on an `ETCDSnapshotFile` when the token hash is known.
const ANNOTATION_TOKEN_HASH: &str = "etcd.k3s.cattle.io/snapshot-token-hash";
/// S3 user metadata k3s (and this tool) writes on a snapshot object (pkg/etcd/s3/s3.go).
const USER_META_NODE: &str = "k3s-node-name";
const USER_META_TOKEN_HASH: &str = "k3s-token-hash";

/// Where the S3 rows come from, as k3s shows it in `spec.s3`. Never credentials.
#[derive(Debug, Clone, Default, Serialize)]
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

/// The table, aligned as Go's tabwriter aligns k3s's (one space of padding, last column ragged).
pub fn print_table(out: &mut impl Write, rows: &[Row<'_>]) -> std::io::Result<()> {
    let cells: Vec<[String; 4]> = rows
        .iter()
        .map(|r| {
            let e = &r.entry;
            let created = e.created.with_timezone(&chrono::Local).to_rfc3339_opts(SecondsFormat::Secs, true);
            [e.name.clone(), e.location.clone(), e.size.to_string(), created]
        })
        .collect();
    let header = ["Name", "Location", "Size", "Created"].map(String::from);
    let mut widths = [0usize; 3];
    for r in std::iter::once(&header).chain(&cells) {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len() + 1);
        }
    }
    for r in std::iter::once(&header).chain(&cells) {
        let [w0, w1, w2] = widths;
        writeln!(out, "{:<w0$}{:<w1$}{:<w2$}{}", r[0], r[1], r[2], r[3])?;
    }
    Ok(())
}

#[derive(Serialize)]
struct List {
    kind: &'static str,
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    metadata: BTreeMap<String, String>,
    items: Vec<Item>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Item {
    kind: &'static str,
    api_version: &'static str,
    metadata: ObjectMeta,
    spec: Spec,
    status: Status,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ObjectMeta {
    name: String,
    /// Always null: the items are not API objects (k3s prints the same).
    creation_timestamp: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    snapshot_name: String,
    node_name: String,
    location: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    metadata: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    s3: Option<S3Origin>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Status {
    /// A Kubernetes quantity, as k3s's `resource.Quantity`: `"1234"`, `"20480k"`.
    size: String,
    creation_time: String,
    ready_to_use: bool,
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
        kind: "ETCDSnapshotFile",
        api_version: "k3s.cattle.io/v1",
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

fn list(rows: &[Row<'_>], node: &str) -> List {
    List {
        kind: "List",
        api_version: "v1",
        metadata: BTreeMap::new(),
        items: rows.iter().map(|r| item(r, node)).collect(),
    }
}

/// `-o json`: indented by four spaces, as kubectl's printer (which k3s uses) does.
pub fn print_json(out: &mut impl Write, rows: &[Row<'_>], node: &str) -> anyhow::Result<()> {
    let mut ser =
        serde_json::Serializer::with_formatter(&mut *out, serde_json::ser::PrettyFormatter::with_indent(b"    "));
    list(rows, node).serialize(&mut ser)?;
    writeln!(out)?;
    Ok(())
}

/// `-o yaml`: keys sorted, as kubectl's printer (JSON turned into YAML) writes them.
pub fn print_yaml(out: &mut impl Write, rows: &[Row<'_>], node: &str) -> anyhow::Result<()> {
    let value = serde_json::to_value(list(rows, node))?;
    write!(out, "{}", serde_yaml::to_string(&value)?)?;
    Ok(())
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
    fn item_names_are_made_key_safe_as_k3s_does() {
        assert_eq!(key_safe("on-demand-n1-17.zip"), "on-demand-n1-17.zip");
        assert_eq!(key_safe("on-demand-node:1+x-17"), "on-demand-node_1_x-17");
    }
}
