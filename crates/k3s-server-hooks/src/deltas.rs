//! Continuous backup (`--etcd-snapshot-delta-interval`): the server follows etcd's watch over the
//! whole keyspace from the revision of its newest full snapshot and, every interval, closes the
//! events since the last segment into a delta segment ([`k3s_snapshot_core::delta`]) in the
//! snapshot dir, handed to the server's upload queue ([`crate::upload_queue`]) with `--etcd-s3`.
//!
//! Gaps are never papered over: when etcd has compacted past the watch (or the server was down
//! long enough for that), the watch is refused as compacted; the server then takes a full
//! snapshot at once and a new chain starts after it. A restore replays only contiguous segments.
//! The queue uploads segments in order, a failed one again before any later one, and finds
//! segments closed but not uploaded before a restart (or a kill) by comparing the snapshot dir
//! with S3, so the chain in S3 has no hole that the local one lacks (see the queue for a segment
//! that local retention removed before its upload). Memory stays bounded: events go to the open segment file as they
//! arrive. With `--etcd-snapshot-encryption-recipients-file` every segment is written through age
//! (`<name>.seg.age`, see [`k3s_snapshot_core::delta`]): only ciphertext reaches the disk and S3.
//!
//! Chains are bounded: a restore replays every revision from its base, so once the current chain
//! holds more than `--etcd-snapshot-delta-max-revisions` revisions, or its base is older than
//! `--etcd-snapshot-delta-max-age` and it holds a change, the follower takes a new full snapshot
//! (`chain-base-<node>-<unix seconds>`, [`delta::BASE_PREFIX`]) while it goes on shipping, and
//! counts the new chain from that snapshot's revision (the segment open meanwhile straddles it,
//! which a restore's chain allows). Then local chain retention runs
//! ([`delta::prune_chains`], `--etcd-snapshot-delta-retention`), leaving alone what waits in the
//! upload queue; the queue runs it in S3 after the base's upload.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use k3s_snapshot_core::delta::{self, SegmentName, SegmentWriter};
use k3s_snapshot_core::etcd::EtcdClientConfig;
use k3s_snapshot_core::list::list_snapshots;
use k3s_snapshot_core::progress::NoProgress;
use k3s_snapshot_core::save::{save, SaveOptions};
use k3s_snapshot_core::store::LocalStore;
use tokio_util::sync::CancellationToken;

pub use crate::metrics::DeltaMetrics;
use crate::upload_queue::UploadQueue;

/// A segment is closed early once it holds this much, whatever the interval.
const MAX_SEGMENT_BYTES: u64 = 256 << 20;
/// Decoding limit of a watch response: etcd's own gRPC send limit (its default, `math.MaxInt32`).
const MAX_WATCH_MESSAGE: usize = i32::MAX as usize;
/// Pause before following again after a watch failure.
const RETRY_PAUSE: Duration = Duration::from_secs(2);
/// Pause before trying again a new chain's full snapshot that failed (the chain goes on).
const ROTATION_RETRY: Duration = Duration::from_secs(30);

pub struct DeltaJob {
    pub interval: Duration,
    pub local: LocalStore,
    /// With `--etcd-s3`: where closed segments and the chains' full snapshots go.
    pub queue: Option<Arc<UploadQueue>>,
    /// For the full snapshots a chain starts from (prefix [`delta::BASE_PREFIX`]).
    pub save: SaveOptions,
    /// `--etcd-snapshot-delta-max-revisions`: 0 is no limit.
    pub max_revisions: u64,
    /// `--etcd-snapshot-delta-max-age`: `None` is no limit.
    pub max_age: Option<Duration>,
    /// `--etcd-snapshot-delta-hash-interval`: the least time between two segments' live hashes.
    pub hash_interval: Duration,
    /// `--etcd-snapshot-delta-retention`: `None` keeps every chain.
    pub chain_retention: Option<Duration>,
    pub etcd: EtcdClientConfig,
    pub metrics: Arc<DeltaMetrics>,
    /// Shared with scheduled and requested snapshots.
    pub lock: Arc<tokio::sync::Mutex<()>>,
}

impl DeltaMetrics {
    /// A chain (new or continued) starts from `base`; `bytes` of its segments are shipped.
    fn chain_from(&self, base: &ChainBase, bytes: u64) {
        self.chain_base_revision.store(base.revision, Ordering::Relaxed);
        self.chain_base_time.store(base.taken, Ordering::Relaxed);
        self.chain_bytes.store(bytes, Ordering::Relaxed);
    }
}

