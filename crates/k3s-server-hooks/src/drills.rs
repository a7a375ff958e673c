//! Scheduled restore drills (`--etcd-snapshot-verify-schedule`): on each tick, `verify latest`
//! ([`crate::verify::drill`], with the delta chain when the server ships one) from the store a
//! real restore would use (S3 when configured), and the outcome in the snapshot's metadata and
//! in [`DrillMetrics`].
//!
//! - Low priority: drills run on a thread of their own (`k3s-drills`, with its own tokio runtime)
//!   at nice 19; the threads it starts and the etcd and etcdutl it runs inherit that
//!   ([`crate::children::spawn`]), and an I/O priority that was never set follows the niceness
//!   (best effort, level 7, the lowest).
//! - Never two at once, never overlapping a snapshot: a drill holds the snapshot lock that
//!   scheduled, requested and chain-starting snapshots take, waiting for one that runs; a snapshot
//!   that wants the lock while a drill holds it cancels the drill ([`preempt`]), which stops its
//!   etcd and removes its scratch dir, and the next tick drills again. A backup never waits for a
//!   drill.
//! - One server per tick in an HA cluster: a tick is its scheduled time (an `@every` schedule is
//!   aligned to multiples of its interval since the epoch, so every server's ticks are the same
//!   instants), and the servers agree through etcd itself: each puts
//!   `/k3s-snapshot/verify/<tick unix seconds>` with its node name in a transaction that succeeds
//!   only if the key does not exist yet. The key carries a lease as long as the schedule's gap,
//!   so it goes away by itself. The first server wins; the others count the tick as drilled
//!   elsewhere (`k3s_snapshot_verify_elsewhere_total`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use k3s_snapshot_core::etcd::EtcdClientConfig;
use tokio_util::sync::CancellationToken;

use crate::config::ServerConfig;
use crate::metrics::DrillMetrics;
use crate::schedule::Schedule;
use crate::verify::{self, DrillRequest};

/// The key prefix the servers of a cluster agree on a tick's drill with.
pub const ELECTION_PREFIX: &str = "/k3s-snapshot/verify/";

/// Niceness of the drill thread and of what it starts.
const DRILL_NICE: i32 = 19;

/// Everything a scheduled drill needs.
pub struct DrillJob {
    pub schedule: Schedule,
    /// The server's configuration: its stores, identities and etcd binaries.
    pub cfg: ServerConfig,
    /// Replay the delta chain (the server ships one).
    pub deltas: bool,
    /// The live cluster, for the election.
    pub etcd: EtcdClientConfig,
    pub metrics: Arc<DrillMetrics>,
    /// The snapshot lock.
    pub lock: Arc<tokio::sync::Mutex<()>>,
}

static RUNNING: Mutex<Option<CancellationToken>> = Mutex::new(None);

/// Cancels the drill that runs, if one does (a snapshot wants the lock it holds); `true` when
/// there was one.
pub fn preempt() -> bool {
    match RUNNING.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        Some(t) => {
            tracing::info!("the snapshot lock is needed (a snapshot, or a defragmentation for NOSPACE): stopping the restore drill that holds it");
            t.cancel();
            true
        }
        None => false,
    }
}

/// Registers the running drill until dropped.
struct Running;

impl Running {
    fn new(t: CancellationToken) -> Running {
        *RUNNING.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        *RUNNING.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Starts the drill thread; the receiver resolves once it has stopped after `cancel`.
pub fn spawn(job: DrillJob, cancel: CancellationToken) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name("k3s-drills".into()).spawn(move || {
        if let Err(e) = rustix::process::setpriority_process(None, DRILL_NICE) {
            tracing::warn!(error = %e, "cannot lower the restore drills' priority; they run at normal priority");
        }
        match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(run(job, cancel)),
            Err(e) => tracing::error!(error = %e, "cannot start the restore drills' runtime; no drills will run"),
        }
        let _ = done.send(());
    })?;
    Ok(finished)
}

/// The tick after `t`: the schedule's next fire, an `@every` one aligned to the epoch.
pub fn next_tick(schedule: &Schedule, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    match schedule {
        Schedule::Every(d) => {
            let every = d.as_secs().max(1) as i64;
            DateTime::from_timestamp((t.timestamp().div_euclid(every) + 1) * every, 0)
        }
        s => s.next_after(t),
    }
}

