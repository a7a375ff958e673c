//! `inspect diff A B` and `inspect diff A --live`: keys added, removed and changed, compared by
//! value (the plaintext's when --encryption-config decrypts it), then a summary by Kubernetes
//! resource and namespace.

use std::collections::BTreeMap;
use std::io::Write;

use k3s_snapshot_core::inspect::at_rest::KeyRing;
use k3s_snapshot_core::inspect::k8s::object_ref;
use k3s_snapshot_core::inspect::{self as core, diff_sorted, fingerprint, Change};

use super::{open, show_key, ListFormat, SourceArgs};
use crate::args::CommonArgs;

/// `NAME[@REVISION]`.
fn split_target(t: &str) -> (&str, Option<i64>) {
    match t.rsplit_once('@') {
        Some((name, rev)) if !name.is_empty() => match rev.parse() {
            Ok(r) => (name, Some(r)),
            Err(_) => (t, None),
        },
        _ => (t, None),
    }
}

async fn side(common: &CommonArgs, t: &str, s: &SourceArgs) -> anyhow::Result<super::Source> {
    let (name, rev) = split_target(t);
    let mut s = s.clone();
    if rev.is_some() {
        s.to_revision = rev;
        s.to_time = None;
    }
    open(common, name, &s).await
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    common: &CommonArgs,
    a: &str,
    b: Option<&str>,
    live: bool,
    s: &SourceArgs,
    prefix: &str,
    output: ListFormat,
    ring: Option<&KeyRing>,
) -> anyhow::Result<()> {
    let sa = side(common, a, s).await?;
    let scan_a = core::state(&sa.db, sa.opened.at, prefix.as_bytes())?;
    let from = sa.describe(scan_a.revision);
    let mut changes: Vec<(Vec<u8>, Change)> = Vec::new();
    let to = if live {
        let cfg = common.etcd_config()?;
        let mut conn = cfg.connect().await?;
        let (rev, live_keys) = core::live::fingerprints(&mut conn, prefix.as_bytes(), ring).await?;
        diff_sorted(
            &scan_a.keys,
            &live_keys,
            |_, e, fp| Ok(fingerprint(core::value_at(&sa.db, e)?, ring) == *fp),
            |k, c| {
                changes.push((k.to_vec(), c));
                Ok(())
            },
        )?;
        format!("the live cluster ({}) at revision {rev}", conn.endpoints)
    } else {
        let sb = side(common, b.unwrap_or_default(), s).await?;
        let scan_b = core::state(&sb.db, sb.opened.at, prefix.as_bytes())?;
        diff_sorted(
            &scan_a.keys,
            &scan_b.keys,
            |_, ea, eb| {
                let va = core::value_at(&sa.db, ea)?;
                let vb = core::value_at(&sb.db, eb)?;
                Ok(va == vb || fingerprint(va, ring) == fingerprint(vb, ring))
            },
            |k, c| {
                changes.push((k.to_vec(), c));
                Ok(())
            },
        )?;
        sb.describe(scan_b.revision)
    };
    print(&changes, &from, &to, output)
}

fn print(changes: &[(Vec<u8>, Change)], from: &str, to: &str, output: ListFormat) -> anyhow::Result<()> {
    let mut summary: BTreeMap<(String, String), [usize; 3]> = BTreeMap::new();
    for (k, c) in changes {
        let r = object_ref(k);
        let res = r.as_ref().map_or("(other keys)".to_string(), |r| r.resource.clone());
        let ns = r.and_then(|r| r.namespace).unwrap_or_else(|| "-".into());
        let slot = summary.entry((res, ns)).or_default();
        slot[*c as usize] += 1;
    }
    let mut out = std::io::stdout().lock();
    match output {
        ListFormat::Json => {
            let items: Vec<_> = changes
                .iter()
                .map(|(k, c)| {
                    let r = object_ref(k).unwrap_or_default();
                    serde_json::json!({"key": String::from_utf8_lossy(k), "change": c, "resource": r.resource, "namespace": r.namespace, "name": r.name})
                })
                .collect();
            let sum: Vec<_> = summary
                .iter()
                .map(|((res, ns), n)| serde_json::json!({"resource": res, "namespace": ns, "added": n[0], "removed": n[1], "changed": n[2]}))
                .collect();
            let doc = serde_json::json!({"from": from, "to": to, "changes": items, "summary": sum});
            writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
        }
        ListFormat::Table => {
            writeln!(out, "# from {from}")?;
            writeln!(out, "# to   {to}")?;
            for (k, c) in changes {
                let mark = match c {
                    Change::Added => '+',
                    Change::Removed => '-',
                    Change::Changed => '~',
                };
                writeln!(out, "{mark} {}", show_key(k))?;
            }
            writeln!(out)?;
            writeln!(out, "{:<32} {:<24} {:>6} {:>8} {:>8}", "RESOURCE", "NAMESPACE", "ADDED", "REMOVED", "CHANGED")?;
            for ((res, ns), n) in &summary {
                writeln!(out, "{res:<32} {ns:<24} {:>6} {:>8} {:>8}", n[0], n[1], n[2])?;
            }
            if changes.is_empty() {
                writeln!(out, "(no differences)")?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn targets_split_at_a_numeric_revision_only() {
        assert_eq!(super::split_target("latest@1200"), ("latest", Some(1200)));
        assert_eq!(super::split_target("/tmp/a@b/snap"), ("/tmp/a@b/snap", None));
        assert_eq!(super::split_target("snap"), ("snap", None));
    }
}
