//! `etcd-snapshot save|ls|delete|prune --etcd-server URL`: the server at URL does the work
//! (`POST /db/snapshot` on its supervisor API, see `k3s_server_hooks::snapshot_api`) with its own
//! etcd connection, snapshot dir and S3 settings; this prints what it answers, as the local
//! commands print.

use std::io::Write;

use anyhow::{bail, Context};
use k3s_server_hooks::snapshot_api::{Client, SnapshotRequest, SnapshotResult};

use crate::args::CommonArgs;
use crate::snapshot_args::SnapshotCommand;

pub async fn run(common: &CommonArgs, server: &str, command: SnapshotCommand) -> anyhow::Result<()> {
    let token = common
        .etcd_token
        .as_ref()
        .or(common.token.as_ref())
        .map(|t| t.expose().trim().to_string())
        .filter(|t| !t.is_empty())
        .or_else(|| std::fs::read_to_string(common.data_dir().join("server/token")).ok().map(|t| t.trim().to_string()))
        .filter(|t| !t.is_empty())
        .context("--etcd-server needs the cluster's token: give --etcd-token (server/token on a server)")?;
    if common.s3.bucket.is_some() {
        tracing::warn!("the S3 settings on the command line are not used with --etcd-server: the server uploads with its own --etcd-s3-* settings");
    }
    let local_ca = common.data_dir().join("server/tls/server-ca.crt");
    let client = Client::connect(server, &token, Some(&local_ca)).await?;
    let mut req = SnapshotRequest {
        dir: common.dir.as_ref().map(|d| d.display().to_string()),
        s3: common.s3.enabled.then(|| serde_json::json!({})),
        ..Default::default()
    };
    let result = match command {
        SnapshotCommand::Ls { output } => {
            req.operation = "list".into();
            let answer = client.list(&req).await?;
            warn_all(&answer.warnings);
            return crate::ls::print(&mut std::io::stdout().lock(), answer.value, output);
        }
        SnapshotCommand::Save => {
            req.operation = "save".into();
            req.name = vec![common.name.clone()];
            req.compress = common.compress.then_some(true);
            client.change(&req).await?
        }
        SnapshotCommand::Delete { names } => {
            req.operation = "delete".into();
            req.name = names;
            client.change(&req).await?
        }
        SnapshotCommand::Prune => {
            req.operation = "prune".into();
            req.name = vec![common.name.clone()];
            req.retention = Some(common.retention);
            client.change(&req).await?
        }
        SnapshotCommand::Status { .. } => bail!(
            "status reads a snapshot file and does not use --etcd-server: run it where the file is (or with --etcd-s3)"
        ),
        SnapshotCommand::Inspect(_) => bail!(
            "inspect reads snapshots here and does not use --etcd-server: run it where the snapshot is (or with --etcd-s3)"
        ),
        SnapshotCommand::Verify { .. } => bail!(
            "verify restores a snapshot into a scratch dir here and does not use --etcd-server: run it where the snapshot is (or with --etcd-s3), or give the server --etcd-snapshot-verify-schedule"
        ),
    };
    warn_all(&result.warnings);
    print_result(&mut std::io::stdout().lock(), &result.value)?;
    if !result.value.errors.is_empty() {
        bail!("{}", result.value.errors.join("; "));
    }
    Ok(())
}

fn warn_all(warnings: &[String]) {
    for w in warnings {
        tracing::warn!("server: {w}");
    }
}

/// The same lines the local commands print.
fn print_result(out: &mut impl Write, r: &SnapshotResult) -> std::io::Result<()> {
    for l in &r.locations {
        match l.action.as_str() {
            "saved" => writeln!(out, "Snapshot {} saved to {}", l.name, l.location)?,
            "uploaded" => writeln!(out, "Snapshot {} uploaded to {}", l.name, l.location)?,
            "queued" => writeln!(out, "Snapshot {} queued for upload to {}", l.name, l.location)?,
            "deleted" => writeln!(out, "Deleted {}", l.location)?,
            "pruned" => writeln!(out, "Pruned {}", l.location)?,
            other => writeln!(out, "{other} {}", l.location)?,
        }
    }
    // A k3s server answers names only.
    if r.locations.is_empty() {
        for n in &r.created {
            writeln!(out, "Snapshot {n} saved")?;
        }
        for n in &r.deleted {
            writeln!(out, "Deleted {n}")?;
        }
    }
    Ok(())
}
