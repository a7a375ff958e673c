//! The server: a validated [`ServerConfig`] in, etcd with scheduled snapshots and the supervisor
//! API out, until cancelled. Or, with `--cluster-reset`, the reset (see [`crate::reset`]) and exit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k3s_snapshot_core::save::SaveOptions;
use k3s_snapshot_core::store::{create_private_dir, tighten_mode, LocalStore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ServerConfig;
use crate::deltas::{self, DeltaJob, DeltaMetrics};
use crate::drills::{self, DrillJob};
use crate::etcd_proc::{check_port_free, EtcdBinaries, EtcdProcess};
use crate::health::{self, HealthJob, HealthMetrics};
use crate::join::{self, JoinPlan};
use crate::layout::DataDir;
use crate::lock::DataDirLock;
use crate::metrics::{DrillMetrics, SnapshotMetrics};
use crate::scheduler::SnapshotJob;
use crate::snapshot_api::SnapshotService;
use crate::token::Token;
use crate::upload_queue::{QueueSettings, UploadQueue};
use crate::{api, notify, reset, scheduler, tls, Error, Result};

/// For crash tests of a join: `added` aborts right after `MemberAdd` (before etcd starts),
/// `learner-running` once the new learner's etcd is ready but not yet promoted.
const JOIN_ABORT_ENV: &str = "K3S_SNAPSHOT_TEST_JOIN_ABORT_AT";

/// Checks the data dir can be created and written, with a message naming the flag, and makes
/// what an earlier version (or an operator) left too open private again.
fn prepare_data_dir(dd: &DataDir) -> Result<()> {
    let wrap =
        |e: Error| Error::Config(format!("data dir {} is not usable ({e}); check --data-dir", dd.root().display()));
    create_private_dir(&dd.db()).map_err(|e| wrap(e.into()))?;
    // A unique name opened with O_EXCL (tempfile), removed when dropped.
    let probe = tempfile::Builder::new()
        .prefix(".write-probe-")
        .tempfile_in(dd.server())
        .map_err(|e| wrap(Error::Io { action: "write to", path: dd.server(), cause: e }))?;
    drop(probe);
    tighten_data_dir(dd)?;
    Ok(())
}

/// Directories 0700 and secrets 0600 (SPEC §2), whatever mode they were left with: the data dir
/// and its server, db, etcd and tls dirs, the token and the TLS keys. Each change is a warning.
fn tighten_data_dir(dd: &DataDir) -> Result<()> {
    let mut paths = vec![dd.root().to_path_buf(), dd.server(), dd.db(), dd.etcd(), dd.tls(), dd.etcd_tls(), dd.token()];
    for dir in [dd.tls(), dd.etcd_tls()] {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            paths.extend(rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "key")));
        }
    }
    for p in paths {
        if let Some(old) = tighten_mode(&p)? {
            warn_tightened(&p, old);
        }
    }
    Ok(())
}

fn warn_tightened(path: &std::path::Path, old: u32) {
    let new = if path.is_dir() { 0o700 } else { 0o600 };
    tracing::warn!(path = %path.display(), "{} had mode {old:04o}, open to group or others; set it to {new:04o}", path.display());
}

/// The snapshot and metadata dirs: too-open modes of this user's dirs tightened (a warning each),
/// then created 0700 or checked (owned by this user or root, writable by no one else), so that a
/// server whose scheduled snapshots could never be written does not start.
fn prepare_snapshot_dirs(store: &LocalStore) -> Result<()> {
    for (p, old) in store.tighten_dirs()? {
        warn_tightened(&p, old);
    }
    store.ensure_dirs()?;
    Ok(())
}