enum Stop {
    Cancelled,
    /// etcd compacted past where the chain is: a new chain must start.
    Compacted(i64),
    Failed(String),
}

/// Runs until `cancel`.
pub async fn run(job: Arc<DeltaJob>, cancel: CancellationToken) {
    let mut fresh_chain = false;
    tracing::info!(interval = ?job.interval, "continuous backup: shipping delta segments");
    loop {
        let (start, history, base) = match start_revision(&job, fresh_chain, &cancel).await {
            Ok(r) => r,
            Err(Stop::Cancelled) => return,
            Err(Stop::Compacted(r)) => {
                tracing::warn!(compacted_at = r, "continuous backup: cannot start a chain; trying again");
                if pause(&cancel).await {
                    return;
                }
                continue;
            }
            Err(Stop::Failed(e)) => {
                tracing::warn!(error = %e, "continuous backup: cannot start a chain; trying again");
                if pause(&cancel).await {
                    return;
                }
                continue;
            }
        };
        fresh_chain = false;
        match follow(&job, start, history, base, &cancel).await {
            Stop::Cancelled => return,
            Stop::Compacted(at) => {
                job.metrics.chain_breaks.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    compacted_at = at,
                    "continuous backup: etcd compacted past the chain; taking a full snapshot to start a new chain (a restore never replays across the gap)"
                );
                fresh_chain = true;
            }
            Stop::Failed(e) => {
                tracing::warn!(error = %e, "continuous backup: the watch failed; following again from the last shipped revision");
                if pause(&cancel).await {
                    return;
                }
            }
        }
    }
}

/// Waits [`RETRY_PAUSE`]; true when cancelled meanwhile.
async fn pause(cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(RETRY_PAUSE) => false,
        _ = cancel.cancelled() => true,
    }
}

/// The full snapshot the current chain counts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ChainBase {
    revision: i64,
    /// Unix seconds from its name.
    taken: i64,
}

/// Where to follow from, the history (etcd's cluster ID) the chain belongs to, and its base:
/// the end of the chain of this history that starts at the newest full snapshot taken in it
/// (local segments counted), or a new full snapshot's revision when there is none or `fresh`
/// asks. A newest snapshot of another history (the one a reset restored from) or of none
/// recorded starts a new chain: its segments' numbers may mean other writes than this history's.
/// Local segments not in S3 yet (closed before a restart or a kill while S3 failed) are found by
/// the upload queue's comparison with S3 and uploaded before any segment written from here on.
async fn start_revision(
    job: &DeltaJob,
    fresh: bool,
    cancel: &CancellationToken,
) -> Result<(i64, u64, ChainBase), Stop> {
    let history = job.etcd.connect().await.map_err(|e| Stop::Failed(e.to_string()))?.cluster_id;
    if !fresh {
        match newest_snapshot_revision(&job.local).await {
            Some((base, Some(h), taken)) if h == history => {
                let segments = delta::list_segments(&job.local).await.unwrap_or_default();
                let (chain, reached) = delta::chain_after(base, Some(history), &segments, None, None);
                let bytes = chain
                    .iter()
                    .filter_map(|s| std::fs::metadata(job.local.dir().join(&s.file)).ok())
                    .map(|m| m.len())
                    .sum();
                let base = ChainBase { revision: base, taken };
                job.metrics.chain_from(&base, bytes);
                return Ok((reached, history, base));
            }
            Some((_, other, _)) => tracing::info!(
                history = format!("{history:016x}"),
                snapshot_history = other.map(|h| format!("{h:016x}")),
                "continuous backup: the newest snapshot is not of etcd's current history (a restore started a new one); a new chain starts"
            ),
            None => {}
        }
    }
    let base = full_snapshot(job, cancel).await?;
    job.metrics.chain_from(&base, 0);
    prune_local_chains(job).await;
    Ok((base.revision, history, base))
}

