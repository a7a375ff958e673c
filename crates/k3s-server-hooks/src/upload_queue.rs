//! The server's S3 upload queue (issues 25 and 26): one task, owned by the server, that uploads
//! what scheduled snapshots, requested snapshots and delta segments leave in the snapshot dir.
//!
//! A snapshot is saved locally at local speed and handed over; whoever saved it (the scheduler,
//! the API, the delta follower's chain start) releases the snapshot lock at once. Local retention
//! never waits for S3, so an S3 outage never costs a local snapshot. When S3 answered the last
//! upload and nothing waits, the save still streams to S3 while it writes (the pipelined fast
//! path of `save_and_upload`): that upload runs as a task the queue takes over, so a hanging
//! endpoint holds the queue, never the lock.
//!
//! Nothing is kept in a state file: at start (and again when S3 comes back after failures) the
//! queue compares the snapshot dir with S3 (names and sizes through the store's `list`) and takes
//! every snapshot and delta segment that is kept locally and missing in S3, except those that S3
//! retention would delete again at once (the scheduled prefix beyond `--etcd-s3-retention`, and
//! chain bases and segments that chain retention, `--etcd-snapshot-delta-retention`, removes).
//!
//! Two lanes run side by side in the task, so that a segment never waits behind a multi-GiB
//! snapshot:
//! - Snapshots: oldest first. A failure backs the entry off (longer than the lane backs off),
//!   so the next attempt goes to another waiting snapshot: one snapshot that keeps failing never
//!   blocks the others. After a success every waiting entry is due again, oldest first. S3
//!   retention runs after each upload of a scheduled snapshot, and S3 chain retention after it
//!   and after each upload of a chain base.
//! - Delta segments: strictly in revision order, and not before the comparison with S3 has run,
//!   so the chain in S3 is always a prefix of the local chain and never skips a segment that
//!   exists locally. A failing segment holds back the later ones (backing off) until it is
//!   uploaded or removed locally. Local chain retention never removes what waits here
//!   ([`UploadQueue::waiting_files`]); a segment removed locally all the same (by hand) before it
//!   could be uploaded is dropped (logged, counted): the chain in S3 then has a visible gap
//!   there, where a restore's chain (`delta::chain_after`) stops, as at any gap.
//!
//! A snapshot or segment removed locally before its turn (retention) is dropped from the queue.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use k3s_snapshot_core::delta::SegmentName;
use k3s_snapshot_core::etcd::EtcdConnection;
use k3s_snapshot_core::metadata::{MetadataDoc, SnapshotMetadata};
use k3s_snapshot_core::name;
use k3s_snapshot_core::progress::NoProgress;
use k3s_snapshot_core::retention::{expired, prune, RetentionPolicy};
use k3s_snapshot_core::save::{save, save_with_upload_task, upload_options, SaveOptions, SavedSnapshot};
use k3s_snapshot_core::store::{LocalStore, PutOptions, SnapshotStore};
use k3s_snapshot_core::transfer::upload_file;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::deltas::DeltaMetrics;
use crate::metrics::SnapshotMetrics;
use crate::scheduler::REMOTE;

/// A lane waits this long after its first failure, doubling up to [`LANE_BACKOFF_MAX`].
const LANE_BACKOFF_MIN: Duration = Duration::from_secs(1);
const LANE_BACKOFF_MAX: Duration = Duration::from_secs(20);

/// What the queue needs to know of the server.
pub struct QueueSettings {
    pub local: LocalStore,
    pub remote: Arc<dyn SnapshotStore>,
    /// The user metadata of snapshots whose local metadata document does not say (k3s's own).
    pub node: String,
    pub token_hash: Option<String>,
    /// `--etcd-snapshot-name`: S3 retention of this prefix runs after each of its uploads.
    pub scheduled_prefix: String,
    /// `--etcd-s3-retention`.
    pub remote_retention: i64,
    /// `--etcd-snapshot-delta-retention` (`None`: chain bases are kept whatever their age): S3
    /// chain retention ([`k3s_snapshot_core::delta::chain_expired`]) runs after each upload of a
    /// scheduled snapshot or a chain base.
    pub chain_retention: Option<Duration>,
    pub metrics: Arc<SnapshotMetrics>,
    /// With `--etcd-snapshot-delta-interval`: segments shipped, bytes, failures, lag.
    pub deltas: Option<Arc<DeltaMetrics>>,
}

