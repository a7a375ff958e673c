//! Keeping etcd healthy between snapshots (issue 30): history compaction, defragmentation on a
//! schedule when it is worth it, NOSPACE self-healing, and the numbers behind them on `/metrics`.
//!
//! - Compaction (`--etcd-compaction-interval`, as kube-apiserver: every interval, compact to the
//!   revision seen one interval earlier) is run by the server whose member leads the cluster, so
//!   one server at a time without writing anything (it must also work under NOSPACE). With
//!   continuous backup the target is capped at the delta followers' positions (the end of their
//!   last closed segment, from where a restarted watch follows): each server's follower
//!   publishes its position under [`FOLLOWERS_PREFIX`] on a lease of three intervals, and the
//!   compacting server takes the lowest of them and of its own follower, so no compaction makes
//!   a follower's watch refuse as compacted (a stale published value is lower: only safer).
//! - Scheduled defragmentation (`--etcd-defrag-schedule`): each server defragments its own
//!   member when at least `--etcd-defrag-threshold-percent` of the file and
//!   `--etcd-defrag-min-free-bytes` would be freed, one member at a time through a lease-backed
//!   lock in etcd ([`maintenance::DEFRAG_LOCK`]); the leader's server yields the lock while a
//!   follower still needs it (up to [`LEADER_YIELD`]), then moves leadership to the most
//!   caught-up healthy follower and defragments last. Never while a voting member is unhealthy,
//!   and never while this server holds its snapshot lock (a snapshot or a restore drill): skipped
//!   and reported.
//! - NOSPACE: etcd refuses every write, the lock's included, so then the order is by rank
//!   (followers by member id, the leader last): a server defragments once every member before it
//!   has nothing left to free (or [`maintenance::DEFRAG_TIMEOUT`] passed), and disarms its own
//!   member's alarm once its file is at most [`DISARM_AT`] of the quota. When defragmentation
//!   cannot get there the data really is too big: said in the log and on `/metrics`
//!   (`k3s_snapshot_etcd_defrag_cannot_free`), naming `quota-backend-bytes`, and the alarm is left
//!   for the operator.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k3s_snapshot_core::etcd::EtcdClientConfig;
use k3s_snapshot_core::maintenance::{self, MemberStatus};
use tokio_util::sync::CancellationToken;

use crate::config::HealthSettings;
use crate::deltas::DeltaMetrics;

/// How often the server reads its member's status and the cluster's alarms.
pub const POLL: Duration = Duration::from_secs(2);
/// NOSPACE is disarmed once the file is at most this share of the quota.
pub const DISARM_AT: f64 = 0.9;
/// How long the leader's server leaves the lock to followers that still need a defragmentation.
pub const LEADER_YIELD: Duration = Duration::from_secs(1200);
/// Where delta followers publish the revision up to which a compaction breaks none of them.
pub const FOLLOWERS_PREFIX: &str = "k3s-snapshot/maintenance/delta-followers/";

pub struct HealthJob {
    pub node: String,
    /// This server's own member (loopback).
    pub etcd: EtcdClientConfig,
    pub settings: HealthSettings,
    /// `--quota-backend-bytes` as etcd applies it (`None`: no quota).
    pub quota: Option<i64>,
    /// Held by snapshots (and restore drills): never defragment under it.
    pub snapshot_lock: Arc<tokio::sync::Mutex<()>>,
    pub deltas: Option<Arc<DeltaMetrics>>,
    pub metrics: Arc<HealthMetrics>,
}

/// What `/metrics` shows of etcd's health and of our maintenance.
#[derive(Debug, Default)]
pub struct HealthMetrics {
    state: Mutex<HealthState>,
}

#[derive(Debug, Default, Clone)]
struct HealthState {
    seen: bool,
    db_size: i64,
    in_use: i64,
    quota: Option<i64>,
    threshold: u8,
    alarms: BTreeSet<String>,
    defrags: u64,
    defrag_failures: u64,
    defrag_skips: u64,
    last_duration: Option<f64>,
    last_defrag: Option<i64>,
    cannot_free: bool,
    compactions: u64,
    compacted: i64,
}

