//! Retention: keep the N newest snapshots of a name prefix, delete the rest with their metadata.

use futures::StreamExt;

use crate::metadata::SnapshotMetadata;
use crate::name;
use crate::store::SnapshotStore;
use crate::Result;

/// Which snapshots of a prefix to prune. Every node's snapshots of the prefix count, in a local
/// dir (so a renamed host leaves none behind, k3s #8099) as in S3 (SPEC §5).
#[derive(Debug, Clone)]
pub struct RetentionPolicy<'a> {
    /// `--name` / `--etcd-snapshot-name`.
    pub prefix: &'a str,
    /// How many to keep; < 1 keeps all.
    pub keep: i64,
}

/// Given `(file, timestamp)` pairs, the files beyond the `keep` newest (newest first by timestamp,
/// then by name so that the order is total).
pub fn expired(mut candidates: Vec<(String, i64)>, keep: i64) -> Vec<String> {
    if keep < 1 {
        return Vec::new();
    }
    candidates.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    candidates.into_iter().skip(keep as usize).map(|(f, _)| f).collect()
}

/// Applies retention to a store; returns the deleted file names. Files that are not snapshots of
/// ours (see [`name::parse`]) and snapshots of other prefixes are never touched. Only the
/// names are held in memory, never the objects.
pub async fn prune(store: &dyn SnapshotStore, policy: &RetentionPolicy<'_>) -> Result<Vec<String>> {
    if policy.keep < 1 {
        return Ok(Vec::new());
    }
    let list_prefix = format!("{}-", policy.prefix);
    let mut candidates = Vec::new();
    // Names that parse but that we would never write (`..`, a leading dot…): one odd object must
    // not make every later batch fail, so they are left alone, with one warning per run.
    let (mut odd, mut first_odd) = (0u64, None);
    let mut listing = store.list(&list_prefix);
    while let Some(obj) = listing.next().await {
        let obj = obj?;
        if let Some(ts) = name::matches_prefix(&obj.key, policy.prefix) {
            if name::validate_file_name(&obj.key).is_err() {
                odd += 1;
                first_odd.get_or_insert(obj.key);
                continue;
            }
            candidates.push((obj.key, ts));
        }
    }
    drop(listing);
    if let Some(first) = first_odd {
        tracing::warn!(store = %store.describe(), count = odd, first = %crate::status::printable(&first),
            "retention leaves alone objects under the prefix whose names this tool would not have written");
    }
    let doomed = expired(candidates, policy.keep);
    // Oldest first, as the holds end.
    let doomed = without_held(store, doomed.into_iter().rev().collect(), "snapshots past retention").await?;
    for chunk in doomed.chunks(500) {
        let mut keys = Vec::with_capacity(chunk.len() * 2);
        for f in chunk {
            keys.push(f.clone());
            keys.push(SnapshotMetadata::key_for(f));
        }
        store.delete(&keys).await?;
        for f in chunk {
            tracing::info!(snapshot = %f, store = %store.describe(), "pruned snapshot");
        }
    }
    Ok(doomed)
}

/// Deletes a snapshot and its metadata on request (`etcd-snapshot delete`, the API), unless the
/// store holds it: then nothing is deleted and the hold is returned, for the caller to say so.
pub async fn delete_unless_held(store: &dyn SnapshotStore, file: &str) -> Result<Option<crate::store::Hold>> {
    if let Some(h) = store.hold(file).await? {
        return Ok(Some(h));
    }
    store.delete(&[file.to_string(), SnapshotMetadata::key_for(file)]).await?;
    Ok(None)
}

/// The files of `oldest_first` that the store lets us delete now (see [`SnapshotStore::hold`]),
/// in the same order. Held ones are left for a later run with one line that says until when;
/// never an error. A retention period runs from when an object was written, so once an object is
/// found under a dated hold, every newer one is taken to be held too and not asked about: a run
/// costs one request per object it deletes, plus one, whatever number waits under a lock. A legal
/// hold (no date) is one object's and does not stop the scan.
pub async fn without_held(store: &dyn SnapshotStore, oldest_first: Vec<String>, what: &str) -> Result<Vec<String>> {
    let mut free = Vec::with_capacity(oldest_first.len());
    let (mut held, mut first): (usize, Option<(String, crate::store::Hold)>) = (0, None);
    let mut files = oldest_first.into_iter();
    for f in files.by_ref() {
        match store.hold(&f).await? {
            None => free.push(f),
            Some(h) => {
                held += 1;
                let dated = h.until.is_some();
                first.get_or_insert((f, h));
                if dated {
                    break;
                }
            }
        }
    }
    held += files.count();
    if let Some((file, hold)) = first {
        tracing::info!(store = %store.describe(), held, first = %file,
            "kept {held} {what}: {file} is under {hold}; they are deleted once their hold has passed");
    }
    Ok(free)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_n() {
        let c = vec![("a-1".into(), 1), ("a-3".into(), 3), ("a-2".into(), 2), ("a-4".into(), 4)];
        assert_eq!(expired(c.clone(), 2), vec!["a-2".to_string(), "a-1".to_string()]);
        assert!(expired(c.clone(), 0).is_empty());
        assert!(expired(c.clone(), -1).is_empty());
        assert!(expired(c, 10).is_empty());
    }

    #[tokio::test]
    async fn every_node_name_of_the_prefix_counts_and_foreign_files_stay() {
        let tmp = tempfile::tempdir().unwrap();
        let store = crate::store::LocalStore::new(tmp.path().join("snapshots"));
        store.ensure_dirs().unwrap();
        let snapshots = ["p-old-host-100", "p-old-host-200.zip", "p-n1-300", "p-n1-400", "q-n1-50"];
        let foreign = ["p-old-host-notanumber", "p-n1-1.part", "p-old-host-7.db", "p-5"];
        for f in snapshots.iter().chain(&foreign) {
            std::fs::write(store.dir().join(f), b"x").unwrap();
        }
        std::fs::write(store.metadata_dir().join("p-old-host-200.zip"), b"{}").unwrap();
        let mut gone = prune(&store, &RetentionPolicy { prefix: "p", keep: 2 }).await.unwrap();
        gone.sort();
        assert_eq!(gone, ["p-old-host-100", "p-old-host-200.zip"]);
        assert!(!store.metadata_dir().join("p-old-host-200.zip").exists());
        for f in ["p-n1-300", "p-n1-400", "q-n1-50"].iter().chain(&foreign) {
            assert!(store.dir().join(f).exists(), "{f} must stay");
        }
    }
}