/// The outcome of one upload as a requester sees it: bytes, or why it failed.
pub type Outcome = std::result::Result<u64, String>;

struct Entry {
    /// Unix milliseconds since which it waits (its save, or its segment's first event).
    since_ms: i64,
    bytes: u64,
    attempts: u32,
    next_try: Instant,
    /// The pipelined upload started by the save.
    inflight: Option<JoinHandle<k3s_snapshot_core::Result<u64>>>,
    /// A requested save waiting for its first outcome.
    waiters: Vec<oneshot::Sender<Outcome>>,
}

impl Entry {
    fn new(since_ms: i64, bytes: u64) -> Entry {
        Entry { since_ms, bytes, attempts: 0, next_try: Instant::now(), inflight: None, waiters: Vec::new() }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(t) = self.inflight.take() {
            t.abort();
        }
    }
}

#[derive(Default)]
struct State {
    /// S3 was compared with the snapshot dir since the start (or the last recovery).
    synced: bool,
    /// By (name timestamp, name).
    snapshots: BTreeMap<(i64, String), Entry>,
    /// By (from, to, name).
    segments: BTreeMap<(i64, i64, String), Entry>,
    /// A snapshot upload is under way (the lane's, or a pipelined one being saved).
    snapshot_busy: bool,
    /// Why the last snapshot upload (or the comparison with S3) failed; `None` after a success.
    snapshot_failing: Option<String>,
    segment_failing: bool,
    dropped_snapshots: u64,
    dropped_segments: u64,
}

/// See the module documentation.
pub struct UploadQueue {
    s: QueueSettings,
    state: Mutex<State>,
    /// Bumped on every change a lane may be waiting for; a lane marks what it has seen before it
    /// looks at the state, so no wake-up is lost.
    wake: watch::Sender<u64>,
}

/// A snapshot saved and handed to the queue.
pub struct Queued {
    pub saved: SavedSnapshot,
    /// When the save took the fast path (S3 healthy, nothing waiting): the outcome of its first
    /// upload attempt (the pipelined upload, then the file sent again on a retryable error).
    pub first_attempt: Option<oneshot::Receiver<Outcome>>,
    /// Otherwise: snapshots waiting ahead of it, and why S3 uploads fail, if they do.
    pub ahead: usize,
    pub failing: Option<String>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn lane_backoff(failures: u32) -> Duration {
    LANE_BACKOFF_MIN.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(LANE_BACKOFF_MAX)
}

/// An entry that failed waits twice as long as its lane, so that the lane's next attempt goes
/// to another entry when there is one.
fn entry_backoff(attempts: u32) -> Duration {
    lane_backoff(attempts).saturating_mul(2)
}

/// Whether an upload failed because the local file is gone (removed by retention meanwhile).
fn vanished(e: &k3s_snapshot_core::Error) -> bool {
    matches!(e, k3s_snapshot_core::Error::Io { cause, .. } if cause.kind() == std::io::ErrorKind::NotFound)
}

impl UploadQueue {
    pub fn new(s: QueueSettings) -> Arc<UploadQueue> {
        Arc::new(UploadQueue { s, state: Mutex::new(State::default()), wake: watch::channel(0).0 })
    }

    fn poke(&self) {
        self.wake.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("upload queue lock")
    }

    pub fn remote(&self) -> &dyn SnapshotStore {
        self.s.remote.as_ref()
    }