impl HealthMetrics {
    pub fn new(quota: Option<i64>, threshold: u8) -> HealthMetrics {
        HealthMetrics { state: Mutex::new(HealthState { quota, threshold, ..HealthState::default() }) }
    }

    fn with<T>(&self, f: impl FnOnce(&mut HealthState) -> T) -> T {
        f(&mut self.state.lock().expect("health metrics lock"))
    }

    pub fn render(&self) -> String {
        let s = self.with(|s| s.clone());
        let mut out = String::new();
        let seen = |v: String| s.seen.then_some(v);
        family(
            &mut out,
            "k3s_snapshot_etcd_db_size_bytes",
            "gauge",
            "Size of this server's etcd member's db file (its high-water mark).",
            seen(s.db_size.to_string()),
        );
        family(
            &mut out,
            "k3s_snapshot_etcd_db_size_in_use_bytes",
            "gauge",
            "Bytes of the db file in use; the rest is free pages a defragmentation gives back.",
            seen(s.in_use.to_string()),
        );
        family(
            &mut out,
            "k3s_snapshot_etcd_db_free_percent",
            "gauge",
            "Share of the db file that is free pages.",
            seen(format!("{:.2}", maintenance::free_percent(s.db_size, s.in_use))),
        );
        family(
            &mut out,
            "k3s_snapshot_etcd_quota_bytes",
            "gauge",
            "etcd's --quota-backend-bytes (absent when the quota is off).",
            s.quota.map(|q| q.to_string()),
        );
        family(
            &mut out,
            "k3s_snapshot_etcd_defrag_threshold_percent",
            "gauge",
            "--etcd-defrag-threshold-percent.",
            Some(s.threshold.to_string()),
        );
        let _ = writeln!(out, "# HELP k3s_snapshot_etcd_alarm 1 while etcd has raised this alarm on this server's member.\n# TYPE k3s_snapshot_etcd_alarm gauge");
        for a in ["NOSPACE", "CORRUPT"] {
            let _ = writeln!(out, "k3s_snapshot_etcd_alarm{{alarm=\"{a}\"}} {}", u8::from(s.alarms.contains(a)));
        }
        family(
            &mut out,
            "k3s_snapshot_etcd_defrag_total",
            "counter",
            "Defragmentations of this server's member that finished.",
            Some(s.defrags.to_string()),
        );
        family(
            &mut out,
            "k3s_snapshot_etcd_defrag_failed_total",
            "counter",
            "Defragmentations that failed or did not finish within their bound.",
            Some(s.defrag_failures.to_string()),
        );
        family(
            &mut out,
            "k3s_snapshot_etcd_defrag_skipped_total",
            "counter",
            "Defragmentations skipped: a member unhealthy, a snapshot or drill running, or no turn.",
            Some(s.defrag_skips.to_string()),
        );
        family(
            &mut out,
            "k3s_snapshot_etcd_defrag_last_duration_seconds",
            "gauge",
            "Duration of the last finished defragmentation.",
            s.last_duration.map(|d| format!("{d:.3}")),
        );
        family(
            &mut out,
            "k3s_snapshot_etcd_defrag_last_timestamp_seconds",
            "gauge",
            "Unix time of the last finished defragmentation.",
            s.last_defrag.map(|t| t.to_string()),
        );
        family(
            &mut out,
            "k3s_snapshot_etcd_defrag_cannot_free",
            "gauge",
            "1 while NOSPACE stays because defragmentation cannot free enough: the data is too big for the quota.",
            Some(u8::from(s.cannot_free).to_string()),
        );
        family(
            &mut out,
            "k3s_snapshot_etcd_compactions_total",
            "counter",
            "History compactions this server ran (--etcd-compaction-interval).",
            Some(s.compactions.to_string()),
        );
        family(
            &mut out,
            "k3s_snapshot_etcd_compacted_revision",
            "gauge",
            "Revision of this server's last compaction (0: none yet).",
            Some(s.compacted.to_string()),
        );
        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str, v: Option<String>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    if let Some(v) = v {
        let _ = writeln!(out, "{name} {v}");
    }
}

/// Runs until `cancel`: the status poll with NOSPACE handling, the compaction ticker and the
/// defragmentation schedule.
pub async fn run(job: Arc<HealthJob>, cancel: CancellationToken) {
    // One defragmentation at a time on this server, whatever asked for it.
    let busy = Arc::new(tokio::sync::Mutex::new(()));
    tokio::join!(poll_loop(&job, &busy, &cancel), compaction_loop(&job, &cancel), schedule_loop(&job, &busy, &cancel));
}

async fn pause(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = cancel.cancelled() => true,
    }
}

