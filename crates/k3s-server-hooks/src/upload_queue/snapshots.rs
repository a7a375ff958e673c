//! The snapshot lane of the queue: oldest first, a failing snapshot backed off so that it never
//! blocks the others; the upload itself (the save's own task when there is one), its metadata
//! document, and S3 retention after it.

use crate::metrics::REMOTE;
use bytes::Bytes;
use futures::StreamExt;
use k3s_snapshot_core::metadata::{MetadataDoc, SnapshotMetadata};
use k3s_snapshot_core::name;
use k3s_snapshot_core::progress::NoProgress;
use k3s_snapshot_core::retention::{prune, RetentionPolicy};
use k3s_snapshot_core::save::upload_options;
use k3s_snapshot_core::store::PutOptions;
use k3s_snapshot_core::transfer::upload_file;
use std::time::Instant;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::*;

impl UploadQueue {
    pub(super) async fn snapshot_lane(&self, cancel: &CancellationToken) {
        let mut failures = 0u32;
        let mut lane_next: Option<Instant> = None;
        let mut warned_sync = false;
        let mut seen = self.wake.subscribe();
        loop {
            if cancel.is_cancelled() {
                return;
            }
            seen.borrow_and_update();
            if lane_next.is_some_and(|t| t > Instant::now()) {
                if Self::idle(&mut seen, lane_next, cancel).await {
                    return;
                }
                continue;
            }
            lane_next = None;
            let synced = self.state().synced;
            if !synced {
                let r = tokio::select! {
                    r = self.sync() => r,
                    _ = cancel.cancelled() => return,
                };
                if let Err(e) = r {
                    failures += 1;
                    lane_next = Some(Instant::now() + lane_backoff(failures));
                    let oldest = {
                        let mut st = self.state();
                        st.snapshot_failing = Some(e.clone());
                        let oldest = st.snapshots.iter_mut().next().map(|(k, v)| {
                            v.attempts += 1;
                            for w in v.waiters.drain(..) {
                                let _ = w.send(Err(e.clone()));
                            }
                            k.1.clone()
                        });
                        oldest
                    };
                    match oldest {
                        Some(snapshot) => {
                            self.s.metrics.failure(REMOTE, e.clone());
                            tracing::warn!(%snapshot, error = %e, store = %self.s.remote.describe(), "{}; the local snapshot is kept and queued, uploaded when s3 answers", self.failed_what(&snapshot));
                        }
                        None if !warned_sync => {
                            tracing::warn!(error = %e, "upload queue: cannot compare the snapshot dir with s3 yet; trying again")
                        }
                        None => tracing::debug!(error = %e, "upload queue: s3 still cannot be listed"),
                    }
                    warned_sync = true;
                    continue;
                }
                warned_sync = false;
            }
            // The oldest snapshot that is due (a pipelined upload is always due: it runs).
            let picked = {
                let mut st = self.state();
                self.drop_vanished(&mut st);
                let now = Instant::now();
                let key = st
                    .snapshots
                    .iter()
                    .find(|(_, e)| e.inflight.is_some() || e.next_try <= now)
                    .map(|(k, _)| k.clone());
                match key {
                    Some(k) => {
                        st.snapshot_busy = true;
                        let e = st.snapshots.get_mut(&k).expect("found");
                        Ok((k, e.inflight.take()))
                    }
                    None => Err(st.snapshots.values().map(|e| e.next_try).min()),
                }
            };
            let ((ts, file), inflight) = match picked {
                Ok(p) => p,
                Err(next) => {
                    if Self::idle(&mut seen, next, cancel).await {
                        return;
                    }
                    continue;
                }
            };
            let started = Instant::now();
            let result = tokio::select! {
                r = self.upload_snapshot(&file, inflight, cancel) => r,
                _ = cancel.cancelled() => return,
            };
            let retention = {
                let mut st = self.state();
                st.snapshot_busy = false;
                match result {
                    Ok(n) => {
                        failures = 0;
                        st.snapshot_failing = None;
                        if let Some(mut e) = st.snapshots.remove(&(ts, file.clone())) {
                            for w in e.waiters.drain(..) {
                                let _ = w.send(Ok(n));
                            }
                        }
                        // S3 answers: everything waiting is due, oldest first.
                        let now = Instant::now();
                        for e in st.snapshots.values_mut() {
                            e.next_try = now;
                        }
                        drop(st);
                        self.s.metrics.success(REMOTE, started.elapsed().as_secs_f64(), n);
                        tracing::info!(snapshot = %file, bytes = n, store = %self.s.remote.describe(), "snapshot uploaded");
                        let scheduled = name::matches_prefix(&file, &self.s.scheduled_prefix).is_some();
                        let base = name::matches_prefix(&file, k3s_snapshot_core::delta::BASE_PREFIX).is_some();
                        (scheduled || base).then_some(scheduled)
                    }
                    Err(e) if vanished(&e) => {
                        // Unless `forget_vanished` already did.
                        if st.snapshots.remove(&(ts, file.clone())).is_some() {
                            st.dropped_snapshots += 1;
                            tracing::warn!(snapshot = %file, "snapshot removed locally (retention) before it could be uploaded; dropped from the upload queue");
                        }
                        None
                    }
                    Err(e) => {
                        failures += 1;
                        // While S3 fails the lane probes it with the comparison (a listing,
                        // which also finds what was left local meanwhile) rather than with
                        // uploads: an upload of the oldest snapshot can take longer than local
                        // retention keeps it. Once S3 lists again, uploads resume oldest first.
                        st.synced = false;
                        let msg = e.to_string();
                        st.snapshot_failing = Some(msg.clone());
                        let delay = lane_backoff(failures);
                        lane_next = Some(Instant::now() + delay);
                        if let Some(entry) = st.snapshots.get_mut(&(ts, file.clone())) {
                            entry.attempts += 1;
                            entry.next_try = Instant::now() + entry_backoff(entry.attempts);
                            for w in entry.waiters.drain(..) {
                                let _ = w.send(Err(msg.clone()));
                            }
                        }
                        let waiting = st.snapshots.len();
                        drop(st);
                        self.s.metrics.failure(REMOTE, msg.clone());
                        tracing::warn!(snapshot = %file, error = %msg, store = %self.s.remote.describe(), waiting,
                        "{}; the local snapshot is kept and queued, retried from {delay:?} on", self.failed_what(&file));
                        None
                    }
                }
            };
            if let Some(scheduled) = retention {
                self.remote_retention(scheduled).await;
            }
        }
    }

