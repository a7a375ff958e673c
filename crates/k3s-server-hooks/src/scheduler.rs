//! Scheduled snapshots (SPEC §7): fire on the schedule plus up to `jitter` of random delay, one at
//! a time (a fire while the previous snapshot still runs is skipped and logged), save locally,
//! hand the snapshot to the server's upload queue ([`crate::upload_queue`], which uploads it and
//! then applies S3 retention), then apply local retention. The run, and the snapshot lock, end
//! there: S3 never slows down or skips a local snapshot. Failures are logged with their cause and
//! counted in [`SnapshotMetrics`]; the next fire tries again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use k3s_snapshot_core::etcd::EtcdClientConfig;
use k3s_snapshot_core::progress::NoProgress;
use k3s_snapshot_core::retention::{prune, RetentionPolicy};
use k3s_snapshot_core::save::{save, SaveOptions};
use k3s_snapshot_core::store::LocalStore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::SnapshotMetrics;
use crate::schedule::Schedule;
use crate::upload_queue::UploadQueue;

pub use crate::metrics::{LOCAL, REMOTE};

/// Everything a scheduled snapshot needs.
pub struct SnapshotJob {
    pub schedule: Schedule,
    pub local: LocalStore,
    /// With `--etcd-s3`: uploads, then S3 retention (`--etcd-s3-retention`).
    pub queue: Option<Arc<UploadQueue>>,
    pub save: SaveOptions,
    /// `--etcd-snapshot-retention`
    pub retention: i64,
    /// `--etcd-snapshot-delta-retention` (`None`: chains kept whatever their age).
    pub chain_retention: Option<Duration>,
    /// Upper bound of the random delay added to each fire.
    pub jitter: Duration,
    pub etcd: EtcdClientConfig,
    pub metrics: Arc<SnapshotMetrics>,
    /// Held while a snapshot runs, shared with snapshots requested through the supervisor API.
    pub lock: Arc<tokio::sync::Mutex<()>>,
}

/// Runs until `cancel`. Snapshots run on `tracker`, so that the caller can wait for one in flight.
pub async fn run(job: Arc<SnapshotJob>, tracker: TaskTracker, cancel: CancellationToken) {
    let mut last = Utc::now();
    let mut first = true;
    loop {
        let Some(next) = job.schedule.next_after(last) else {
            tracing::warn!("the snapshot schedule never fires again; no more scheduled snapshots");
            return;
        };
        let jitter = if job.jitter.is_zero() { Duration::ZERO } else { job.jitter.mul_f64(rand::random::<f64>()) };
        let wait = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO) + jitter;
        if std::mem::take(&mut first) {
            tracing::info!(next = %next.with_timezone(&chrono::Local).to_rfc3339(), "first scheduled snapshot");
        } else {
            tracing::debug!(next = %next, jitter_ms = jitter.as_millis() as u64, "next scheduled snapshot");
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => return,
        }
        last = next.max(Utc::now() - chrono::Duration::from_std(jitter).unwrap_or_default());
        crate::crash::panic_point("K3S_SNAPSHOT_TEST_SCHEDULER_PANIC", "fire");
        let guard = match job.lock.clone().try_lock_owned() {
            Ok(g) => g,
            // A restore drill holds the lock: it gives way (a backup never waits for a drill).
            Err(_) if crate::drills::preempt() => {
                match tokio::time::timeout(Duration::from_secs(30), job.lock.clone().lock_owned()).await {
                    Ok(g) => g,
                    Err(_) => {
                        tracing::warn!("skipping a scheduled snapshot: the restore drill did not stop within 30s");
                        continue;
                    }
                }
            }
            Err(_) => {
                tracing::warn!("skipping a scheduled snapshot: the previous one (or a requested one) is still running");
                continue;
            }
        };
        let (job, cancel) = (job.clone(), cancel.clone());
        tracker.spawn(async move {
            // A panic in one snapshot is that snapshot's failure, logged and counted; the
            // schedule goes on.
            use futures::FutureExt;
            if let Err(panic) = std::panic::AssertUnwindSafe(take(&job, &cancel)).catch_unwind().await {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                tracing::error!(error = %why, "scheduled snapshot failed: internal error");
                job.metrics.failure(LOCAL, format!("internal error: {why}"));
            }
            drop(guard);
        });
    }
}

/// One scheduled snapshot with its local retention. Never fails: outcomes go to logs and
/// metrics (the upload's, by the queue).
#[tracing::instrument(skip_all, fields(prefix = %job.save.prefix))]
pub async fn take(job: &SnapshotJob, cancel: &CancellationToken) {
    let started = Instant::now();
    let fail_all = |e: String| {
        job.metrics.failure(LOCAL, e.clone());
        if job.queue.is_some() {
            job.metrics.failure(REMOTE, e);
        }
    };
    let mut conn = match job.etcd.connect().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "scheduled snapshot failed");
            fail_all(e.to_string());
            return;
        }
    };
    let outcome = match &job.queue {
        Some(q) => q.save(&mut conn, &job.save, cancel).await.map(|q| q.saved),
        None => save(&mut conn, &job.local, &job.save, None, &NoProgress, cancel).await,
    };
    match outcome {
        Err(k3s_snapshot_core::Error::Cancelled) => {
            tracing::info!("scheduled snapshot cancelled by shutdown; nothing partial was kept");
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "scheduled snapshot failed");
            fail_all(e.to_string());
        }
        Ok(saved) => {
            let secs = started.elapsed().as_secs_f64();
            job.metrics.success(LOCAL, secs, saved.metadata.size);
            let queued = job.queue.is_some();
            tracing::info!(snapshot = %saved.metadata.name, size = saved.metadata.size, queued_for_upload = queued, "scheduled snapshot saved");
        }
    }
    if cancel.is_cancelled() {
        return;
    }
    let policy = RetentionPolicy { prefix: &job.save.prefix, keep: job.retention };
    if let Err(e) = prune(&job.local, &policy).await {
        tracing::error!(error = %e, "local retention failed");
    }
    // Chain retention, leaving alone what waits in the upload queue.
    let keep = job.queue.as_ref().map(|q| q.waiting_files()).unwrap_or_default();
    if let Err(e) = k3s_snapshot_core::delta::prune_chains(&job.local, job.chain_retention, &keep).await {
        tracing::warn!(error = %e, "local retention of delta chains failed");
    }
    if let Some(q) = &job.queue {
        q.forget_vanished();
    }
}