/// Runs the server until `cancel` (then returns `Ok`), or performs a cluster reset and returns.
pub async fn run(cfg: ServerConfig, cancel: CancellationToken) -> Result<()> {
    cfg.validate()?;
    raise_open_file_limit();
    let dd = cfg.data_dir.clone();
    prepare_data_dir(&dd)?;
    let _lock = DataDirLock::acquire(&dd)?;
    // With the lock held, an etcd still running on this data dir belongs to a server that was
    // killed; it would hold the ports and the database.
    crate::etcd_proc::reap_orphans(&dd.db()).await;
    prepare_snapshot_dirs(&cfg.snapshot_store())?;
    // Partial files of saves or downloads that a kill interrupted (never listed, but never
    // tidied either), by names only we make. Ten minutes without a write means no one is
    // writing them.
    cfg.snapshot_store().remove_stale_parts(std::time::Duration::from_secs(600));
    let bins = EtcdBinaries::find(cfg.etcd_bin_dir.as_deref())?;
    // As k3s: a restore from a snapshot does not look at `reset-flag` (it replaces the data
    // anyway); a bare `--cluster-reset` after an earlier reset, with no normal start between, is
    // refused.
    if cfg.cluster_reset && cfg.cluster_reset_restore_path.is_none() && dd.reset_flag().exists() {
        return Err(Error::Reset(reset::previously_reset_message(&dd)));
    }
    reset::recover_interrupted(&dd)?;

    // Everything that can be refused is refused before anything changes or etcd starts.
    let plan = if cfg.cluster_reset { Some(reset::prepare(&cfg, &bins).await?) } else { None };
    // etcd listens on the advertised address and, as under k3s, on loopback too.
    let client_addr = SocketAddr::new(cfg.advertise_address, cfg.etcd_client_port);
    let loopback_addr = SocketAddr::new(cfg.loopback_address(), cfg.etcd_client_port);
    let peer_addr = SocketAddr::new(cfg.advertise_address, cfg.etcd_peer_port);
    check_port_free("--etcd-client-port", client_addr)?;
    if loopback_addr != client_addr {
        check_port_free("--etcd-client-port", loopback_addr)?;
    }
    check_port_free("--etcd-peer-port", peer_addr)?;
    let api_listener =
        if plan.is_none() { Some(api::bind(SocketAddr::new(cfg.bind_address, cfg.https_listen_port))?) } else { None };
    let job_schedule = if plan.is_none() { cfg.snapshots.schedule.clone() } else { None };

    // Joining: everything the cluster can refuse is asked before anything is written.
    let join_plan = match (&cfg.server_url, &plan) {
        (Some(url), None) => {
            notify::status(&format!("joining the cluster at {url}"));
            match join::prepare(&cfg, &cancel).await {
                Ok(p) => Some(p),
                Err(Error::Cancelled) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        _ => None,
    };
    if let Some(JoinPlan::Fresh(fresh)) = &join_plan {
        fresh.install(&dd)?;
    }

    let mut ips = vec![cfg.advertise_address];
    if !cfg.bind_address.is_unspecified() {
        ips.push(cfg.bind_address);
    }
    let tls_files = tls::ensure(&dd, &cfg.node_name, &ips)?;
    let cluster_ca_pem =
        std::fs::read_to_string(&tls_files.cluster_ca).map_err(Error::io("read", &tls_files.cluster_ca))?;
    let token = Token::ensure(&dd, cfg.token.as_deref(), cluster_ca_pem.as_bytes())?;
    let mut launch = cfg.etcd_launch(tls_files.clone());

    if let Some(plan) = plan {
        return reset::execute(&cfg, &bins, launch, plan, &cancel).await;
    }

    create_private_dir(&dd.etcd())?;
    let client = launch.client_config();
    // A new member: added as a learner; promoted once its etcd caught up. A member restarting
    // from its data that was still a learner is promoted the same way.
    let (added, promotion) = match &join_plan {
        Some(JoinPlan::Fresh(fresh)) => {
            let added = match join::add_member(&cfg, fresh, &tls_files, &cancel).await {
                Ok(a) => a,
                Err(Error::Cancelled) => return Ok(()),
                Err(e) => return Err(e),
            };
            crate::crash::point(JOIN_ABORT_ENV, "added");
            launch.initial_cluster = added.initial_cluster.clone();
            launch.initial_cluster_state = "existing".into();
            let promotion = (added.cluster().clone(), added.member_id);
            (Some(added), Some(promotion))
        }
        Some(JoinPlan::Member { member_id, info }) => {
            launch.initial_cluster_state = "existing".into();
            let promotion =
                info.as_ref().and_then(|i| join::restart_promotion(i, *member_id, &tls_files)).map(|c| (c, *member_id));
            (None, promotion)
        }
        None => (None, None),
    };
    notify::status("starting etcd");
    let mut etcd = match EtcdProcess::start(&bins, &launch).await {
        Ok(e) => e,
        Err(e) => {
            if let Some(a) = &added {
                a.undo().await;
            }
            return Err(e);
        }
    };
    let ready = async {
        etcd.wait_ready(&client, cfg.etcd_ready_timeout, &cancel).await?;
        if added.is_some() {
            crate::crash::point(JOIN_ABORT_ENV, "learner-running");
        }
        if let Some((cluster, id)) = &promotion {
            tokio::select! {
                r = join::promote(cluster, *id, cfg.etcd_ready_timeout, &cancel) => r?,
                e = etcd.exited() => return Err(e),
            }
        }
        Ok(())
    }
    .await;
    match ready {
        Ok(()) => {}
        Err(e) => {
            let _ = etcd.stop(cfg.etcd_stop_grace).await;
            if let Some(a) = &added {
                a.undo().await;
            }
            return match e {
                Error::Cancelled => Ok(()),
                e => Err(e),
            };
        }
    }
    if dd.reset_flag().exists() {
        std::fs::remove_file(dd.reset_flag()).map_err(Error::io("remove", dd.reset_flag()))?;
        tracing::info!(path = %dd.reset_flag().display(), "removed the cluster-reset flag: started normally after a reset");
    }

    let mut stores = vec![scheduler::LOCAL];
    if cfg.snapshots.remote.is_some() {
        stores.push(scheduler::REMOTE);
    }
    let gap = job_schedule.as_ref().and_then(|s| s.longest_gap(chrono::Utc::now(), 64));
    let metrics = Arc::new(SnapshotMetrics::new(&stores, gap));
    let inner = cancel.child_token();
    let tracker = TaskTracker::new();
    let snapshot_lock = Arc::new(tokio::sync::Mutex::new(()));
    let delta_metrics = cfg
        .snapshots
        .delta_interval
        .map(|i| Arc::new(DeltaMetrics::new(i, cfg.snapshots.delta_max_revisions, cfg.snapshots.delta_max_age)));
    // One upload queue for everything that goes to S3: scheduled, requested and chain-starting
    // snapshots, and delta segments. It first finds what a previous run left local only.
    let upload_queue = cfg.snapshots.remote.clone().map(|remote| {
        let q = UploadQueue::new(QueueSettings {
            local: cfg.snapshot_store(),
            remote,
            node: cfg.node_name.clone(),
            token_hash: Some(token.metadata_hash()),
            scheduled_prefix: cfg.snapshots.name.clone(),
            remote_retention: cfg.snapshots.remote_retention,
            chain_retention: cfg.snapshots.delta_retention,
            metrics: metrics.clone(),
            deltas: delta_metrics.clone(),
        });
        tracker.spawn(q.clone().run(inner.clone()));
        q
    });
    let drill_metrics = cfg
        .snapshots
        .verify_schedule
        .as_ref()
        .map(|s| Arc::new(DrillMetrics::new(s.longest_gap(chrono::Utc::now(), 64))));
    let snapshots = Arc::new(SnapshotService {
        local: cfg.snapshot_store(),
        remote: cfg.snapshots.remote.clone(),
        remote_origin: cfg.snapshots.remote_origin.clone(),
        node: cfg.node_name.clone(),
        compress: cfg.snapshots.compress,
        encryption: cfg.snapshots.encryption.clone(),
        token_hash: token.metadata_hash(),
        retention: cfg.snapshots.retention,
        remote_retention: cfg.snapshots.remote_retention,
        queue: upload_queue.clone(),
        etcd: client.clone(),
        lock: snapshot_lock.clone(),
        tracker: tracker.clone(),
        cancel: inner.clone(),
    });
    let health_metrics = Arc::new(HealthMetrics::new(cfg.etcd_quota(), cfg.health.defrag_threshold_percent));
    let state = Arc::new(api::ApiState {
        data_dir: dd.clone(),
        token: token.clone(),
        cluster_ca_pem,
        etcd: client.clone(),
        metrics: metrics.clone(),
        auth_failures: Default::default(),
        snapshots,
        deltas: delta_metrics.clone(),
        drills: drill_metrics.clone(),
        health: health_metrics.clone(),
    });
    let rustls = api::rustls_config(&tls_files)?;
    let mut api_task =
        tokio::spawn(api::serve(api_listener.expect("bound for a normal start"), rustls, state, inner.clone()));

    // Scheduled snapshots and the full snapshots that start delta chains are saved alike, under
    // their own prefixes (so that neither retention selects the other's).
    let scheduled_save = SaveOptions {
        prefix: cfg.snapshots.name.clone(),
        node: cfg.node_name.clone(),
        compress: cfg.snapshots.compress,
        token_hash: Some(token.metadata_hash()),
        encryption: cfg.snapshots.encryption.clone(),
    };
    let mut scheduler_task = None;
    if let Some(schedule) = job_schedule {
        let job = Arc::new(SnapshotJob {
            schedule,
            local: cfg.snapshot_store(),
            queue: upload_queue.clone(),
            save: scheduled_save.clone(),
            retention: cfg.snapshots.retention,
            chain_retention: cfg.snapshots.delta_retention,
            jitter: cfg.snapshots.jitter,
            etcd: client.clone(),
            metrics: metrics.clone(),
            lock: snapshot_lock.clone(),
        });
        scheduler_task = Some(tracker.spawn(scheduler::run(job, tracker.clone(), inner.clone())));
        tracing::info!("scheduled snapshots enabled");
    } else {
        tracing::info!("scheduled snapshots disabled");
    }
    tracker.spawn(health::run(
        Arc::new(HealthJob {
            node: cfg.node_name.clone(),
            etcd: client.clone(),
            settings: cfg.health.clone(),
            quota: cfg.etcd_quota(),
            snapshot_lock: snapshot_lock.clone(),
            deltas: delta_metrics.clone(),
            metrics: health_metrics,
        }),
        inner.clone(),
    ));
    if let (Some(interval), Some(metrics)) = (cfg.snapshots.delta_interval, delta_metrics) {
        let job = Arc::new(DeltaJob {
            interval,
            local: cfg.snapshot_store(),
            queue: upload_queue.clone(),
            save: SaveOptions { prefix: k3s_snapshot_core::delta::BASE_PREFIX.into(), ..scheduled_save.clone() },
            max_revisions: cfg.snapshots.delta_max_revisions,
            max_age: cfg.snapshots.delta_max_age,
            hash_interval: cfg.snapshots.delta_hash_interval,
            chain_retention: cfg.snapshots.delta_retention,
            etcd: client.clone(),
            metrics,
            lock: snapshot_lock.clone(),
        });
        tracker.spawn(deltas::run(job, inner.clone()));
    }
    // Restore drills on their own low-priority thread; awaited at shutdown.
    let mut drills_done = None;
    if let (Some(schedule), Some(metrics)) = (cfg.snapshots.verify_schedule.clone(), drill_metrics) {
        let job = DrillJob {
            schedule,
            cfg: cfg.clone(),
            deltas: cfg.snapshots.delta_interval.is_some(),
            etcd: client.clone(),
            metrics,
            lock: snapshot_lock.clone(),
        };
        drills_done = Some(
            drills::spawn(job, inner.clone())
                .map_err(|e| Error::Config(format!("cannot start the restore drills' thread: {e}")))?,
        );
        tracing::info!("scheduled restore drills enabled");
    }
    tracing::info!(node = %cfg.node_name, etcd = %client.endpoints_display(), "server is running");
    // etcd answered its health check above and the API's socket listens (bound before etcd
    // started, served from now on): the service manager may start what depends on us.
    notify::ready(&format!(
        "running: etcd healthy at {}, supervisor api on port {}",
        client.endpoints_display(),
        cfg.https_listen_port
    ));

    let (outcome, api_done): (Result<()>, bool) = tokio::select! {
        biased;
        _ = cancel.cancelled() => (Ok(()), false),
        e = etcd.exited() => (Err(e), false),
        r = async {
            match scheduler_task.as_mut() {
                Some(t) => t.await,
                None => std::future::pending().await,
            }
        } => (Err(Error::Scheduler(match r {
            Ok(()) => "the schedule ended".into(),
            Err(e) if e.is_panic() => "its task panicked".into(),
            Err(e) => format!("its task failed: {e}"),
        })), false),
        r = &mut api_task => (match r {
            Ok(Ok(())) if cancel.is_cancelled() => Ok(()),
            Ok(Ok(())) => Err(Error::Api("the supervisor api stopped".into())),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(Error::Api(format!("the supervisor api task failed: {e}"))),
        }, true),
    };
    if let Err(e) = &outcome {
        tracing::error!(error = %e, "shutting down");
        notify::stopping(&format!("stopping after an error: {e}"));
    } else {
        tracing::info!("shutting down: stopping scheduled snapshots, then etcd");
        notify::stopping("stopping: scheduled snapshots, then etcd");
    }
    inner.cancel();
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(30), tracker.wait()).await.is_err() {
        tracing::warn!("a snapshot in progress did not stop within 30s; stopping etcd anyway");
    }
    if let Some(done) = drills_done {
        // A drill stops its etcd (SIGTERM, then SIGKILL after 10 s) and removes its scratch dir.
        if tokio::time::timeout(Duration::from_secs(20), done).await.is_err() {
            tracing::warn!("a restore drill did not stop within 20s; stopping etcd anyway");
        }
    }
    if !api_done {
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut api_task).await;
    }
    etcd.stop(cfg.etcd_stop_grace).await?;
    outcome
}

/// Raises the soft limit on open files to the hard limit: API connections, etcd clients, `.part`
/// files and uploads all need descriptors, and the usual soft limit (1024) is low for a server.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-file limit"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}
