//! The server: a validated [`ServerConfig`] in, etcd with scheduled snapshots and the supervisor
//! API out, until cancelled. Or, with `--cluster-reset`, the reset (see [`crate::reset`]) and exit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k3s_snapshot_core::save::SaveOptions;
use k3s_snapshot_core::store::create_private_dir;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ServerConfig;
use crate::etcd_proc::{check_port_free, EtcdBinaries, EtcdProcess};
use crate::join::{self, JoinPlan};
use crate::layout::DataDir;
use crate::lock::DataDirLock;
use crate::metrics::SnapshotMetrics;
use crate::scheduler::SnapshotJob;
use crate::token::Token;
use crate::{api, reset, scheduler, tls, Error, Result};

/// For crash tests of a join: `added` aborts right after `MemberAdd` (before etcd starts),
/// `learner-running` once the new learner's etcd is ready but not yet promoted.
const JOIN_ABORT_ENV: &str = "K3S_SNAPSHOT_TEST_JOIN_ABORT_AT";

/// Checks the data dir can be created and written, with a message naming the flag.
fn prepare_data_dir(dd: &DataDir) -> Result<()> {
    let wrap =
        |e: Error| Error::Config(format!("data dir {} is not usable ({e}); check --data-dir", dd.root().display()));
    create_private_dir(&dd.db()).map_err(|e| wrap(e.into()))?;
    let probe = dd.server().join(".write-probe");
    std::fs::write(&probe, b"").map_err(|e| wrap(Error::Io { action: "write to", path: dd.server(), cause: e }))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Runs the server until `cancel` (then returns `Ok`), or performs a cluster reset and returns.
pub async fn run(cfg: ServerConfig, cancel: CancellationToken) -> Result<()> {
    cfg.validate()?;
    let dd = cfg.data_dir.clone();
    prepare_data_dir(&dd)?;
    let _lock = DataDirLock::acquire(&dd)?;
    // With the lock held, an etcd still running on this data dir belongs to a server that was
    // killed; it would hold the ports and the database.
    crate::etcd_proc::reap_orphans(&dd.db()).await;
    // Partial files of saves or downloads that a kill interrupted (never listed, but never
    // tidied either). Ten minutes without a write means no one is writing them.
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
        (Some(_), None) => match join::prepare(&cfg, &cancel).await {
            Ok(p) => Some(p),
            Err(Error::Cancelled) => return Ok(()),
            Err(e) => return Err(e),
        },
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

    let metrics = Arc::new(SnapshotMetrics::default());
    let inner = cancel.child_token();
    let tracker = TaskTracker::new();
    let state = Arc::new(api::ApiState {
        data_dir: dd.clone(),
        token: token.clone(),
        cluster_ca_pem,
        etcd: client.clone(),
        metrics: metrics.clone(),
    });
    let rustls = api::rustls_config(&tls_files)?;
    let mut api_task =
        tokio::spawn(api::serve(api_listener.expect("bound for a normal start"), rustls, state, inner.clone()));

    if let Some(schedule) = job_schedule {
        let job = Arc::new(SnapshotJob {
            schedule,
            local: cfg.snapshot_store(),
            remote: cfg.snapshots.remote.clone(),
            save: SaveOptions {
                prefix: cfg.snapshots.name.clone(),
                node: cfg.node_name.clone(),
                compress: cfg.snapshots.compress,
                token_hash: Some(token.metadata_hash()),
            },
            retention: cfg.snapshots.retention,
            remote_retention: cfg.snapshots.remote_retention,
            jitter: cfg.snapshots.jitter,
            etcd: client.clone(),
            metrics: metrics.clone(),
        });
        tracker.spawn(scheduler::run(job, tracker.clone(), inner.clone()));
        tracing::info!("scheduled snapshots enabled");
    } else {
        tracing::info!("scheduled snapshots disabled");
    }
    tracing::info!(node = %cfg.node_name, etcd = %client.endpoints_display(), "server is running");

    let (outcome, api_done): (Result<()>, bool) = tokio::select! {
        biased;
        _ = cancel.cancelled() => (Ok(()), false),
        e = etcd.exited() => (Err(e), false),
        r = &mut api_task => (match r {
            Ok(Ok(())) if cancel.is_cancelled() => Ok(()),
            Ok(Ok(())) => Err(Error::Api("the supervisor api stopped".into())),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(Error::Api(format!("the supervisor api task failed: {e}"))),
        }, true),
    };
    if let Err(e) = &outcome {
        tracing::error!(error = %e, "shutting down");
    } else {
        tracing::info!("shutting down: stopping scheduled snapshots, then etcd");
    }
    inner.cancel();
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(30), tracker.wait()).await.is_err() {
        tracing::warn!("a scheduled snapshot did not stop within 30s; stopping etcd anyway");
    }
    if !api_done {
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut api_task).await;
    }
    etcd.stop(cfg.etcd_stop_grace).await?;
    outcome
}
