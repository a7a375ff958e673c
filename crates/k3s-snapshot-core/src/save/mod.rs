//! Taking a snapshot: etcd's Maintenance `Snapshot` stream → `<file>.part` → fsync → rename →
//! directory fsync, with the SHA-256 trailer checked on the way and, optionally, a [`Tee`] that
//! lets an upload follow the file as it is written, so that the snapshot is read from etcd once.
//!
//! The upload never slows the local save: it reads what the save already wrote (from the page
//! cache, with `pread` on its own descriptor) at its own pace, and the save never waits for it. A
//! slow S3 only makes the upload finish later, bounded by the store's own deadline.
//!
//! After the trailer check, etcd's messages go in 256 KiB batches to a [`Sealer`] thread that
//! writes the file with plain blocking writes (tokio's file type copies every buffer once more on
//! its way to a blocking thread). With recipients ([`SaveOptions::encryption`]) the plaintext
//! never reaches the disk: the sealer zips them (with [`compress::ZipStream`], when compressing)
//! and encrypts them with age straight into `<file>[.zip].age.part`; the tee follows that file as
//! it follows a plain one. The SHA-256 in the
//! metadata is then that of the encrypted bytes, and no native content check runs after the save
//! (it would need the plaintext): the revision is the one etcd reported, the key count is unknown.
//!
//! Here: the save itself; the parts: `tee` (the [`Tee`] an upload follows), `seal` (the writer
//! thread), `upload` (saves with an upload, and the metadata document that goes with each).

mod seal;
mod tee;
mod upload;

use std::path::PathBuf;
use std::sync::Arc;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::compress;
use crate::encryption::Recipients;
use crate::etcd::EtcdConnection;
use crate::integrity::TrailerCheck;
use crate::metadata::SnapshotMetadata;
use crate::name::{self, AGE_SUFFIX, ZIP_SUFFIX};
use crate::progress::Progress;
use crate::store::{create_new_private, durable_rename, part_path, write_file_atomic, LocalStore, RemoveOnDrop};
use crate::{Error, Result};

use seal::{SealMsg, Sealer, ZIP64_ABOVE};
use tee::FOLLOW_CHUNK;
pub use tee::{tee_channel, Tee};
pub use upload::{
    put_metadata_doc, save_and_upload, save_with_upload_task, upload_existing, upload_options, SaveOutcome,
};

/// What to save and where.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// `--name` (on-demand) or `--etcd-snapshot-name` (scheduled).
    pub prefix: String,
    pub node: String,
    pub compress: bool,
    /// `name::token_hash` of the cluster token, when known.
    pub token_hash: Option<String>,
    /// Encrypt every stored copy to these age recipients (`--etcd-snapshot-encryption-recipients-file`).
    pub encryption: Option<Arc<Recipients>>,
}

impl SaveOptions {
    /// What follows `<name>-<node>-<ts>` in the stored file's name: `.zip` when compressed, then
    /// `.age` when encrypted.
    fn suffix(&self) -> &'static str {
        match (self.compress, self.encryption.is_some()) {
            (false, false) => "",
            (true, false) => ZIP_SUFFIX,
            (false, true) => AGE_SUFFIX,
            (true, true) => ".zip.age",
        }
    }
}

/// A saved snapshot.
#[derive(Debug, Clone)]
pub struct SavedSnapshot {
    pub path: PathBuf,
    pub metadata: SnapshotMetadata,
}