/// Local chain retention, leaving alone what waits in the upload queue.
async fn prune_local_chains(job: &DeltaJob) {
    let keep = job.queue.as_ref().map(|q| q.waiting_files()).unwrap_or_default();
    match delta::prune_chains(&job.local, job.chain_retention, &keep).await {
        Ok(p) if !p.is_empty() => {
            if let Some(q) = &job.queue {
                q.forget_vanished();
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "local retention of delta chains failed"),
    }
}

/// Whether the chain from `base`, now reaching `reached`, is past a bound: more than
/// `max_revisions` revisions, or a change and a base at least `max_age` old.
fn past_bound(base: ChainBase, reached: i64, now: i64, max_revisions: u64, max_age: Option<Duration>) -> bool {
    let revisions = reached.saturating_sub(base.revision).max(0) as u64;
    let too_long = max_revisions > 0 && revisions > max_revisions;
    let too_old = max_age.is_some_and(|a| revisions > 0 && now.saturating_sub(base.taken) >= a.as_secs() as i64);
    too_long || too_old
}

/// The revision etcd had when the newest local snapshot was taken, its history (etcd's
/// cluster ID, from its metadata) and the unix seconds of its name: the revision read from the
/// file, as a restore will read it, or for a zipped or encrypted one (which is not opened again)
/// from its metadata, as the restore's chain does; none when the revision is not known.
async fn newest_snapshot_revision(local: &LocalStore) -> Option<(i64, Option<u64>, i64)> {
    let entries = list_snapshots(local, true).await.ok()?;
    let newest = entries.last()?;
    let taken = newest.created.timestamp();
    let md = newest.metadata.as_ref().and_then(|d| d.ours());
    let history = md.and_then(|m| m.cluster_id.as_deref()).and_then(|h| u64::from_str_radix(h, 16).ok());
    if newest.name.ends_with(".zip") || newest.name.ends_with(".age") {
        // An empty keyspace is recorded as revision 0; etcd starts at 1.
        return md?.etcd_revision.map(|r| (r.max(1), history, taken));
    }
    let path = local.dir().join(&newest.name);
    let rev =
        tokio::task::spawn_blocking(move || k3s_snapshot_core::revision::snapshot_revision(&path)).await.ok()?.ok()?;
    Some((rev, history, taken))
}

async fn full_snapshot(job: &DeltaJob, cancel: &CancellationToken) -> Result<ChainBase, Stop> {
    crate::drills::preempt();
    let _held = job.lock.clone().lock_owned().await;
    let mut conn = job.etcd.connect().await.map_err(|e| Stop::Failed(e.to_string()))?;
    // With S3 the upload queue takes the snapshot over: the chain starts at local speed.
    let saved = match &job.queue {
        Some(q) => q.save(&mut conn, &job.save, cancel).await.map(|q| q.saved),
        None => save(&mut conn, &job.local, &job.save, None, &NoProgress, cancel).await,
    };
    let saved = saved.map_err(|e| match e {
        k3s_snapshot_core::Error::Cancelled => Stop::Cancelled,
        e => Stop::Failed(format!("full snapshot for a new chain: {e}")),
    })?;
    // The chain's snapshots are read back for the revision a restore will start from; a zip or
    // an encrypted file is not opened again, its recorded revision (at least 1) stands in.
    let rev = if saved.metadata.compressed || saved.path.extension().is_some_and(|e| e == "age") {
        saved.metadata.etcd_revision.unwrap_or(0).max(1)
    } else {
        let path = saved.path.clone();
        tokio::task::spawn_blocking(move || k3s_snapshot_core::revision::snapshot_revision(&path))
            .await
            .map_err(|e| Stop::Failed(e.to_string()))?
            .map_err(|e| Stop::Failed(format!("reading the revision of {}: {e}", saved.metadata.name)))?
    };
    tracing::info!(snapshot = %saved.metadata.name, revision = rev, "continuous backup: a new chain starts after this full snapshot");
    let taken = k3s_snapshot_core::name::parse(&saved.metadata.name)
        .map_or_else(|| chrono::Utc::now().timestamp(), |p| p.timestamp);
    Ok(ChainBase { revision: rev, taken })
}

/// Follows the watch from `after + 1`, closing a segment every interval; starts a new chain
/// (a full snapshot, taken while the watch goes on) when the one from `base` is past a bound.
async fn follow(job: &DeltaJob, after: i64, history: u64, mut base: ChainBase, cancel: &CancellationToken) -> Stop {
    let m = &job.metrics;
    m.shipped_revision.fetch_max(after, Ordering::Relaxed);
    m.closed_revision.store(after, Ordering::Relaxed);
    let mut conn = match job.etcd.connect().await {
        Ok(c) => c,
        Err(e) => return Stop::Failed(e.to_string()),
    };
    // A catching-up watch gets up to 1,000 revisions per response, and one revision (a lease's
    // revoke, a DeleteRange) can hold thousands of events: etcd splits such a response into
    // fragments of about --max-request-bytes when asked, and the decoding limit is raised so
    // that a fragment holding one event as large as etcd accepts still decodes.
    let opts = etcd_client::WatchOptions::new()
        .with_from_key()
        .with_start_revision(after + 1)
        .with_progress_notify()
        .with_fragment();
    let mut watch = conn.client.watch_client().max_decoding_message_size(MAX_WATCH_MESSAGE);
    let mut stream = match watch.watch(vec![0u8], Some(opts)).await {
        Ok(s) => s,
        Err(e) => return Stop::Failed(format!("watch: {e}")),
    };
    let mut writer: Option<SegmentWriter> = None;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + job.interval, job.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_rev = after;
    // Inside a fragmented response: the revision's remaining events are still to come, so the
    // open segment is not closed (a revision never spans two segments).
    let mut mid_revision = false;
    // When the last segment's live hash was recorded (the first segment of a follow always gets one).
    let mut last_hash: Option<tokio::time::Instant> = None;
    let mut close_due = false;
    // The new chain's full snapshot while it is taken, and when a failed one may be tried again.
    type Rotation<'a> = Pin<Box<dyn Future<Output = Result<ChainBase, Stop>> + Send + 'a>>;
    let mut rotation: Option<Rotation<'_>> = None;
    let mut rotation_retry = tokio::time::Instant::now();
    loop {
        let stop = tokio::select! {
            _ = cancel.cancelled() => Some(Stop::Cancelled),
            r = async {
                match rotation.as_mut() {
                    Some(f) => f.await,
                    None => std::future::pending().await,
                }
            } => {
                rotation = None;
                match r {
                    Ok(b) => {
                        tracing::info!(
                            previous_base_revision = base.revision,
                            reached = last_rev,
                            "continuous backup: the chain reached its bound; the next segments count from the new full snapshot"
                        );
                        base = b;
                        m.chain_from(&base, 0);
                        m.chain_rotations.fetch_add(1, Ordering::Relaxed);
                        prune_local_chains(job).await;
                        continue;
                    }
                    Err(Stop::Cancelled) => Some(Stop::Cancelled),
                    // A full snapshot never reports a compaction.
                    Err(Stop::Compacted(_)) => continue,
                    Err(Stop::Failed(e)) => {
                        tracing::warn!(error = %e, retry_in = ?ROTATION_RETRY, "continuous backup: the new chain's full snapshot failed; the current chain goes on");
                        rotation_retry = tokio::time::Instant::now() + ROTATION_RETRY;
                        continue;
                    }
                }
            }
            _ = ticker.tick() => {
                if mid_revision {
                    close_due = true;
                    continue;
                }
                None
            }
            msg = stream.message() => match msg {
                Err(e) => Some(Stop::Failed(format!("watch: {e}"))),
                Ok(None) => Some(Stop::Failed("the watch ended".into())),
                Ok(Some(resp)) if resp.compact_revision() > 0 => Some(Stop::Compacted(resp.compact_revision())),
                Ok(Some(resp)) if resp.canceled() => Some(Stop::Failed(format!("etcd cancelled the watch: {}", resp.cancel_reason()))),
                Ok(Some(resp)) => {
                    if let Some(h) = resp.header() {
                        m.etcd_revision.fetch_max(h.revision(), Ordering::Relaxed);
                    }
                    let mut failed = None;
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let w = match &mut writer {
                            Some(w) => w,
                            None => match SegmentWriter::create(job.local.dir(), &job.save.node, job.save.encryption.as_deref()) {
                                Ok(w) => {
                                    // The open segment's oldest change (segments waiting in the
                                    // upload queue count theirs, see `render`).
                                    m.pending_since_ms.store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
                                    writer.insert(w)
                                }
                                Err(e) => {
                                    failed = Some(e.to_string());
                                    break;
                                }
                            },
                        };
                        let event = delta::Event {
                            r#type: match ev.event_type() {
                                etcd_client::EventType::Put => delta::PUT,
                                etcd_client::EventType::Delete => delta::DELETE,
                            },
                            kv: Some(delta::KeyValue {
                                key: kv.key().to_vec(),
                                create_revision: kv.create_revision(),
                                mod_revision: kv.mod_revision(),
                                version: kv.version(),
                                value: kv.value().to_vec(),
                                lease: kv.lease(),
                            }),
                        };
                        if let Err(e) = w.append(&event) {
                            failed = Some(e.to_string());
                            break;
                        }
                        last_rev = last_rev.max(kv.mod_revision());
                    }
                    mid_revision = resp.0.fragment;
                    if let Some(e) = failed {
                        Some(Stop::Failed(e))
                    } else if mid_revision {
                        continue;
                    } else if std::mem::take(&mut close_due)
                        || writer.as_ref().is_some_and(|w| w.bytes_written() >= MAX_SEGMENT_BYTES)
                    {
                        None
                    } else {
                        continue;
                    }
                }
            },
        };
        // A tick, a full segment, or the end: close what there is and hand it to the queue. Ending inside a
        // fragmented revision, the open segment is dropped (its .part removed): the next
        // follow starts again after the last closed one, so nothing is lost or half-shipped.
        if stop.is_some() && mid_revision {
            if let Some(w) = writer.take() {
                tracing::info!(
                    events = w.events(),
                    "continuous backup: dropping the open segment, which ends inside a revision; it is followed again"
                );
            }
        }
        if let Some(w) = writer.take() {
            match w.finish(&job.save.node, chrono::Utc::now().timestamp(), Some(history)) {
                Ok((name, _path, bytes)) => {
                    tracing::debug!(segment = %name.file, bytes, "delta segment closed");
                    if last_hash.is_none_or(|t: tokio::time::Instant| t.elapsed() >= job.hash_interval) {
                        record_segment_hash(job, &mut conn, &name).await;
                        last_hash = Some(tokio::time::Instant::now());
                    }
                    ship(job, name, bytes);
                }
                Err(e) => return Stop::Failed(format!("closing a delta segment: {e}")),
            }
        }
        if stop.is_none()
            && rotation.is_none()
            && tokio::time::Instant::now() >= rotation_retry
            && past_bound(base, last_rev, chrono::Utc::now().timestamp(), job.max_revisions, job.max_age)
        {
            tracing::info!(
                base_revision = base.revision,
                reached = last_rev,
                base_age_secs = chrono::Utc::now().timestamp() - base.taken,
                "continuous backup: the chain is past --etcd-snapshot-delta-max-revisions or -max-age; taking a full snapshot to start a new one"
            );
            rotation = Some(Box::pin(full_snapshot(job, cancel)));
        }
        if let Some(stop) = stop {
            return match stop {
                // What was shipped reaches `last_rev`; the next chain starts after a snapshot.
                Stop::Compacted(at) => Stop::Compacted(at.max(last_rev)),
                s => s,
            };
        }
    }
}

