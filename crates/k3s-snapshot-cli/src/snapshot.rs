//! `k3s-snapshot etcd-snapshot [save | ls | delete | prune | status]`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use k3s_snapshot_core::encryption::{self};
use k3s_snapshot_core::k3s_list::{self, SnapshotFileList};
use k3s_snapshot_core::list::list_snapshots;
use k3s_snapshot_core::name;
use k3s_snapshot_core::retention::{prune, RetentionPolicy};
use k3s_snapshot_core::save::{save_and_upload, SaveOptions};
use k3s_snapshot_core::status::TrailerStatus;
use k3s_snapshot_core::store::SnapshotStore;
use tokio_util::sync::CancellationToken;

use crate::args::{CommonArgs, OutputFormat, StatusFormat};
use crate::bar::bar;
use crate::ls;
use crate::snapshot_args::{SnapshotArgs, SnapshotCommand};

pub async fn run(args: SnapshotArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let common = &args.common;
    let command = args.command.unwrap_or(SnapshotCommand::Save);
    if let Some(server) = common.etcd_server.as_deref().filter(|s| !s.is_empty()) {
        return crate::remote::run(common, server, command).await;
    }
    match command {
        SnapshotCommand::Save => save(common, &cancel).await,
        SnapshotCommand::Ls { output } => ls(common, output).await,
        SnapshotCommand::Delete { names } => delete(common, &names).await,
        SnapshotCommand::Prune => prune_cmd(common).await,
        SnapshotCommand::Status { target, output, skip_hash_check } => {
            status_cmd(common, &target, output, !skip_hash_check).await
        }
        SnapshotCommand::Verify { target, deltas, to_revision, to_time, output, etcd_bin_dir } => {
            let req = k3s_server_hooks::verify::DrillRequest {
                target,
                deltas: deltas || to_revision.is_some() || to_time.is_some(),
                to_revision,
                to_time,
            };
            crate::verify::run(common, req, etcd_bin_dir, output == StatusFormat::Json, &cancel).await
        }
        SnapshotCommand::Inspect(args) => crate::inspect::run(common, args).await,
    }
}

async fn save(common: &CommonArgs, cancel: &CancellationToken) -> anyhow::Result<()> {
    name::validate_prefix(&common.name).context("--name")?;
    let node = common.node();
    name::validate_file_name(&node).context("--node-name")?;
    let encryption = common.recipients()?;
    let local = common.local_store();
    local.ensure_dirs()?;
    // An unreachable S3 must not cost the local snapshot: remember why, save locally, then fail.
    let (remote, remote_err) = match common.s3.open().await {
        Ok(r) => (r, None),
        Err(e) if common.s3.enabled && common.s3.bucket.is_some() => (None, Some(e)),
        Err(e) => return Err(e),
    };
    let mut conn = common.etcd_config()?.connect().await?;
    let opts = SaveOptions {
        prefix: common.name.clone(),
        node,
        compress: common.compress,
        token_hash: common.token_hash(),
        encryption,
    };
    let progress = bar();
    let outcome = save_and_upload(&mut conn, &local, remote.as_deref(), &opts, progress.as_ref(), cancel).await?;
    let saved = &outcome.local;
    let mut out = std::io::stdout().lock();
    writeln!(out, "Snapshot {} saved to {}", saved.metadata.name, local.location(&saved.metadata.name))?;
    if let Some(e) = remote_err {
        bail!(
            "snapshot {} is saved locally at {}, but it was not uploaded: {e:#}",
            saved.metadata.name,
            saved.path.display()
        );
    }
    if let (Some(remote), Some(upload)) = (&remote, outcome.upload) {
        match upload {
            Ok(_) => {
                writeln!(out, "Snapshot {} uploaded to {}", saved.metadata.name, remote.location(&saved.metadata.name))?
            }
            Err(e) => bail!(
                "snapshot {} is saved locally at {}, but the upload to {} failed: {e}",
                saved.metadata.name,
                saved.path.display(),
                remote.describe()
            ),
        }
    }
    Ok(())
}

async fn ls(common: &CommonArgs, output: OutputFormat) -> anyhow::Result<()> {
    let store = common.local_store();
    // The table too reads each snapshot's metadata: it shows which ones restore drills proved.
    let local = list_snapshots(&store, true).await?;
    let remote_store = common.s3.open().await?;
    let (remote, origin) = match &remote_store {
        Some(r) => (list_snapshots(r.as_ref(), true).await?, Some(common.s3.origin())),
        None => (Vec::new(), None),
    };
    let rows = k3s_list::rows(local, remote, origin.as_ref());
    let mut list = SnapshotFileList::new(&rows, &common.node());
    if output == OutputFormat::Table {
        let mut stores: Vec<&dyn SnapshotStore> = vec![&store];
        stores.extend(remote_store.as_deref());
        list.delta_chains = k3s_snapshot_core::delta::chains_in(&stores).await?;
    }
    ls::print(&mut std::io::stdout().lock(), list, output)
}