/// Picks a free name for this second, or the next free second, and creates the `.part` of the
/// stored file (`<name>-<node>-<ts>` plus `suffix`) with `O_EXCL|O_NOFOLLOW`, so that two saves in
/// the same second never write the same file and nothing planted at the name is written
/// through. A second is taken when any form of its name (plain, `.zip`, `.age`, `.zip.age`) is.
/// Returns the base name, the file and the guard that removes the `.part`.
fn reserve(store: &LocalStore, opts: &SaveOptions, suffix: &str) -> Result<(String, std::fs::File, RemoveOnDrop)> {
    let first = Utc::now().timestamp();
    for ts in first..first + 1000 {
        let file = name::snapshot_name(&opts.prefix, &opts.node, ts);
        let forms = ["", ZIP_SUFFIX, AGE_SUFFIX, ".zip.age"].map(|s| store.dir().join(format!("{file}{s}")));
        let part = part_path(&store.dir().join(format!("{file}{suffix}")));
        // Anything at a name, a dangling symbolic link too, makes it taken.
        let taken = || forms.iter().any(|p| std::fs::symlink_metadata(p).is_ok());
        if !taken() {
            match create_new_private(&part) {
                Ok(f) => {
                    let guard = RemoveOnDrop::new(part);
                    if !taken() {
                        return Ok((file, f, guard));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::Io { action: "create snapshot", path: part, cause: e }),
            }
        }
    }
    Err(Error::Invalid(format!("no free snapshot name for {} in {}", opts.prefix, store.dir().display())))
}

/// Streams a snapshot from etcd into the store's directory and writes its metadata.
///
/// On any failure or cancellation, the `.part` file is removed and the tee (if any) is ended
/// with an error: nothing appears under a snapshot name that is not a whole, verified snapshot.
pub async fn save(
    conn: &mut EtcdConnection,
    store: &LocalStore,
    opts: &SaveOptions,
    tee: Option<Tee>,
    progress: &dyn Progress,
    cancel: &CancellationToken,
) -> Result<SavedSnapshot> {
    save_inner(conn, store, opts, tee, None, progress, cancel).await
}

/// Told the snapshot's file name and, from etcd's first message, its announced size (the
/// database plus the 32-byte trailer), before the first byte reaches the tee.
type NameHook = Box<dyn FnOnce(&str, Option<u64>) + Send>;

async fn save_inner(
    conn: &mut EtcdConnection,
    store: &LocalStore,
    opts: &SaveOptions,
    tee: Option<Tee>,
    on_name: Option<NameHook>,
    progress: &dyn Progress,
    cancel: &CancellationToken,
) -> Result<SavedSnapshot> {
    name::validate_prefix(&opts.prefix)?;
    name::validate_file_name(&opts.node)?;
    store.ensure_dirs()?;
    // Only a member that is part of a quorum has current data to snapshot.
    tokio::select! {
        r = conn.confirm_quorum() => r?,
        _ = cancel.cancelled() => return Err(Error::Cancelled),
    }
    let suffix = opts.suffix();
    let sealed_save = opts.encryption.is_some();
    // `file` is the base name; a plain save writes `file.part` and zips afterwards, an encrypted
    // one writes the stored file (`file[.zip].age`) directly.
    let (file, part_file, guard) = reserve(store, opts, if sealed_save { suffix } else { "" })?;
    let stored_file = if sealed_save { format!("{file}{suffix}") } else { file.clone() };
    let path = store.dir().join(&stored_file);
    let part = part_path(&path);
    let started = std::time::Instant::now();
    let mut on_name = on_name;
    tracing::debug!(snapshot = %stored_file, endpoints = %conn.endpoints, "saving snapshot");

    let endpoints = conn.endpoints.clone();
    if let Some(t) = &tee {
        let follower = part_file.try_clone().map_err(Error::io("open", &part))?;
        t.attach(follower);
    }
    let mut stream = tokio::select! {
        r = conn.client.snapshot() => r.map_err(|cause| Error::EtcdStream { endpoints: endpoints.clone(), received: 0, cause })?,
        _ = cancel.cancelled() => return Err(Error::Cancelled),
    };
    // etcd's HashKV at the revision seen before the stream began (at or below the snapshot's),
    // computed by etcd while it streams the snapshot rather than after it: it reads the whole key
    // space, about 0.1 s per GiB, which a save would otherwise wait for.
    let live_hash = LiveHashTask::start(conn, conn.revision);
    // A plain save zips (when asked) after the file is whole; an encrypted one on the way.
    let entry = (opts.compress && sealed_save).then(|| file.clone());
    let recent = tee.as_ref().filter(|_| !sealed_save).map(Tee::recent);
    let mut sealer = Sealer::start(part_file, &part, opts.encryption.as_deref(), entry, recent)?;
    // One SHA-256 pass serves both the trailer check and the file's checksum for the metadata.
    let mut check = TrailerCheck::new();
    let mut advanced = 0u64;
    progress.start(&stored_file, None);
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = cancel.cancelled() => return Err(Error::Cancelled),
        };
        let resp = match msg {
            Ok(Some(resp)) => resp,
            Ok(None) => break,
            Err(cause) => return Err(Error::EtcdStream { endpoints, received: check.total(), cause }),
        };
        let blob = resp.blob();
        if let Some(hook) = on_name.take() {
            // etcd counts `remaining_bytes` over the database only; the trailer follows it.
            let announced = (blob.len() as u64).checked_add(resp.remaining_bytes()).and_then(|n| n.checked_add(32));
            let stored_len = if !sealed_save {
                announced
            } else if opts.compress {
                // The zip's size is not known before the end; it needs 64-bit sizes when the
                // entry (or the zip) may reach 4 GiB.
                sealer.send(SealMsg::Zip64(announced.is_none_or(|n| n >= ZIP64_ABOVE))).await?;
                None
            } else {
                announced.map(|n| sealer.header_len + crate::encryption::len_after_start(n))
            };
            hook(&stored_file, stored_len);
        }
        check.update(blob);
        sealer.push(blob).await?;
        if let Some(t) = &tee {
            // The follower reads in steps of at least FOLLOW_CHUNK: waking it for each write
            // cost a thread handoff per write.
            let written = sealer.written();
            if written >= advanced + FOLLOW_CHUNK {
                t.advance(written);
                advanced = written;
            }
        }
        progress.advance(blob.len() as u64);
    }
    progress.finish();
    if let Some(hook) = on_name.take() {
        hook(&stored_file, None);
    }
    let raw_size = check.total();
    let raw_sha256 = check.finish_with_stream_sha256(&file)?;
    // The trailer matched: only now does an age stream get its last chunk.
    let sealed = sealer.finish().await?;
    tracing::debug!(snapshot = %stored_file, bytes = raw_size, secs = started.elapsed().as_secs_f64(), "etcd's stream ended and the file is on disk");
    if let Some(sha256) = sealed.sha256 {
        durable_rename(&part, &path)?;
        guard.disarm();
        if let Some(t) = tee {
            t.finish(sealed.len);
        }
        let metadata = SnapshotMetadata {
            name: stored_file.clone(),
            node_name: opts.node.clone(),
            size: sealed.len,
            created_at: Utc::now(),
            compressed: opts.compress,
            sha256: hex::encode(sha256),
            etcd_revision: Some(conn.revision),
            etcd_version: Some(conn.version.clone()),
            total_key: None,
            token_hash: opts.token_hash.clone(),
            encrypted: true,
            recipients: opts.encryption.as_ref().map(|r| r.public_keys()).unwrap_or_default(),
            cluster_id: Some(format!("{:016x}", conn.cluster_id)),
            live_hash: live_hash.finish(&stored_file).await,
            verified: None,
            extra: Default::default(),
        };
        return finish_save(store, path, metadata, raw_size, started);
    }
    durable_rename(&part, &path)?;
    guard.disarm();
    if let Some(t) = tee {
        t.finish(raw_size);
    }
    // The saved file read natively (the bbolt structure and what `etcdutl snapshot status`
    // reports, without hashing again: the trailer was checked while streaming), for the revision
    // and key count in the metadata. ~0.1 s per GiB from the page cache. A file our reader cannot
    // make sense of is kept (etcd's own trailer check passed) with a warning.
    let content = {
        let p = path.clone();
        match tokio::task::spawn_blocking(move || crate::status::status_with(&p, false)).await {
            Ok(Ok(st)) => Some((st.revision, st.total_key)),
            Ok(Err(e)) => {
                tracing::warn!(snapshot = %file, error = %e, "the saved snapshot passed etcd's sha256 check but not the native structure check; keeping it");
                None
            }
            Err(e) => {
                tracing::warn!(snapshot = %file, error = %e, "could not read the saved snapshot back");
                None
            }
        }
    };

    let (stored, size, sha256) = if opts.compress {
        let raw = path.clone();
        let zipped = tokio::task::spawn_blocking(move || -> Result<(PathBuf, u64, String)> {
            // On failure the raw snapshot stays: it is whole and verified.
            let z = compress::compress_file(&raw)?;
            std::fs::remove_file(&raw).map_err(Error::io("remove", &raw))?;
            let size = std::fs::metadata(&z).map_err(Error::io("stat", &z))?.len();
            let sha = crate::integrity::sha256_file(&z)?;
            Ok((z, size, sha))
        })
        .await
        .map_err(|e| Error::Invalid(format!("compression task failed: {e}")))??;
        zipped
    } else {
        (path, raw_size, hex::encode(raw_sha256))
    };
    let stored_name = stored.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    let revision = content.map_or(conn.revision, |(rev, _)| rev);
    let live_hash = live_hash.finish(&stored_name).await;
    let metadata = SnapshotMetadata {
        name: stored_name.clone(),
        node_name: opts.node.clone(),
        size,
        created_at: Utc::now(),
        compressed: opts.compress,
        sha256,
        etcd_revision: Some(revision),
        etcd_version: Some(conn.version.clone()),
        total_key: content.map(|(_, keys)| keys),
        token_hash: opts.token_hash.clone(),
        encrypted: false,
        recipients: Vec::new(),
        cluster_id: Some(format!("{:016x}", conn.cluster_id)),
        live_hash,
        verified: None,
        extra: Default::default(),
    };
    finish_save(store, stored, metadata, raw_size, started)
}

