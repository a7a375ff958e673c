//! A save with an upload: the pipelined fast path (the upload follows the file through a [`Tee`]),
//! the upload of a snapshot already saved, and the metadata document that goes with each.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::etcd::EtcdConnection;
use crate::metadata::SnapshotMetadata;
use crate::progress::Progress;
use crate::store::{LocalStore, PutOptions, Ranges};
use crate::{Error, Result};

use super::{save, save_inner, tee_channel, SaveOptions, SavedSnapshot, Tee};

/// The outcome of [`save_and_upload`]: the local snapshot always, and the upload's result when
/// there was a remote store.
#[derive(Debug)]
pub struct SaveOutcome {
    pub local: SavedSnapshot,
    /// Bytes uploaded, or why the upload failed (the local snapshot is kept either way).
    pub upload: Option<Result<u64>>,
}

/// Saves a snapshot locally and, with a remote store, uploads it. Uncompressed and encrypted
/// snapshots are uploaded while etcd's stream arrives (one read of etcd); compressed plain ones
/// after the zip is written. Then the metadata document goes up beside it. A failed upload never loses the local
/// snapshot and leaves nothing under the remote name.
pub async fn save_and_upload(
    conn: &mut EtcdConnection,
    local: &LocalStore,
    remote: Option<&dyn crate::store::SnapshotStore>,
    opts: &SaveOptions,
    progress: &dyn Progress,
    cancel: &CancellationToken,
) -> Result<SaveOutcome> {
    let Some(remote) = remote else {
        let saved = save(conn, local, opts, None, progress, cancel).await?;
        return Ok(SaveOutcome { local: saved, upload: None });
    };
    if opts.compress && opts.encryption.is_none() {
        let saved = save(conn, local, opts, None, progress, cancel).await?;
        let upload = upload_existing(local, remote, &saved, progress, cancel).await;
        return Ok(SaveOutcome { local: saved, upload: Some(upload) });
    }
    // Pipelined: the name is not known until `save` reserves it, nor the size until etcd's first
    // message, so the uploader learns both through a oneshot before the first byte arrives. With
    // the size, the store can send the whole snapshot as one streamed request.
    let (tee, body) = tee_channel();
    let ranges = tee.ranges();
    let (name_tx, name_rx) = tokio::sync::oneshot::channel::<(String, Option<u64>)>();
    let (node, token_hash) = (opts.node.clone(), opts.token_hash.clone());
    let upload = async move {
        let Ok((file, size_hint)) = name_rx.await else {
            return Err(Error::Cancelled);
        };
        let opts = following_options(&node, token_hash.as_deref(), size_hint, ranges);
        remote.put(&file, body, opts).await
    };
    let named_tee = NamedTee { tee, name_tx: Some(name_tx) };
    let (saved, uploaded) = tokio::join!(save_named(conn, local, opts, named_tee, progress, cancel), upload);
    let saved = saved?;
    let uploaded = match uploaded {
        Err(e) if e.is_retryable() && !cancel.is_cancelled() => {
            // The local snapshot is whole now, and a file can be sent again (with retries),
            // which a consumed stream cannot. Final errors (credentials, bucket, a timeout
            // that already took --etcd-s3-timeout) are not worth a second wait.
            tracing::warn!(snapshot = %saved.metadata.name, store = %remote.describe(), error = %e, "upload while saving failed; uploading the saved file");
            upload_file_only(local, remote, &saved, progress, cancel).await
        }
        other => other,
    };
    let upload = match uploaded {
        Ok(n) => put_metadata(remote, &saved).await.map(|()| n),
        Err(e) => Err(e),
    };
    if let Err(e) = &upload {
        tracing::warn!(snapshot = %saved.metadata.name, store = %remote.describe(), error = %e, "upload failed; the local snapshot is kept");
    }
    Ok(SaveOutcome { local: saved, upload: Some(upload) })
}

/// The put options of an upload that follows the save's file: its byte ranges, the size once
/// etcd announced it, and k3s's user metadata.
fn following_options(node: &str, token_hash: Option<&str>, size_hint: Option<u64>, ranges: Ranges) -> PutOptions {
    PutOptions {
        content_type: "application/octet-stream".into(),
        user_metadata: user_metadata(node, token_hash),
        size_hint,
        ranges: Some(ranges),
    }
}