/// What the NOSPACE handling remembers between polls.
#[derive(Default)]
struct NoSpace {
    /// Since when this server waits for its turn (members ranked before it).
    waiting_since: Option<Instant>,
    /// What was last said about it, so the log says it once per change.
    said: Option<String>,
    /// When this server last defragmented its member in this episode, at which revision.
    defragged: Option<(Instant, i64)>,
}

impl NoSpace {
    fn say(&mut self, what: String, f: impl FnOnce(&str)) {
        if self.said.as_deref() != Some(&what) {
            f(&what);
            self.said = Some(what);
        }
    }
}

async fn poll_loop(job: &HealthJob, busy: &Arc<tokio::sync::Mutex<()>>, cancel: &CancellationToken) {
    let mut nospace = NoSpace::default();
    loop {
        if let Err(e) = poll_once(job, busy, &mut nospace).await {
            tracing::debug!(error = %e, "etcd health: cannot read the member's status");
        }
        if pause(POLL, cancel).await {
            return;
        }
    }
}

async fn poll_once(
    job: &HealthJob,
    busy: &Arc<tokio::sync::Mutex<()>>,
    ns: &mut NoSpace,
) -> k3s_snapshot_core::Result<()> {
    let own = maintenance::member_status(&job.etcd).await?;
    let mut conn = job.etcd.connect().await?;
    let alarms = maintenance::alarms(&mut conn.client, &conn.endpoints).await?;
    let mine: BTreeSet<String> = alarms.iter().filter(|(m, _)| *m == own.member_id).map(|(_, a)| a.clone()).collect();
    job.metrics.with(|s| {
        s.seen = true;
        s.db_size = own.db_size;
        s.in_use = own.db_size_in_use;
        s.alarms = mine.clone();
    });
    if !alarms.iter().any(|(_, a)| a == "NOSPACE") {
        if ns.said.take().is_some() {
            job.metrics.with(|s| s.cannot_free = false);
            tracing::info!("etcd: no NOSPACE alarm left in the cluster; writes are accepted again");
        }
        ns.waiting_since = None;
        ns.defragged = None;
        return Ok(());
    }
    let Some(quota) = job.quota else { return Ok(()) };
    let target = (quota as f64 * DISARM_AT) as i64;
    // Enough to be worth a defragmentation under NOSPACE: 1 MiB or 1% of the quota.
    let floor = (quota / 100).max(1 << 20);
    if own.db_size <= target {
        job.metrics.with(|s| s.cannot_free = false);
        if mine.contains("NOSPACE") {
            maintenance::disarm(&mut conn.client, &conn.endpoints, own.member_id, "NOSPACE").await?;
            tracing::info!(
                db_size = own.db_size,
                quota,
                "etcd: NOSPACE disarmed: the db file is below {:.0}% of the quota",
                DISARM_AT * 100.0
            );
        }
        ns.waiting_since = None;
        return Ok(());
    }
    // etcd refreshes "in use" only at a later commit, and under NOSPACE little commits: so a
    // defragmentation is also due at the start of the episode, and again once keys were deleted
    // (the revision moved) and a compaction has had time to cover the deletes.
    let settle = job.settings.compaction_interval.unwrap_or(Duration::from_secs(300)).max(POLL) * 2;
    let due = match ns.defragged {
        None => true,
        Some((at, rev)) => rev != own.revision && at.elapsed() >= settle,
    };
    if own.free_bytes() < floor && !due {
        if mine.contains("NOSPACE") {
            job.metrics.with(|s| s.cannot_free = true);
            ns.say(format!("{}/{}", own.db_size_in_use >> 20, quota >> 20), |_| {
                tracing::error!(
                    db_size = own.db_size,
                    in_use = own.db_size_in_use,
                    quota,
                    "etcd: NOSPACE stays: defragmentation cannot free enough, {} MiB of the {} MiB quota is live data; delete data, or raise etcd's quota (--etcd-arg quota-backend-bytes=BYTES) on every server and restart them; then `k3s-snapshot etcd alarm disarm`",
                    own.db_size_in_use >> 20,
                    quota >> 20
                )
            });
        }
        return Ok(());
    }
    // Something to free: our turn once every member ranked before us has nothing left to free.
    let members = maintenance::cluster_status(&job.etcd, quota).await?;
    if let Some(sick) = members.iter().find(|m| !m.learner && !m.healthy()) {
        ns.say(format!("sick {}", sick.id), |_| {
            tracing::warn!(member = %sick.name, error = sick.error.as_deref().unwrap_or(""), "etcd: NOSPACE: not defragmenting while a member is unhealthy")
        });
        return Ok(());
    }
    let waiting_since = *ns.waiting_since.get_or_insert_with(Instant::now);
    let before: Vec<&MemberStatus> =
        ranked(&members).into_iter().take_while(|m| m.member_id != own.member_id).collect();
    if let Some(first) = before.iter().find(|m| m.free_bytes() >= floor) {
        if waiting_since.elapsed() < maintenance::DEFRAG_TIMEOUT {
            ns.say(format!("wait {}", first.id), |_| {
                tracing::info!(member = %first.name, "etcd: NOSPACE: waiting for member {} to defragment first (followers first, the leader last)", first.name)
            });
            return Ok(());
        }
    }
    ns.waiting_since = None;
    ns.say(format!("defrag {}", own.db_size), |_| {
        tracing::warn!(
            db_size = own.db_size,
            in_use = own.db_size_in_use,
            quota,
            "etcd: NOSPACE: defragmenting this server's member now"
        )
    });
    if defragment_own(job, busy, &members, "nospace").await.is_ok() {
        ns.defragged = Some((Instant::now(), own.revision));
    }
    Ok(())
}

