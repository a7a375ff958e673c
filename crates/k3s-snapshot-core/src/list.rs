//! Listing snapshots of a store, joined with their metadata, for `ls`.

use chrono::{DateTime, TimeZone, Utc};
use futures::StreamExt;

use crate::metadata::MetadataDoc;
use crate::name;
use crate::store::SnapshotStore;
use crate::Result;

/// One row of `ls`.
#[derive(Debug, Clone)]
pub struct SnapshotEntry {
    pub name: String,
    pub location: String,
    pub size: u64,
    /// From the timestamp in the name (as k3s does), else the object's modification time.
    pub created: DateTime<Utc>,
    /// The `.metadata/<file>` document, when asked for and there.
    pub metadata: Option<MetadataDoc>,
    /// The object's user metadata (S3 `x-amz-meta-*`), when asked for; empty for local files.
    pub user_metadata: Vec<(String, String)>,
}

impl SnapshotEntry {
    /// A user metadata value by name, ignoring case (S3 servers differ in how they return names).
    pub fn user_metadata(&self, name: &str) -> Option<&str> {
        self.user_metadata.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// The order of `ls`: by created, then name, then location.
pub fn ls_order(a: &SnapshotEntry, b: &SnapshotEntry) -> std::cmp::Ordering {
    a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name)).then_with(|| a.location.cmp(&b.location))
}

/// Lists the snapshots of a store (files that parse as ours), with their metadata document and
/// user metadata when `with_metadata`. Sorted by [`ls_order`].
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
            user_metadata: Vec::new(),
        });
    }
    drop(listing);
    if with_metadata {
        entries = futures::stream::iter(entries)
            .map(|mut e| async move {
                e.user_metadata = match store.user_metadata(&e.name).await {
                    Ok(u) => u,
                    Err(err) => {
                        tracing::warn!(snapshot = %e.name, error = %err, "unreadable user metadata, ignored");
                        Vec::new()
                    }
                };
                e.metadata = read_metadata(store, &e.name).await;
                e
            })
            .buffered(16)
            .collect()
            .await;
    }
    entries.sort_by(ls_order);
    Ok(entries)
}

/// Reads `.metadata/<file>`; a missing document is `None`, an unreadable one is logged and `None`,
/// so that one bad document does not hide the listing.
pub async fn read_metadata(store: &dyn SnapshotStore, file: &str) -> Option<MetadataDoc> {
    match crate::transfer::fetch_metadata(store, file).await {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(snapshot = %file, error = %e, "unreadable metadata, ignored");
            None
        }
    }
}