    /// How a failed upload is named in the log: scheduled ones as the scheduler always did.
    fn failed_what(&self, file: &str) -> &'static str {
        if name::matches_prefix(file, &self.s.scheduled_prefix).is_some() {
            "scheduled snapshot upload failed"
        } else {
            "snapshot upload failed"
        }
    }

    /// Uploads one snapshot and then its metadata document: the pipelined attempt's result when
    /// there is one (the file sent again on a retryable error), else the file.
    async fn upload_snapshot(
        &self,
        file: &str,
        inflight: Option<JoinHandle<k3s_snapshot_core::Result<u64>>>,
        cancel: &CancellationToken,
    ) -> k3s_snapshot_core::Result<u64> {
        let remote = self.s.remote.as_ref();
        let path = self.s.local.path_of(file)?;
        let (opts, doc) = self.put_options(file).await;
        let piped = match inflight {
            Some(task) => match task.await {
                Ok(r) => Some(r),
                Err(e) => Some(Err(k3s_snapshot_core::Error::Invalid(format!("the upload task failed: {e}")))),
            },
            None => None,
        };
        let n = match piped {
            Some(Ok(n)) => n,
            Some(Err(e)) if !e.is_retryable() || cancel.is_cancelled() => return Err(e),
            Some(Err(e)) => {
                tracing::warn!(snapshot = %file, store = %remote.describe(), error = %e, "upload while saving failed; uploading the saved file");
                match upload_file(remote, file, &path, opts.clone(), &NoProgress).await {
                    // Retention removed the file while S3 failed: S3's failure is the news.
                    Err(gone) if vanished(&gone) => return Err(e),
                    r => r?,
                }
            }
            None => {
                let existed = path.exists();
                match upload_file(remote, file, &path, opts.clone(), &NoProgress).await {
                    // Sent, failed, then removed by retention before it was sent again.
                    Err(gone) if existed && vanished(&gone) => {
                        return Err(k3s_snapshot_core::Error::Invalid(format!(
                            "the upload to {} failed and local retention removed {file} before it was sent again",
                            remote.describe()
                        )))
                    }
                    r => r?,
                }
            }
        };
        if let Some(doc) = doc {
            let opts = PutOptions {
                content_type: "application/json".into(),
                user_metadata: opts.user_metadata,
                size_hint: Some(doc.len() as u64),
                ranges: None,
            };
            let key = SnapshotMetadata::key_for(file);
            remote.put(&key, futures::stream::once(async { Ok(doc) }).boxed(), opts).await?;
        }
        Ok(n)
    }

    /// The options a snapshot is uploaded with, from its local metadata document when it is ours,
    /// and that document's bytes.
    async fn put_options(&self, file: &str) -> (PutOptions, Option<Bytes>) {
        let doc = match self.s.local.path_of(&SnapshotMetadata::key_for(file)) {
            Ok(p) => tokio::fs::read(&p).await.ok().map(Bytes::from),
            Err(_) => None,
        };
        if let Some(MetadataDoc::Ours(m)) = doc.as_deref().and_then(|d| MetadataDoc::parse(d).ok()) {
            return (upload_options(&m), doc);
        }
        let mut user_metadata = vec![("k3s-node-name".to_string(), self.s.node.clone())];
        if let Some(t) = &self.s.token_hash {
            user_metadata.push(("k3s-token-hash".to_string(), t.clone()));
        }
        let zip = file.ends_with(name::ZIP_SUFFIX);
        let content_type = if zip { "application/zip" } else { "application/octet-stream" };
        (PutOptions { content_type: content_type.into(), user_metadata, size_hint: None, ranges: None }, doc)
    }

    /// S3 retention of the scheduled prefix (after an upload of one of its snapshots), then
    /// chain retention (after an upload, so that an outage never prunes S3 down to snapshots that
    /// are not there yet).
    async fn remote_retention(&self, scheduled: bool) {
        let remote = self.s.remote.as_ref();
        if scheduled {
            let policy = RetentionPolicy { prefix: &self.s.scheduled_prefix, keep: self.s.remote_retention };
            if let Err(e) = prune(remote, &policy).await {
                tracing::warn!(error = %e, store = %remote.describe(), "s3 retention failed; the next upload tries again");
                return;
            }
        }
        let keep = std::collections::HashSet::new();
        if let Err(e) = k3s_snapshot_core::delta::prune_chains(remote, self.s.chain_retention, &keep).await {
            tracing::warn!(error = %e, store = %remote.describe(), "s3 retention of delta chains failed; the next upload tries again");
        }
    }
}