    /// Saves a snapshot locally (the caller holds the snapshot lock) and hands it to the queue.
    /// Returns once the local snapshot is whole, whatever S3 does.
    pub async fn save(
        &self,
        conn: &mut EtcdConnection,
        opts: &SaveOptions,
        cancel: &CancellationToken,
    ) -> k3s_snapshot_core::Result<Queued> {
        let fast = {
            let mut st = self.state();
            let open = st.synced && st.snapshots.is_empty() && !st.snapshot_busy && st.snapshot_failing.is_none();
            if open {
                st.snapshot_busy = true;
            }
            open
        };
        let saved = if fast {
            save_with_upload_task(conn, &self.s.local, self.s.remote.clone(), opts, &NoProgress, cancel).await
        } else {
            save(conn, &self.s.local, opts, None, &NoProgress, cancel).await.map(|s| (s, None))
        };
        let (saved, inflight) = match saved {
            Ok(s) => s,
            Err(e) => {
                if fast {
                    self.state().snapshot_busy = false;
                }
                return Err(e);
            }
        };
        let name = saved.metadata.name.clone();
        let ts = name::parse(&name).map_or(0, |p| p.timestamp);
        let mut entry = Entry::new(now_ms(), saved.metadata.size);
        entry.inflight = inflight;
        let mut first_attempt = None;
        if fast {
            let (tx, rx) = oneshot::channel();
            entry.waiters.push(tx);
            first_attempt = Some(rx);
        }
        let (ahead, failing) = {
            let mut st = self.state();
            let ahead = st.snapshots.len();
            st.snapshots.insert((ts, name), entry);
            if fast {
                // The lane takes it over; it is busy until the lane is done with it.
                st.snapshot_busy = false;
            }
            (ahead, st.snapshot_failing.clone())
        };
        self.poke();
        Ok(Queued { saved, first_attempt, ahead, failing })
    }

    /// Forgets what local retention (or a delete) removed, at once rather than on the lane's next
    /// turn, so that `/metrics` counts only what still waits.
    pub fn forget_vanished(&self) {
        let mut st = self.state();
        self.drop_vanished(&mut st);
    }

    /// The files (snapshots and segments) waiting for their upload: local retention of chains
    /// leaves them alone, so that S3 gets them.
    pub fn waiting_files(&self) -> std::collections::HashSet<String> {
        let st = self.state();
        st.snapshots.keys().map(|(_, f)| f.clone()).chain(st.segments.keys().map(|(_, _, f)| f.clone())).collect()
    }

    /// A closed delta segment, `since_ms` the arrival of its first event.
    pub fn push_segment(&self, name: SegmentName, bytes: u64, since_ms: i64) {
        {
            let mut st = self.state();
            st.segments.insert((name.from, name.to, name.file), Entry::new(since_ms, bytes));
            self.publish_segment_lag(&st);
        }
        self.poke();
    }

    fn publish_segment_lag(&self, st: &State) {
        if let Some(d) = &self.s.deltas {
            let oldest = st.segments.values().map(|e| e.since_ms).min().unwrap_or(0);
            d.queued_since_ms.store(oldest, Ordering::Relaxed);
        }
    }

    /// Runs until `cancel`: the comparison with S3 and both lanes.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        tokio::join!(self.snapshot_lane(&cancel), self.segment_lane(&cancel));
    }

