//! `etcd-snapshot verify [NAME|latest]`: a restore drill run by hand
//! ([`k3s_server_hooks::verify`]), one line per check on stdout (or the report as JSON), a
//! non-zero exit on any failure, and the result recorded in the snapshot's metadata on success.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k3s_server_hooks::config::{RestoreDeltas, ServerConfig, SnapshotSettings};
use k3s_server_hooks::layout::DataDir;
use k3s_server_hooks::verify::{self, DrillReport, DrillRequest, Outcome};
use tokio_util::sync::CancellationToken;

use crate::args::CommonArgs;

/// The reset's configuration for a drill of `common`'s snapshot dir or S3 bucket; the drill
/// replaces what concerns the restore itself.
pub(crate) async fn base_config(common: &CommonArgs, etcd_bin_dir: Option<PathBuf>) -> anyhow::Result<ServerConfig> {
    let remote = common.s3.open().await?;
    let lo = std::net::IpAddr::from([127, 0, 0, 1]);
    Ok(ServerConfig {
        data_dir: DataDir::new(common.data_dir()),
        node_name: common.node(),
        token: None,
        server_url: None,
        cluster_reset: true,
        cluster_reset_restore_path: None,
        cluster_reset_restore_bump_revision: 0,
        restore: RestoreDeltas::default(),
        bind_address: lo,
        advertise_address: lo,
        https_listen_port: 0,
        etcd_client_port: 0,
        etcd_peer_port: 0,
        etcd_bin_dir,
        etcd_args: Vec::new(),
        etcd_expose_metrics: false,
        snapshots: SnapshotSettings {
            schedule: None,
            name: common.name.clone(),
            retention: common.retention,
            dir: Some(common.local_store().dir().to_path_buf()),
            compress: false,
            remote_origin: remote.as_ref().map(|_| common.s3.origin()),
            remote_fetch: remote.clone().map(crate::server::remote_fetch),
            remote,
            remote_retention: common.s3.retention,
            jitter: Duration::ZERO,
            delta_interval: None,
            delta_max_revisions: 0,
            delta_max_age: None,
            delta_hash_interval: Duration::ZERO,
            delta_retention: None,
            encryption: None,
            verify_schedule: None,
        },
        // A drill's etcd is private and short-lived: nothing to compact or defragment.
        health: k3s_server_hooks::config::HealthSettings { compaction_interval: None, ..Default::default() },
        identities: common.identities()?.map(Arc::new),
        etcd_ready_timeout: Duration::from_secs(120),
        etcd_stop_grace: Duration::from_secs(10),
        drill_scratch: None,
    })
}

pub async fn run(
    common: &CommonArgs,
    req: DrillRequest,
    etcd_bin_dir: Option<PathBuf>,
    json: bool,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let cfg = base_config(common, etcd_bin_dir).await?;
    let report = verify::drill(&cfg, &req, cancel).await;
    let recorded = if report.ok {
        match verify::record(&cfg, &report).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "the snapshot verified, but the result could not be written into its metadata");
                false
            }
        }
    } else {
        false
    };
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        print(&mut out, &report, recorded)?;
    }
    out.flush()?;
    match report.failure() {
        Some(f) => anyhow::bail!("{} did not verify: {f}", report.snapshot.as_deref().unwrap_or(&req.target)),
        None => Ok(()),
    }
}

fn print(out: &mut impl Write, report: &DrillReport, recorded: bool) -> std::io::Result<()> {
    if let Some(s) = &report.snapshot {
        writeln!(out, "verifying {s} from {}", report.store)?;
    }
    for c in &report.checks {
        let tag = match c.outcome {
            Outcome::Ok => "ok",
            Outcome::Failed => "FAILED",
            Outcome::Skipped => "skipped",
        };
        writeln!(out, "{tag:<8}{:<10}{}", c.name, c.detail)?;
    }
    if report.ok {
        let content = if report.content_compared() { "content compared" } else { "content NOT compared" };
        let rto = report.rto_seconds.map_or(String::new(), |r| format!(", RTO {r:.1}s"));
        let rec = if recorded { ", recorded in its metadata" } else { "" };
        writeln!(out, "verified ({content}{rto}){rec}")?;
    }
    Ok(())
}
