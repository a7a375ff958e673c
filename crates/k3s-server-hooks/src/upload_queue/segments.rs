//! The delta segment lane of the queue: strictly in revision order, a failing segment holding
//! back the later ones, each segment's metadata document after it.

use k3s_snapshot_core::metadata::SnapshotMetadata;
use k3s_snapshot_core::progress::NoProgress;
use k3s_snapshot_core::store::{LocalStore, PutOptions, SnapshotStore};
use k3s_snapshot_core::transfer::upload_file;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;

impl UploadQueue {
    pub(super) async fn segment_lane(&self, cancel: &CancellationToken) {
        let mut failures = 0u32;
        let mut seen = self.wake.subscribe();
        loop {
            if cancel.is_cancelled() {
                return;
            }
            seen.borrow_and_update();
            let picked = {
                let mut st = self.state();
                if !st.synced {
                    None
                } else {
                    self.drop_vanished(&mut st);
                    st.segments.iter().next().map(|(k, e)| (k.clone(), e.next_try, e.bytes))
                }
            };
            let Some(((from, to, file), next_try, bytes)) = picked else {
                if Self::idle(&mut seen, None, cancel).await {
                    return;
                }
                continue;
            };
            if next_try > Instant::now() {
                if Self::idle(&mut seen, Some(next_try), cancel).await {
                    return;
                }
                continue;
            }
            let remote = self.s.remote.as_ref();
            let path = match self.s.local.path_of(&file) {
                Ok(p) => p,
                Err(_) => {
                    self.state().segments.remove(&(from, to, file));
                    continue;
                }
            };
            let opts = PutOptions { size_hint: Some(bytes), ..PutOptions::default() };
            let result = tokio::select! {
                r = upload_file(remote, &file, &path, opts, &NoProgress) => r,
                _ = cancel.cancelled() => return,
            };
            // The segment's metadata document (the live hash at its end), when it has one.
            let result = match result {
                Ok(n) => upload_segment_document(&self.s.local, remote, &file).await.map(|()| n),
                e => e,
            };
            let key = (from, to, file.clone());
            match result {
                Ok(n) => {
                    failures = 0;
                    let mut st = self.state();
                    st.segment_failing = false;
                    st.segments.remove(&key);
                    self.publish_segment_lag(&st);
                    drop(st);
                    if let Some(m) = &self.s.deltas {
                        m.segment_shipped(to, n);
                    }
                    tracing::debug!(segment = %file, bytes = n, "delta segment uploaded");
                }
                Err(e) if vanished(&e) => {
                    // drop_vanished logs and counts it on the next turn.
                    continue;
                }
                Err(e) => {
                    failures += 1;
                    let delay = lane_backoff(failures);
                    let mut st = self.state();
                    st.segment_failing = true;
                    if let Some(entry) = st.segments.get_mut(&key) {
                        entry.attempts += 1;
                        entry.next_try = Instant::now() + delay;
                    }
                    let waiting = st.segments.len();
                    drop(st);
                    if let Some(m) = &self.s.deltas {
                        m.upload_failures.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::warn!(segment = %file, error = %e, waiting,
                        "delta segment upload failed; it is kept locally and sent again (from {delay:?} on) before any later one");
                }
            }
        }
    }
}

/// Uploads `.metadata/<segment>` after its segment, when the follower wrote one.
async fn upload_segment_document(
    local: &LocalStore,
    remote: &dyn SnapshotStore,
    file: &str,
) -> k3s_snapshot_core::Result<()> {
    let doc = local.metadata_dir().join(file);
    if !doc.is_file() {
        return Ok(());
    }
    upload_file(remote, &SnapshotMetadata::key_for(file), &doc, PutOptions::default(), &NoProgress).await.map(drop)
}