/// Voting members in defragmentation order: followers by member id, the leader last.
fn ranked(members: &[MemberStatus]) -> Vec<&MemberStatus> {
    let mut v: Vec<&MemberStatus> = members.iter().filter(|m| !m.learner).collect();
    v.sort_by_key(|m| (m.leader, m.member_id));
    v
}

/// Defragments this server's member, after moving leadership away when it leads; the caller
/// took care of the turn. Counts and logs the outcome.
async fn defragment_own(
    job: &HealthJob,
    busy: &Arc<tokio::sync::Mutex<()>>,
    members: &[MemberStatus],
    why: &'static str,
) -> Result<(), ()> {
    let skip = |what: String| {
        job.metrics.with(|s| s.defrag_skips += 1);
        tracing::warn!(reason = why, "etcd defragmentation skipped: {what}");
        Err(())
    };
    let Ok(_busy) = busy.try_lock() else { return skip("another defragmentation of this member is running".into()) };
    // NOSPACE stops the cluster's writes, so it outranks a restore drill: the drill is stopped
    // (it runs again at its next tick) and the lock awaited briefly; a snapshot keeps its turn.
    let snap = if why == "nospace" && crate::drills::preempt() {
        tokio::time::timeout(Duration::from_secs(30), job.snapshot_lock.lock()).await.ok()
    } else {
        job.snapshot_lock.try_lock().ok()
    };
    let Some(_snap) = snap else {
        return skip("a snapshot (or a restore drill) is running on this server; the next turn tries again".into());
    };
    let own_id = match maintenance::member_status(&job.etcd).await {
        Ok(s) => s.member_id,
        Err(e) => return skip(format!("cannot read this member's status: {e}")),
    };
    let Some(own) = members.iter().find(|m| m.member_id == own_id) else {
        return skip("this server's member is not in the member list".into());
    };
    let before = own.db_size;
    let started = Instant::now();
    let outcome = maintenance::defragment_member(&job.etcd, members, own).await;
    match outcome {
        Ok(moved) => {
            let secs = started.elapsed().as_secs_f64();
            let after = maintenance::member_status(&job.etcd).await.map(|s| s.db_size).unwrap_or(0);
            job.metrics.with(|s| {
                s.defrags += 1;
                s.last_duration = Some(secs);
                s.last_defrag = Some(chrono::Utc::now().timestamp());
                if after > 0 {
                    s.db_size = after;
                }
            });
            tracing::info!(
                node = %job.node,
                reason = why,
                before,
                after,
                duration_ms = (secs * 1000.0) as u64,
                moved_leadership_to = moved.map(|id| format!("{id:x}")),
                "etcd member defragmented"
            );
            Ok(())
        }
        Err(e) => {
            job.metrics.with(|s| s.defrag_failures += 1);
            tracing::error!(reason = why, error = %e, "etcd defragmentation failed; not retried until the next turn");
            Err(())
        }
    }
}