    /// Waits for a change since `seen` was last marked, `until`, or `cancel`; true when cancelled.
    async fn idle(seen: &mut watch::Receiver<u64>, until: Option<Instant>, cancel: &CancellationToken) -> bool {
        let notified = seen.changed();
        let sleep = async {
            match until {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = notified => false,
            _ = sleep => false,
            _ = cancel.cancelled() => true,
        }
    }

    /// Drops entries whose local file is gone (retention removed them before their turn).
    fn drop_vanished(&self, st: &mut State) {
        let local = &self.s.local;
        let gone = |file: &str| local.path_of(file).map(|p| !p.exists()).unwrap_or(true);
        let snaps: Vec<(i64, String)> = st.snapshots.keys().filter(|(_, n)| gone(n)).cloned().collect();
        for k in snaps {
            let mut e = st.snapshots.remove(&k).expect("listed");
            st.dropped_snapshots += 1;
            tracing::warn!(snapshot = %k.1, "snapshot removed locally (retention) before it could be uploaded; dropped from the upload queue");
            for w in e.waiters.drain(..) {
                let _ = w.send(Err("the local snapshot was removed before it could be uploaded".into()));
            }
        }
        let segs: Vec<(i64, i64, String)> = st.segments.keys().filter(|(_, _, n)| gone(n)).cloned().collect();
        for k in segs {
            st.segments.remove(&k);
            st.dropped_segments += 1;
            tracing::warn!(
                segment = %k.2,
                "delta segment removed locally (retention) before it could be uploaded; the chain in s3 has a gap at revisions {}..{}: a restore from an s3 snapshot older than the gap replays only up to revision {}",
                k.0, k.1, k.0 - 1
            );
        }
        self.publish_segment_lag(st);
    }

    async fn snapshot_lane(&self, cancel: &CancellationToken) {
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

    async fn segment_lane(&self, cancel: &CancellationToken) {
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

    /// Compares the snapshot dir with S3 and queues what is local, missing in S3 (by name and
    /// size) and would survive S3 retention. The error is one line.
    async fn sync(&self) -> std::result::Result<(), String> {
        let local = list_all(&self.s.local).await.map_err(|e| format!("listing the snapshot dir: {e}"))?;
        let remote = list_all(self.s.remote.as_ref())
            .await
            .map_err(|e| format!("listing {} to find what to upload: {e}", self.s.remote.describe()))?;
        let chain_retention = self.s.chain_retention.map(|r| r.as_secs().min(i64::MAX as u64) as i64);
        let plan = plan_uploads(
            &local,
            &remote,
            &self.s.scheduled_prefix,
            self.s.remote_retention,
            chain_retention,
            chrono::Utc::now().timestamp(),
        );
        let (mut snaps, mut segs) = (0, 0);
        {
            let mut st = self.state();
            for (file, ts, size) in plan.snapshots {
                if let std::collections::btree_map::Entry::Vacant(v) = st.snapshots.entry((ts, file)) {
                    v.insert(Entry::new(ts.saturating_mul(1000), size));
                    snaps += 1;
                }
            }
            for (seg, size) in plan.segments {
                let key = (seg.from, seg.to, seg.file.clone());
                if let std::collections::btree_map::Entry::Vacant(v) = st.segments.entry(key) {
                    v.insert(Entry::new(seg.closed.saturating_mul(1000), size));
                    segs += 1;
                }
            }
            st.synced = true;
            self.publish_segment_lag(&st);
        }
        if snaps + segs > 0 {
            tracing::info!(
                snapshots = snaps,
                segments = segs,
                store = %self.s.remote.describe(),
                "upload queue: found snapshots and delta segments kept locally but missing in s3; uploading them, oldest first"
            );
        }
        self.poke();
        Ok(())
    }

    /// Prometheus text of the queue.
    pub fn render(queue: Option<&UploadQueue>) -> String {
        let now = now_ms();
        // (kind, waiting, oldest age in seconds, dropped)
        type Row = (&'static str, usize, f64, u64);
        let rows: Vec<Row> = match queue {
            Some(q) => {
                let st = q.state();
                let age = |since: Option<i64>| since.map_or(0.0, |s| (now - s).max(0) as f64 / 1000.0);
                vec![
                    (
                        "snapshot",
                        st.snapshots.len(),
                        age(st.snapshots.values().map(|e| e.since_ms).min()),
                        st.dropped_snapshots,
                    ),
                    (
                        "segment",
                        st.segments.len(),
                        age(st.segments.values().map(|e| e.since_ms).min()),
                        st.dropped_segments,
                    ),
                ]
            }
            None => vec![("snapshot", 0, 0.0, 0), ("segment", 0, 0.0, 0)],
        };
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, value: &dyn Fn(&Row) -> String| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for r in &rows {
                let _ = writeln!(out, "{name}{{kind=\"{}\"}} {}", r.0, value(r));
            }
        };
        family(
            "k3s_snapshot_upload_queue_waiting",
            "gauge",
            "Snapshots and delta segments kept locally and waiting for their upload to S3.",
            &|r| r.1.to_string(),
        );
        family(
            "k3s_snapshot_upload_queue_oldest_age_seconds",
            "gauge",
            "How long the oldest entry waiting for its upload has waited (0 when none waits).",
            &|r| format!("{:.3}", r.2),
        );
        family(
            "k3s_snapshot_upload_queue_dropped_total",
            "counter",
            "Entries removed locally by retention before they could be uploaded.",
            &|r| r.3.to_string(),
        );
        out
    }
}

/// Every object of a store: (key, size).
async fn list_all(store: &dyn SnapshotStore) -> k3s_snapshot_core::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    let mut listing = store.list("");
    while let Some(obj) = listing.next().await {
        let obj = obj?;
        out.push((obj.key, obj.size));
    }
    Ok(out)
}

/// What a comparison found to upload: snapshots (file, timestamp, size) and segments, each in
/// upload order.
#[derive(Debug, Default, PartialEq)]
struct Plan {
    snapshots: Vec<(String, i64, u64)>,
    segments: Vec<(SegmentName, u64)>,
}

/// Local objects missing in S3 (or there with another size), less what S3 retention would
/// delete right after: snapshots of `prefix` beyond the `keep` newest of S3's and the planned
/// ones together, and the chain bases and segments that chain retention (`chain_retention`
/// seconds at `now`, see `delta::chain_expired`) removes from what S3 then holds.
fn plan_uploads(
    local: &[(String, u64)],
    remote: &[(String, u64)],
    prefix: &str,
    keep: i64,
    chain_retention: Option<i64>,
    now: i64,
) -> Plan {
    let in_remote: std::collections::HashMap<&str, u64> = remote.iter().map(|(k, s)| (k.as_str(), *s)).collect();
    let missing = |k: &str, size: u64| in_remote.get(k) != Some(&size);
    let mut snapshots: Vec<(String, i64, u64)> = local
        .iter()
        .filter(|(k, s)| missing(k, *s) && name::validate_file_name(k).is_ok())
        .filter_map(|(k, s)| name::parse(k).map(|p| (k.clone(), p.timestamp, *s)))
        .collect();
    // Retention of the scheduled prefix over S3's snapshots and the planned ones together.
    let mut candidates: Vec<(String, i64)> =
        remote.iter().filter_map(|(k, _)| name::matches_prefix(k, prefix).map(|ts| (k.clone(), ts))).collect();
    candidates
        .extend(snapshots.iter().filter_map(|(k, ts, _)| name::matches_prefix(k, prefix).map(|_| (k.clone(), *ts))));
    candidates.sort();
    candidates.dedup();
    let doomed: std::collections::HashSet<String> = expired(candidates, keep).into_iter().collect();
    snapshots.retain(|(k, _, _)| !doomed.contains(k));
    snapshots.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    let mut segments: Vec<(SegmentName, u64)> = local
        .iter()
        .filter(|(k, s)| missing(k, *s))
        .filter_map(|(k, s)| SegmentName::parse(k).map(|n| (n, *s)))
        .collect();
    // Chain retention over what S3 then holds: its snapshots and segments and the planned ones.
    let mut held: Vec<(String, i64)> = remote
        .iter()
        .filter(|(k, _)| !doomed.contains(k) && name::validate_file_name(k).is_ok())
        .filter_map(|(k, _)| name::parse(k).map(|p| (k.clone(), p.timestamp)))
        .chain(snapshots.iter().map(|(k, ts, _)| (k.clone(), *ts)))
        .collect();
    held.sort();
    held.dedup();
    let held_segments: Vec<SegmentName> = remote
        .iter()
        .filter_map(|(k, _)| SegmentName::parse(k))
        .chain(segments.iter().map(|(n, _)| n.clone()))
        .collect();
    let pruned = k3s_snapshot_core::delta::chain_expired(
        &held,
        &held_segments,
        now,
        chain_retention,
        &std::collections::HashSet::new(),
    );
    snapshots.retain(|(k, _, _)| !pruned.bases.contains(k));
    segments.retain(|(n, _)| !pruned.segments.contains(&n.file));
    segments.sort_by(|a, b| (a.0.from, a.0.to, &a.0.file).cmp(&(b.0.from, b.0.to, &b.0.file)));
    Plan { snapshots, segments }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(from: i64, to: i64, closed: i64) -> String {
        SegmentName::new(from, to, "n1", closed, false).file
    }

    #[test]
    fn plans_what_is_missing_oldest_first_and_skips_what_retention_would_delete() {
        let local = vec![
            ("etcd-snapshot-n1-300".to_string(), 10),
            ("etcd-snapshot-n1-100".to_string(), 10),
            ("etcd-snapshot-n1-200".to_string(), 10),
            ("on-demand-n1-150".to_string(), 10),
            (seg(1, 5, 120), 7),
            (seg(6, 9, 250), 7),
            (seg(10, 12, 310), 7),
            ("etcd-snapshot-n1-50.zip".to_string(), 10),
            ("not-ours".to_string(), 1),
        ];
        // S3 holds the newest already, and an older one of another node, and a segment.
        let remote = vec![
            ("etcd-snapshot-n1-300".to_string(), 10),
            ("etcd-snapshot-n2-190".to_string(), 10),
            (seg(10, 12, 310), 7),
        ];
        let plan = plan_uploads(&local, &remote, "etcd-snapshot", 3, None, 1000);
        let names: Vec<&str> = plan.snapshots.iter().map(|(k, _, _)| k.as_str()).collect();
        // Keep 3 of {300, 200, 190 (n2), 100, 50}: 300, 200, 190; 100 and 50 would be pruned.
        assert_eq!(names, ["on-demand-n1-150", "etcd-snapshot-n1-200"]);
        // S3 then holds 150, 190, 200, 300: segments closed before 150 are pruned there.
        let segs: Vec<(i64, i64)> = plan.segments.iter().map(|(s, _)| (s.from, s.to)).collect();
        assert_eq!(segs, [(6, 9)]);
    }

    #[test]
    fn a_different_size_in_s3_is_uploaded_again_and_keep_0_keeps_all() {
        let local = vec![
            ("etcd-snapshot-n1-100".to_string(), 10),
            ("etcd-snapshot-n1-200".to_string(), 10),
            (seg(1, 2, 50), 3),
        ];
        let remote = vec![("etcd-snapshot-n1-200".to_string(), 4)];
        let plan = plan_uploads(&local, &remote, "etcd-snapshot", 0, None, 1000);
        let names: Vec<&str> = plan.snapshots.iter().map(|(k, _, _)| k.as_str()).collect();
        assert_eq!(names, ["etcd-snapshot-n1-100", "etcd-snapshot-n1-200"]);
        assert!(plan.segments.is_empty(), "closed before the oldest snapshot S3 will hold");
        let plan = plan_uploads(&[(seg(1, 2, 50), 3)], &[], "etcd-snapshot", 0, None, 1000);
        assert_eq!(plan.segments.len(), 1, "no snapshot anywhere: S3 prunes no segment");
    }

    #[test]
    fn chain_bases_left_local_are_planned_unless_chain_retention_removes_them() {
        let local = vec![
            ("chain-base-n1-100".to_string(), 10),
            ("chain-base-n1-200".to_string(), 10),
            ("chain-base-n1-300".to_string(), 10),
            (seg(1, 5, 150), 7),
            (seg(6, 9, 250), 7),
            (seg(10, 12, 310), 7),
        ];
        // Keep 1 of the scheduled prefix: chain bases are not of it.
        let plan = plan_uploads(&local, &[], "etcd-snapshot", 1, None, 1000);
        assert_eq!(plan.snapshots.len(), 3);
        assert_eq!(plan.segments.len(), 3);
        // Chain retention of 50 s at 301: base 200 is taken before 251, base 100 and the segment
        // closed before 200 would go at once.
        let plan = plan_uploads(&local, &[], "etcd-snapshot", 1, Some(50), 301);
        let names: Vec<&str> = plan.snapshots.iter().map(|(k, _, _)| k.as_str()).collect();
        assert_eq!(names, ["chain-base-n1-200", "chain-base-n1-300"]);
        let segs: Vec<(i64, i64)> = plan.segments.iter().map(|(s, _)| (s.from, s.to)).collect();
        assert_eq!(segs, [(6, 9), (10, 12)]);
    }

    #[test]
    fn backoffs_grow_and_stay_bounded() {
        assert_eq!(lane_backoff(1), Duration::from_secs(1));
        assert_eq!(lane_backoff(3), Duration::from_secs(4));
        assert_eq!(lane_backoff(40), LANE_BACKOFF_MAX);
        assert!(entry_backoff(2) > lane_backoff(2));
    }
}