/// Saves a snapshot locally while its upload follows the `.part` file, as [`save_and_upload`]
/// does, but the upload runs as a task of its own and is handed back unfinished: the caller never
/// waits for the store (a server's upload queue takes it over, see k3s-server-hooks'
/// `upload_queue`). The task uploads the snapshot only, not its metadata document, and never
/// retries (a consumed stream cannot be sent again; the file can). It stops with
/// [`Error::Cancelled`] on `cancel`. Compressed plain snapshots are zipped after the save, so
/// there is nothing to follow: no task (`None`), the caller uploads the file.
pub async fn save_with_upload_task(
    conn: &mut EtcdConnection,
    local: &LocalStore,
    remote: Arc<dyn crate::store::SnapshotStore>,
    opts: &SaveOptions,
    progress: &dyn Progress,
    cancel: &CancellationToken,
) -> Result<(SavedSnapshot, Option<tokio::task::JoinHandle<Result<u64>>>)> {
    if opts.compress && opts.encryption.is_none() {
        return Ok((save(conn, local, opts, None, progress, cancel).await?, None));
    }
    let (tee, body) = tee_channel();
    let ranges = tee.ranges();
    let (name_tx, name_rx) = tokio::sync::oneshot::channel::<(String, Option<u64>)>();
    let (node, token_hash) = (opts.node.clone(), opts.token_hash.clone());
    let stop = cancel.clone();
    let task = tokio::spawn(async move {
        let Ok((file, size_hint)) = name_rx.await else {
            return Err(Error::Cancelled);
        };
        let opts = following_options(&node, token_hash.as_deref(), size_hint, ranges);
        tokio::select! {
            r = remote.put(&file, body, opts) => r,
            _ = stop.cancelled() => Err(Error::Cancelled),
        }
    });
    let named_tee = NamedTee { tee, name_tx: Some(name_tx) };
    match save_named(conn, local, opts, named_tee, progress, cancel).await {
        Ok(saved) => Ok((saved, Some(task))),
        Err(e) => {
            // The tee was dropped unfinished: the upload ends with an error and stores nothing.
            task.abort();
            Err(e)
        }
    }
}

/// The content type and user metadata a stored snapshot is uploaded with (k3s's
/// `k3s-node-name`, `k3s-token-hash`), for uploads of a file already on disk.
pub fn upload_options(m: &SnapshotMetadata) -> PutOptions {
    PutOptions {
        content_type: content_type(m).into(),
        user_metadata: user_metadata(&m.node_name, m.token_hash.as_deref()),
        size_hint: None,
        ranges: None,
    }
}

struct NamedTee {
    tee: Tee,
    name_tx: Option<tokio::sync::oneshot::Sender<(String, Option<u64>)>>,
}

async fn save_named(
    conn: &mut EtcdConnection,
    local: &LocalStore,
    opts: &SaveOptions,
    mut named: NamedTee,
    progress: &dyn Progress,
    cancel: &CancellationToken,
) -> Result<SavedSnapshot> {
    let name_tx = named.name_tx.take();
    let hook = move |file: &str, size: Option<u64>| {
        if let Some(tx) = name_tx {
            let _ = tx.send((file.to_string(), size));
        }
    };
    save_inner(conn, local, opts, Some(named.tee), Some(Box::new(hook)), progress, cancel).await
}

/// Uploads a snapshot that is already on disk, then its metadata.
pub async fn upload_existing(
    local: &LocalStore,
    remote: &dyn crate::store::SnapshotStore,
    saved: &SavedSnapshot,
    progress: &dyn Progress,
    cancel: &CancellationToken,
) -> Result<u64> {
    let n = upload_file_only(local, remote, saved, progress, cancel).await?;
    put_metadata(remote, saved).await?;
    Ok(n)
}

async fn upload_file_only(
    local: &LocalStore,
    remote: &dyn crate::store::SnapshotStore,
    saved: &SavedSnapshot,
    progress: &dyn Progress,
    cancel: &CancellationToken,
) -> Result<u64> {
    let file = &saved.metadata.name;
    let content_type = content_type(&saved.metadata);
    let opts = PutOptions {
        content_type: content_type.into(),
        user_metadata: user_metadata(&saved.metadata.node_name, saved.metadata.token_hash.as_deref()),
        size_hint: None,
        ranges: None,
    };
    let path = local.path_of(file)?;
    tokio::select! {
        r = crate::transfer::upload_file(remote, file, &path, opts, progress) => r,
        _ = cancel.cancelled() => Err(Error::Cancelled),
    }
}

/// The content type of a stored snapshot: an age file is opaque bytes whatever it holds.
fn content_type(m: &SnapshotMetadata) -> &'static str {
    if m.compressed && !m.encrypted {
        "application/zip"
    } else {
        "application/octet-stream"
    }
}

/// The S3 user metadata k3s puts on a snapshot object and on its metadata object
/// (`k3s-node-name`, `k3s-token-hash`; k3s also writes `k3s-cluster-id`, the kube-system
/// namespace's UID, which a cluster without Kubernetes does not have).
fn user_metadata(node: &str, token_hash: Option<&str>) -> Vec<(String, String)> {
    let mut m = vec![("k3s-node-name".to_string(), node.to_string())];
    if let Some(t) = token_hash {
        m.push(("k3s-token-hash".to_string(), t.to_string()));
    }
    m
}

async fn put_metadata(remote: &dyn crate::store::SnapshotStore, saved: &SavedSnapshot) -> Result<()> {
    put_metadata_doc(remote, &saved.metadata.name, &crate::metadata::MetadataDoc::Ours(saved.metadata.clone())).await
}

/// Writes a snapshot's metadata document into a store (S3 object or local file), with the user
/// metadata k3s puts on it when the document is ours.
pub async fn put_metadata_doc(
    store: &dyn crate::store::SnapshotStore,
    file: &str,
    doc: &crate::metadata::MetadataDoc,
) -> Result<()> {
    let body = Bytes::from(doc.to_json());
    let opts = PutOptions {
        content_type: "application/json".into(),
        user_metadata: doc.ours().map(|m| user_metadata(&m.node_name, m.token_hash.as_deref())).unwrap_or_default(),
        size_hint: Some(body.len() as u64),
        ranges: None,
    };
    store.put(&SnapshotMetadata::key_for(file), futures::stream::once(async { Ok(body) }).boxed(), opts).await?;
    Ok(())
}
