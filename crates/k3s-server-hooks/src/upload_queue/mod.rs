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
//!
//! Here: the queue, its entries and `/metrics`; the parts: `snapshots` and `segments` (the two
//! lanes) and `sync` (the comparison with S3).

mod segments;
mod snapshots;
mod sync;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k3s_snapshot_core::delta::SegmentName;
use k3s_snapshot_core::etcd::EtcdConnection;
use k3s_snapshot_core::name;
use k3s_snapshot_core::progress::NoProgress;
use k3s_snapshot_core::save::{save, save_with_upload_task, SaveOptions, SavedSnapshot};
use k3s_snapshot_core::store::{LocalStore, SnapshotStore};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::{DeltaMetrics, SnapshotMetrics};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoffs_grow_and_stay_bounded() {
        assert_eq!(lane_backoff(1), Duration::from_secs(1));
        assert_eq!(lane_backoff(3), Duration::from_secs(4));
        assert_eq!(lane_backoff(40), LANE_BACKOFF_MAX);
        assert!(entry_backoff(2) > lane_backoff(2));
    }
}
