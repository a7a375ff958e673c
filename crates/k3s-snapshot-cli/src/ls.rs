//! What `etcd-snapshot ls` prints, shaped like `k3s etcd-snapshot ls` so that scripts written for
//! k3s work unchanged.
//!
//! k3s (pkg/cli/etcdsnapshot/etcd_snapshot.go) sorts by creation time then snapshot name, prints a
//! tab-aligned table `Name Location Size Created` (size in bytes, time in RFC 3339, local time),
//! and for `-o json|yaml` the list its server returns: the
//! [`SnapshotFileList`](k3s_snapshot_core::k3s_list::SnapshotFileList). Both come from that list,
//! whether it was built here or answered by a server (`--etcd-server`).

use std::io::Write;

use chrono::SecondsFormat;
use k3s_snapshot_core::k3s_list::SnapshotFileList;
use serde::Serialize;

/// The table, aligned as Go's tabwriter aligns k3s's (one space of padding, last column ragged).
/// When a listed snapshot was proven by a restore drill (`verifiedAt` in its metadata), a fifth
/// column `Verified` says when, the measured RTO and whether content was compared (`-` for the
/// others); without any, the table is exactly k3s's.
pub fn print_table(out: &mut impl Write, list: &SnapshotFileList) -> std::io::Result<()> {
    let verified: Vec<Option<String>> = list.items.iter().map(|i| verified_cell(&i.spec.metadata)).collect();
    if verified.iter().any(Option::is_some) {
        let cells: Vec<Vec<String>> = list
            .items
            .iter()
            .zip(verified)
            .map(|(i, v)| {
                let [a, b, c, d] = row(i);
                vec![a, b, c, d, v.unwrap_or_else(|| "-".into())]
            })
            .collect();
        return print_aligned(out, &["Name", "Location", "Size", "Created", "Verified"], &cells);
    }
    let cells: Vec<Vec<String>> = list.items.iter().map(|i| row(i).to_vec()).collect();
    print_aligned(out, &["Name", "Location", "Size", "Created"], &cells)
}

/// `2024-01-02T04:04:05+01:00 rto=12.3s hashkv=1234` from a snapshot's `verified*` metadata
/// (`hashkv=not-compared` when the drill had no live hash to compare with).
fn verified_cell(md: &std::collections::BTreeMap<String, String>) -> Option<String> {
    let v = k3s_snapshot_core::metadata::Verified::from_map(md)?;
    let at = v.at.with_timezone(&chrono::Local).to_rfc3339_opts(SecondsFormat::Secs, true);
    let hash = v.hash_kv.map_or("not-compared".to_string(), |h| h.to_string());
    Some(format!("{at} rto={:.1}s hashkv={hash}", v.rto_ms as f64 / 1000.0))
}

fn row(i: &k3s_snapshot_core::k3s_list::Item) -> [String; 4] {
    let created = i
        .created()
        .map(|c| c.with_timezone(&chrono::Local).to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_else(|| i.status.creation_time.clone());
    let size = i.size_bytes().map(|n| n.to_string()).unwrap_or_else(|| i.status.size.clone());
    [i.spec.snapshot_name.clone(), i.spec.location.clone(), size, created]
}

/// A table aligned as Go's tabwriter aligns k3s's: each column but the last as wide as its
/// widest cell plus one space, the last ragged.
pub fn print_aligned(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let mut widths = vec![0usize; header.len()];
    for r in std::iter::once(&header).chain(rows) {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len() + 1);
        }
    }
    for r in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}", w = widths[i]));
            }
        }
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// `-o json`: indented by four spaces, as kubectl's printer (which k3s uses) does.
pub fn print_json(out: &mut impl Write, list: &SnapshotFileList) -> anyhow::Result<()> {
    let mut ser =
        serde_json::Serializer::with_formatter(&mut *out, serde_json::ser::PrettyFormatter::with_indent(b"    "));
    list.serialize(&mut ser)?;
    writeln!(out)?;
    Ok(())
}

/// `-o yaml`: keys sorted, as kubectl's printer (JSON turned into YAML) writes them.
pub fn print_yaml(out: &mut impl Write, list: &SnapshotFileList) -> anyhow::Result<()> {
    let value = serde_json::to_value(list)?;
    write!(out, "{}", serde_yaml::to_string(&value)?)?;
    Ok(())
}

/// Prints `list` in `format`: the table with the delta chains (continuous backup) after it, one
/// line each with the revision range, how many revisions a restore from its base replays (what
/// bounds the restore's time), the base, the segment count and size; `-o json|yaml` without them,
/// in k3s's shape.
pub fn print(
    out: &mut impl Write,
    mut list: SnapshotFileList,
    format: crate::args::OutputFormat,
) -> anyhow::Result<()> {
    use crate::args::OutputFormat;
    let chains = std::mem::take(&mut list.delta_chains);
    match format {
        OutputFormat::Table => {
            print_table(out, &list)?;
            print_chains(out, &chains)?;
        }
        OutputFormat::Json => print_json(out, &list)?,
        OutputFormat::Yaml => print_yaml(out, &list)?,
    }
    Ok(())
}

fn print_chains(out: &mut impl Write, chains: &[k3s_snapshot_core::delta::Chain]) -> std::io::Result<()> {
    for c in chains {
        write!(out, "Delta chain in {}: revisions {}-{}, ", c.location, c.from_revision, c.to_revision)?;
        match &c.base {
            Some(base) => write!(out, "{} revisions to replay after {base}", c.revision_count())?,
            None => write!(out, "{} revisions, after no kept snapshot", c.revision_count())?,
        }
        write!(out, ", {} segments", c.segments)?;
        if c.bytes > 0 {
            write!(out, " ({} bytes)", c.bytes)?;
        }
        match c.encrypted {
            0 => writeln!(out)?,
            n if n == c.segments => writeln!(out, ", encrypted")?,
            n => writeln!(out, ", {n} encrypted")?,
        }
    }
    Ok(())
}