async fn schedule_loop(job: &HealthJob, busy: &Arc<tokio::sync::Mutex<()>>, cancel: &CancellationToken) {
    let Some(schedule) = &job.settings.defrag_schedule else { return };
    let mut last = chrono::Utc::now();
    loop {
        let Some(next) = schedule.next_after(last) else { return };
        let wait = (next - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO);
        if pause(wait, cancel).await {
            return;
        }
        last = next.max(chrono::Utc::now());
        tokio::select! {
            _ = scheduled_defrag(job, busy) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// One fire of `--etcd-defrag-schedule`: this member's turn in the cluster's rolling order.
async fn scheduled_defrag(job: &HealthJob, busy: &Arc<tokio::sync::Mutex<()>>) {
    let quota = job.quota.unwrap_or(0);
    let started = Instant::now();
    loop {
        let own = match maintenance::member_status(&job.etcd).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "scheduled defragmentation: cannot read this member's status");
                return;
            }
        };
        if !job.settings.worth_it(&own) {
            tracing::info!(
                db_size = own.db_size,
                in_use = own.db_size_in_use,
                free_percent = format!("{:.1}", own.free_percent),
                "scheduled defragmentation: not needed (below --etcd-defrag-threshold-percent or --etcd-defrag-min-free-bytes)"
            );
            return;
        }
        let conn = match job.etcd.connect().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "scheduled defragmentation: cannot reach etcd");
                return;
            }
        };
        let wait = LEADER_YIELD.saturating_sub(started.elapsed()).max(Duration::from_secs(1));
        let lock = match maintenance::ClusterLock::acquire(
            &conn.client,
            &conn.endpoints,
            maintenance::DEFRAG_LOCK,
            wait,
        )
        .await
        {
            Ok(Some(l)) => l,
            Ok(None) => {
                job.metrics.with(|s| s.defrag_skips += 1);
                tracing::warn!("scheduled defragmentation skipped: another member's defragmentation held the cluster's lock all along");
                return;
            }
            Err(e) => {
                job.metrics.with(|s| s.defrag_skips += 1);
                tracing::warn!(error = %e, "scheduled defragmentation skipped: cannot take the cluster's defragmentation lock");
                return;
            }
        };
        let members = match maintenance::cluster_status(&job.etcd, quota).await {
            Ok(m) => m,
            Err(e) => {
                lock.release().await;
                tracing::warn!(error = %e, "scheduled defragmentation skipped: cannot read the members' status");
                return;
            }
        };
        if let Some(sick) = members.iter().find(|m| !m.learner && !m.healthy()) {
            lock.release().await;
            job.metrics.with(|s| s.defrag_skips += 1);
            tracing::warn!(member = %sick.name, error = sick.error.as_deref().unwrap_or(""), "scheduled defragmentation skipped: a member is unhealthy");
            return;
        }
        let me = members.iter().find(|m| m.member_id == own.member_id);
        if me.is_some_and(|m| m.leader) && started.elapsed() < LEADER_YIELD {
            // The leader goes last: leave the lock to followers that still need it.
            if let Some(f) = members.iter().find(|m| !m.leader && !m.learner && job.settings.worth_it(m)) {
                lock.release().await;
                tracing::debug!(member = %f.name, "scheduled defragmentation: the leader waits for a follower to go first");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        }
        let _ = defragment_own(job, busy, &members, "schedule").await;
        lock.release().await;
        return;
    }
}