async fn run(job: DrillJob, cancel: CancellationToken) {
    let gap = job.schedule.longest_gap(Utc::now(), 64).unwrap_or(Duration::from_secs(86400));
    let mut last = Utc::now();
    loop {
        let Some(next) = next_tick(&job.schedule, last) else {
            tracing::warn!("the restore drill schedule never fires again; no more drills");
            return;
        };
        let wait = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => return,
        }
        last = next;
        let ttl = gap.as_secs().clamp(60, 7 * 86400) as i64;
        match claim_tick(&job.etcd, &job.cfg.node_name, next.timestamp(), ttl).await {
            Ok(None) => {}
            Ok(Some(winner)) => {
                tracing::info!(tick = next.timestamp(), server = %winner, "restore drill of this tick runs on another server");
                job.metrics.elsewhere();
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "restore drill skipped: the servers cannot agree on who drills");
                job.metrics.failure(format!("election: {e}"));
                continue;
            }
        }
        let held = tokio::select! {
            g = job.lock.clone().lock_owned() => g,
            _ = cancel.cancelled() => return,
        };
        let drill_cancel = cancel.child_token();
        let running = Running::new(drill_cancel.clone());
        let req = DrillRequest { target: "latest".into(), deltas: job.deltas, ..DrillRequest::default() };
        tracing::info!(deltas = job.deltas, "restore drill: verifying the latest snapshot");
        let report = verify::drill(&job.cfg, &req, &drill_cancel).await;
        drop(running);
        drop(held);
        if cancel.is_cancelled() {
            return;
        }
        if drill_cancel.is_cancelled() {
            tracing::info!("restore drill stopped for a snapshot; the next tick drills again");
            continue;
        }
        let snapshot = report.snapshot.clone().unwrap_or_default();
        match (report.ok, report.rto_seconds) {
            (true, Some(rto)) => {
                if let Err(e) = verify::record(&job.cfg, &report).await {
                    tracing::warn!(snapshot, error = %e, "the restore drill passed but its result could not be written into the snapshot's metadata");
                }
                tracing::info!(
                    snapshot,
                    rto_seconds = format!("{rto:.1}"),
                    content_compared = report.content_compared(),
                    revision = report.revision.unwrap_or_default(),
                    "restore drill passed"
                );
                job.metrics.success(rto, report.content_compared());
            }
            _ => {
                let why = report.failure().unwrap_or_else(|| "no recovery time measured".into());
                tracing::error!(snapshot, error = %why, "restore drill failed");
                job.metrics.failure(why);
            }
        }
    }
}

/// Claims `tick` for `node` in the cluster's etcd, the key leased for `ttl` seconds; `Ok(None)`
/// when it won, `Ok(Some(winner))` when another server had it.
pub async fn claim_tick(etcd: &EtcdClientConfig, node: &str, tick: i64, ttl: i64) -> Result<Option<String>, String> {
    let mut conn = etcd.connect().await.map_err(|e| e.to_string())?;
    let key = format!("{ELECTION_PREFIX}{tick}");
    let c = &mut conn.client;
    let lease = c.lease_grant(ttl, None).await.map_err(|e| e.to_string())?.id();
    let txn = Txn::new()
        .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key.as_str(), node, Some(PutOptions::new().with_lease(lease)))])
        .or_else([TxnOp::get(key.as_str(), None)]);
    let r = c.txn(txn).await.map_err(|e| e.to_string())?;
    if r.succeeded() {
        return Ok(None);
    }
    let _ = c.lease_revoke(lease).await;
    let winner = r
        .op_responses()
        .into_iter()
        .find_map(|op| match op {
            etcd_client::TxnOpResponse::Get(g) => {
                g.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
            }
            _ => None,
        })
        .unwrap_or_else(|| "another server".into());
    Ok(Some(winner))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ticks_are_aligned_so_that_servers_agree_on_them() {
        let s = Schedule::parse("@every 10m").unwrap();
        let t = DateTime::from_timestamp(1_700_000_123, 0).unwrap();
        assert_eq!(next_tick(&s, t).unwrap().timestamp(), 1_700_000_400);
        assert_eq!(next_tick(&s, next_tick(&s, t).unwrap()).unwrap().timestamp(), 1_700_001_000);
        let cron = Schedule::parse("CRON_TZ=UTC 0 3 * * *").unwrap();
        assert_eq!(next_tick(&cron, t).unwrap().timestamp() % 86400, 3 * 3600);
    }
}