/// How long the live hash after a save may take before the snapshot is kept without it.
const LIVE_HASH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// etcd's `HashKV` at the revision of the linearizable read that opens a save (at or below the
/// snapshot's own), computed while the snapshot streams, for restore drills to compare the
/// restored content with (`etcd-snapshot verify` hashes the restored etcd at the same revision).
/// A failure (a compaction past the revision in between, a slow member) costs only the
/// comparison: the snapshot is kept without it.
struct LiveHashTask {
    task: tokio::task::JoinHandle<Result<crate::metadata::LiveHash>>,
    revision: i64,
}

impl LiveHashTask {
    fn start(conn: &EtcdConnection, revision: i64) -> LiveHashTask {
        // An empty key space is at revision 1 for etcd (0 would ask for the current revision).
        let revision = revision.max(1);
        let mut c = EtcdConnection {
            client: conn.client.clone(),
            endpoints: conn.endpoints.clone(),
            version: String::new(),
            revision,
            db_size: 0,
            cluster_id: conn.cluster_id,
        };
        LiveHashTask { task: tokio::spawn(async move { c.live_hash(revision).await }), revision }
    }

    /// The hash, or none (with a warning) when etcd could not give it within the bound.
    async fn finish(mut self, snapshot: &str) -> Option<crate::metadata::LiveHash> {
        let revision = self.revision;
        match tokio::time::timeout(LIVE_HASH_TIMEOUT, &mut self.task).await {
            Ok(Ok(Ok(h))) => {
                tracing::debug!(snapshot, revision, hash = h.hash, "recorded the live hashkv");
                Some(h)
            }
            Ok(Ok(Err(e))) => {
                tracing::warn!(snapshot, revision, error = %e, "cannot record etcd's hashkv for the snapshot; restore drills will not compare its content");
                None
            }
            Ok(Err(e)) => {
                tracing::warn!(snapshot, revision, error = %e, "the hashkv task failed; restore drills will not compare the snapshot's content");
                None
            }
            Err(_) => {
                tracing::warn!(
                    snapshot,
                    revision,
                    "etcd's hashkv took longer than {}s; restore drills will not compare the snapshot's content",
                    LIVE_HASH_TIMEOUT.as_secs()
                );
                None
            }
        }
    }
}

impl Drop for LiveHashTask {
    fn drop(&mut self) {
        // A save that failed or finished without it does not leave etcd hashing for nobody.
        self.task.abort();
    }
}

/// Writes the metadata document of a saved snapshot and logs it.
fn finish_save(
    store: &LocalStore,
    stored: PathBuf,
    metadata: SnapshotMetadata,
    raw_size: u64,
    started: std::time::Instant,
) -> Result<SavedSnapshot> {
    let stored_name = &metadata.name;
    write_file_atomic(&store.metadata_dir().join(stored_name), &metadata.to_json())?;
    tracing::info!(
        snapshot = %stored_name,
        size = metadata.size,
        snapshot_size = raw_size,
        encrypted = metadata.encrypted,
        duration_ms = started.elapsed().as_millis() as u64,
        "saved snapshot"
    );
    Ok(SavedSnapshot { path: stored, metadata })
}
