//! Listing snapshots of a store, joined with their metadata, for `ls`.

use chrono::{DateTime, TimeZone, Utc};
use futures::StreamExt;
use serde::Serialize;

use crate::metadata::SnapshotMetadata;
use crate::name;
use crate::store::SnapshotStore;
use crate::Result;

/// One row of `ls`.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotEntry {
    pub name: String,
    pub location: String,
    pub size: u64,
    pub created: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<SnapshotMetadata>,
}

/// Lists the snapshots of a store (files that parse as ours), with metadata when `with_metadata`.
/// Sorted by created then name.
pub async fn list_snapshots(store: &dyn SnapshotStore, with_metadata: bool) -> Result<Vec<SnapshotEntry>> {
    let mut entries = Vec::new();
    let mut listing = store.list("");
    while let Some(obj) = listing.next().await {
        let obj = obj?;
        let Some(parsed) = name::parse(&obj.key) else { continue };
        let created = Utc.timestamp_opt(parsed.timestamp, 0).single().or(obj.modified).unwrap_or_else(Utc::now);
        entries.push(SnapshotEntry {
            location: store.location(&obj.key),
            name: obj.key,
            size: obj.size,
            created,
            metadata: None,
        });
    }
    drop(listing);
    if with_metadata {
        let keys: Vec<String> = entries.iter().map(|e| e.name.clone()).collect();
        let metas: Vec<Option<SnapshotMetadata>> = futures::stream::iter(keys)
            .map(|k| async move { read_metadata(store, &k).await })
            .buffered(16)
            .collect()
            .await;
        for (e, m) in entries.iter_mut().zip(metas) {
            if let Some(m) = &m {
                e.created = m.created_at;
            }
            e.metadata = m;
        }
    }
    entries.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name)));
    Ok(entries)
}

/// Reads `.metadata/<file>`; a missing document is `None`, an unreadable one is logged and `None`,
/// so that one bad document does not hide the listing.
pub async fn read_metadata(store: &dyn SnapshotStore, file: &str) -> Option<SnapshotMetadata> {
    match crate::transfer::fetch_metadata(store, file).await {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(snapshot = %file, error = %e, "unreadable metadata, ignored");
            None
        }
    }
}