/// How long the live hash at a segment's end may take before the segment ships without it.
const SEGMENT_HASH_TIMEOUT: Duration = Duration::from_secs(30);

/// etcd's `HashKV` at the closed segment's last revision (at most once per
/// `--etcd-snapshot-delta-hash-interval`), written as the segment's metadata
/// document (`.metadata/<segment>`, uploaded after it): what a restore drill that replays the
/// chain to there compares the restored content with. It reads the whole key space, so it is
/// bounded; without it a drill checks everything else and says the content was not compared.
async fn record_segment_hash(job: &DeltaJob, conn: &mut k3s_snapshot_core::etcd::EtcdConnection, name: &SegmentName) {
    let hash = match tokio::time::timeout(SEGMENT_HASH_TIMEOUT, conn.live_hash(name.to)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::warn!(segment = %name.file, error = %e, "cannot record etcd's hashkv at the segment's end; restore drills to it will not compare content");
            return;
        }
        Err(_) => {
            tracing::warn!(segment = %name.file, "etcd's hashkv at the segment's end took longer than {}s; restore drills to it will not compare content", SEGMENT_HASH_TIMEOUT.as_secs());
            return;
        }
    };
    let doc = job.local.metadata_dir().join(&name.file);
    if let Err(e) = k3s_snapshot_core::store::write_file_atomic(&doc, &hash.segment_document()) {
        tracing::warn!(segment = %name.file, error = %e, "cannot write the segment's metadata; restore drills to it will not compare content");
    }
}

/// Hands a closed segment to the upload queue; without S3 it is shipped once it is on disk.
fn ship(job: &DeltaJob, name: SegmentName, bytes: u64) {
    let m = &job.metrics;
    m.closed_revision.fetch_max(name.to, Ordering::Relaxed);
    let since = m.pending_since_ms.load(Ordering::Relaxed);
    match &job.queue {
        Some(q) => q.push_segment(name, bytes, since),
        None => m.segment_shipped(name.to, bytes),
    }
    // The queue holds its time now.
    m.pending_since_ms.store(0, Ordering::Relaxed);
}