async fn delete(common: &CommonArgs, names: &[String]) -> anyhow::Result<()> {
    for n in names {
        name::validate_file_name(n)?;
    }
    let local = common.local_store();
    let remote = common.s3.open().await?;
    let mut stores: Vec<&dyn SnapshotStore> = vec![&local];
    if let Some(r) = &remote {
        stores.push(r.as_ref());
    }
    // As k3s: a name that is in no store is a warning, not a failure (a script deleting what a
    // retention already pruned goes on).
    for n in names {
        let mut found = false;
        for store in &stores {
            if store.head(n).await?.is_some() {
                found = true;
                if let Some(hold) = k3s_snapshot_core::retention::delete_unless_held(*store, n).await? {
                    // As retention does: a hold is the bucket doing its job, not a failure.
                    tracing::warn!(snapshot = %n, "{} is under {hold}; not deleted", store.location(n));
                    continue;
                }
                tracing::info!(snapshot = %n, location = %store.location(n), "deleted snapshot");
                println!("Deleted {}", store.location(n));
            }
        }
        if !found {
            let places: Vec<String> = stores.iter().map(|s| s.describe()).collect();
            tracing::warn!(
                snapshot = %n,
                "snapshot {n} not found in {}; nothing deleted for it (`etcd-snapshot ls` lists the snapshots)",
                places.join(" or ")
            );
        }
    }
    Ok(())
}

async fn prune_cmd(common: &CommonArgs) -> anyhow::Result<()> {
    name::validate_prefix(&common.name).context("--name")?;
    let local = common.local_store();
    let deleted = prune(&local, &RetentionPolicy { prefix: &common.name, keep: common.retention }).await?;
    for d in &deleted {
        println!("Pruned {}", local.location(d));
    }
    if let Some(remote) = common.s3.open().await? {
        let policy = RetentionPolicy { prefix: &common.name, keep: common.s3.retention };
        for d in prune(remote.as_ref(), &policy).await? {
            println!("Pruned {}", remote.location(&d));
        }
    }
    Ok(())
}

async fn status_cmd(common: &CommonArgs, target: &str, output: StatusFormat, check_hash: bool) -> anyhow::Result<()> {
    let local = common.local_store();
    let as_path = PathBuf::from(target);
    // Work files (a download, an extracted zip) live in a private temp dir that is removed at the end.
    let scratch_parent = if local.dir().is_dir() { local.dir().to_path_buf() } else { std::env::temp_dir() };
    let scratch = tempfile::Builder::new().prefix(".status-").tempdir_in(&scratch_parent)?;
    // An encrypted snapshot needs the identity: said before anything is downloaded.
    let identities = common.identities()?;
    if identities.is_none() && encryption::has_age_suffix(&as_path) {
        return Err(k3s_snapshot_core::Error::NeedIdentity { name: target.to_string() }.into());
    }
    let mut path = if target.contains('/') || (as_path.is_file() && !local.dir().join(target).is_file()) {
        as_path
    } else {
        name::validate_file_name(target)?;
        if common.s3.enabled {
            let Some(remote) = common.s3.open().await? else { unreachable!("--s3 is on") };
            let progress = bar();
            s3_backend::download_with_metadata(remote.as_ref(), target, scratch.path(), progress.as_ref()).await?.0
        } else {
            local.dir().join(target)
        }
    };
    if !path.is_file() {
        bail!("snapshot {} not found; give a path or a name that `etcd-snapshot ls` shows", path.display());
    }
    // A decrypted or extracted file stays a scratch file in the temp dir, removed with it; `kind`
    // is the name it stands for (`x.zip.age` → `x.zip` → `x`), which says what to do next.
    let mut kind = path.clone();
    let mut _decrypted = None;
    if encryption::is_encrypted(&path)? {
        let ids = identities;
        let (src, into) = (path.clone(), scratch.path().to_path_buf());
        let shown = kind.file_name().map_or_else(|| target.to_string(), |n| n.to_string_lossy().into_owned());
        let x = tokio::task::spawn_blocking(move || encryption::decrypt_to_scratch(&src, &into, ids.as_ref(), &shown))
            .await??;
        path = x.path().to_path_buf();
        kind = x.target().to_path_buf();
        _decrypted = Some(x);
    }
    let mut _extracted = None;
    if kind.extension().is_some_and(|e| e == "zip") {
        let zip = path.clone();
        let into = scratch.path().to_path_buf();
        let x =
            tokio::task::spawn_blocking(move || k3s_snapshot_core::compress::extract_to_scratch(&zip, &into)).await??;
        path = x.path().to_path_buf();
        _extracted = Some(x);
    }
    let shown = path.clone();
    let st = tokio::task::spawn_blocking(move || k3s_snapshot_core::status::status_with(&path, check_hash)).await??;
    let mut out = std::io::stdout().lock();
    match output {
        StatusFormat::Json => writeln!(out, "{}", st.etcdutl_json())?,
        StatusFormat::Table => {
            writeln!(out, "{:<10}  {:>10}  {:>10}  {:>12}", "Hash", "Revision", "Total Keys", "Total Size")?;
            writeln!(out, "{:<10x}  {:>10}  {:>10}  {:>12}", st.hash, st.revision, st.total_key, st.total_size)?;
            if let Some(ci) = st.consistent_index {
                writeln!(out, "consistent index {ci}")?;
            }
            match &st.trailer {
                TrailerStatus::Absent => writeln!(out, "sha256 trailer absent (not made by `snapshot save`)")?,
                TrailerStatus::Valid { sha256 } => writeln!(out, "sha256 {sha256} verified")?,
                TrailerStatus::Unchecked { expected } => writeln!(out, "sha256 {expected} not checked")?,
                TrailerStatus::Mismatch { .. } => {}
            }
            for m in &st.members {
                writeln!(out, "member {} {} {}", m.id, m.name, m.peer_urls.join(","))?;
            }
            for w in &st.warnings {
                writeln!(out, "warning: {w}")?;
            }
        }
    }
    tracing::debug!(snapshot = %shown.display(), "status read");
    Ok(())
}