async fn compaction_loop(job: &HealthJob, cancel: &CancellationToken) {
    let Some(interval) = job.settings.compaction_interval else { return };
    let mut seen_before: Option<i64> = None;
    let mut lease: Option<i64> = None;
    loop {
        if pause(interval, cancel).await {
            return;
        }
        match compact_once(job, interval, seen_before, &mut lease).await {
            Ok(rev) => seen_before = Some(rev),
            Err(e) => tracing::warn!(error = %e, "etcd compaction: skipped this interval"),
        }
    }
}

/// One tick: publish this server's follower position, and when this member leads compact to
/// the revision seen one interval ago, capped by every follower's position. Returns the
/// revision seen now.
async fn compact_once(
    job: &HealthJob,
    interval: Duration,
    seen_before: Option<i64>,
    lease: &mut Option<i64>,
) -> k3s_snapshot_core::Result<i64> {
    let own = maintenance::member_status(&job.etcd).await?;
    let mut conn = job.etcd.connect().await?;
    let endpoints = conn.endpoints.clone();
    let follower = job.deltas.as_ref().map(|d| d.closed_revision.load(Ordering::Relaxed));
    if let Some(pos) = follower {
        // Best effort (refused under NOSPACE); the lease drops a dead server's entry.
        if let Err(e) = publish_position(&mut conn.client, &job.node, pos, interval, lease).await {
            tracing::debug!(error = %e, "etcd compaction: cannot publish the delta follower's position");
        }
    }
    let Some(target) = seen_before else { return Ok(own.revision) };
    if !own.leader {
        return Ok(own.revision);
    }
    let published = conn
        .client
        .get(FOLLOWERS_PREFIX, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .map_err(|cause| k3s_snapshot_core::Error::Etcd { endpoints: endpoints.clone(), cause })?;
    let positions = published.kvs().iter().filter_map(|kv| kv.value_str().ok()?.parse::<i64>().ok()).chain(follower);
    let capped = positions.fold(target, i64::min);
    let already = job.metrics.with(|s| s.compacted);
    if capped <= already || capped <= 1 {
        if capped < target {
            tracing::info!(
                target,
                follower_position = capped,
                "etcd compaction held back: a delta follower has not closed its segments past it yet"
            );
        }
        return Ok(own.revision);
    }
    if maintenance::compact(&mut conn.client, &endpoints, capped).await? {
        job.metrics.with(|s| {
            s.compactions += 1;
            s.compacted = capped;
        });
        tracing::info!(
            revision = capped,
            held_back_from = (capped < target).then_some(target),
            "etcd history compacted"
        );
    } else {
        job.metrics.with(|s| s.compacted = s.compacted.max(capped));
    }
    Ok(own.revision)
}

async fn publish_position(
    client: &mut etcd_client::Client,
    node: &str,
    pos: i64,
    interval: Duration,
    lease: &mut Option<i64>,
) -> Result<(), etcd_client::Error> {
    let ttl = (interval.as_secs() as i64 * 3).max(60);
    let alive = match *lease {
        Some(id) => {
            let (mut keeper, mut answers) = client.lease_keep_alive(id).await?;
            keeper.keep_alive().await?;
            answers.message().await?.filter(|r| r.ttl() > 0).map(|_| id)
        }
        None => None,
    };
    let id = match alive {
        Some(id) => id,
        None => client.lease_grant(ttl, None).await?.id(),
    };
    *lease = Some(id);
    client
        .put(format!("{FOLLOWERS_PREFIX}{node}"), pos.to_string(), Some(etcd_client::PutOptions::new().with_lease(id)))
        .await?;
    Ok(())
}
