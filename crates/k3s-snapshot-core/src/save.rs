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

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::compress;
use crate::encryption::Recipients;
use crate::etcd::EtcdConnection;
use crate::integrity::TrailerCheck;
use crate::metadata::SnapshotMetadata;
use crate::name::{self, AGE_SUFFIX, ZIP_SUFFIX};
use crate::progress::Progress;
use crate::store::{
    create_new_private, durable_rename, part_path, write_file_atomic, ByteStream, LocalStore, PutOptions, RemoveOnDrop,
};
use crate::{Error, Result};

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

/// How far the save has written its `.part` file, as the follower sees it.
#[derive(Clone, Default)]
struct Written {
    file: Option<std::sync::Arc<std::fs::File>>,
    /// Bytes in the file (not in the writer's buffer).
    len: u64,
    /// The save finished: `len` is the whole snapshot.
    done: bool,
}

/// The save's side of an upload that follows the file being written. If the [`Tee`] is dropped
/// without [`Tee::finish`] (an error, a cancellation, a panic), the following stream yields an
/// error once it has read what was written, so that a store never completes a partial object.
pub struct Tee {
    tx: watch::Sender<Written>,
}

/// Bytes the follower reads at a time.
const FOLLOW_CHUNK: u64 = 1 << 20;

/// A [`Tee`] and the [`ByteStream`] that follows the file the save writes, for
/// [`crate::store::SnapshotStore::put`]. The stream waits while it has caught up with the save;
/// the save never waits for the stream.
pub fn tee_channel() -> (Tee, ByteStream) {
    let (tx, rx) = watch::channel(Written::default());
    (Tee { tx }, follow(rx, 0, None))
}

/// The file the save writes from `start`, up to `end` (exclusive) or its end.
fn follow(rx: watch::Receiver<Written>, start: u64, end: Option<u64>) -> ByteStream {
    let stream = futures::stream::unfold((rx, start, false), move |(mut rx, offset, ended)| async move {
        if ended || end.is_some_and(|e| offset >= e) {
            return None;
        }
        loop {
            let w = rx.borrow_and_update().clone();
            if let (Some(file), true) = (&w.file, offset < w.len) {
                // `len` counts what the save handed to its writer; the last of it may still be on
                // its way to the file, so a short read waits for the next step instead of failing.
                let until = end.map_or(w.len, |e| e.min(w.len));
                let (file, len) = (file.clone(), (until - offset).min(FOLLOW_CHUNK) as usize);
                let read = tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    let mut buf = vec![0u8; len];
                    file.read_at(&mut buf, offset).map(|n| {
                        buf.truncate(n);
                        buf
                    })
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                match read {
                    Ok(buf) if !buf.is_empty() => {
                        let n = buf.len() as u64;
                        return Some((Ok(Bytes::from(buf)), (rx, offset + n, false)));
                    }
                    Ok(_) if w.done => {
                        let e = std::io::Error::other("the snapshot file is shorter than what was written to it");
                        return Some((Err(e), (rx, offset, true)));
                    }
                    Ok(_) => {}
                    Err(e) => return Some((Err(e), (rx, offset, true))),
                }
            } else if w.done {
                // Caught up with a whole file. A range that reaches past its end is short (an
                // error), except one starting exactly at the end: the check that nothing follows.
                return match end {
                    Some(_) if !(offset == start && start == w.len) => Some((
                        Err(std::io::Error::other("the snapshot ended before the range asked for")),
                        (rx, offset, true),
                    )),
                    _ => None,
                };
            }
            if rx.changed().await.is_err() {
                // The save ended without finishing; what it finished is read first.
                if rx.borrow().done {
                    continue;
                }
                let e = std::io::Error::other("the snapshot source stopped before the end");
                return Some((Err(e), (rx, offset, true)));
            }
        }
    });
    stream.boxed()
}

impl Tee {
    /// Streams of byte ranges of the file the save writes, each waiting for its bytes.
    pub fn ranges(&self) -> crate::store::Ranges {
        let rx = self.tx.subscribe();
        crate::store::Ranges(std::sync::Arc::new(move |offset, len| follow(rx.clone(), offset, Some(offset + len))))
    }

    /// The file the save writes, read through its own descriptor.
    fn attach(&self, file: std::fs::File) {
        self.tx.send_modify(|w| w.file = Some(std::sync::Arc::new(file)));
    }

    /// The file now holds `len` bytes.
    fn advance(&self, len: u64) {
        self.tx.send_if_modified(|w| {
            let grew = len > w.len;
            w.len = w.len.max(len);
            grew
        });
    }

    /// The file is whole at `len` bytes; the stream ends once it has read them.
    fn finish(self, len: u64) {
        self.tx.send_modify(|w| {
            w.len = len;
            w.done = true;
        });
    }
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

/// What the [`Sealer`] thread is told.
enum SealMsg {
    /// Before the first byte, when compressing: whether the zip needs 64-bit sizes.
    Zip64(bool),
    Data(Bytes),
    /// The snapshot is whole and verified: write the last chunk and fsync.
    End,
}

/// What the writer thread wrote.
struct Sealed {
    len: u64,
    /// Of the encrypted file.
    sha256: Option<[u8; 32]>,
}

/// The file under the age stream: counts and hashes the encrypted bytes as they reach it. age
/// writes whole 64 KiB chunks, so every byte counted in `written` is in the file, where the tee
/// can read it.
struct Tap {
    file: std::fs::File,
    written: Arc<AtomicU64>,
    /// Of the encrypted bytes; a plain file's hash comes from the trailer check.
    sha: Option<sha2::Sha256>,
    /// Where the write-back not yet started begins ([`WRITEBACK_STEP`]).
    kicked: u64,
}

/// Every this many bytes the kernel is asked to start writing the file to disk
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait), so that the fsync at the end
/// finds little left to write instead of the whole snapshot.
const WRITEBACK_STEP: u64 = 16 << 20;

/// Starts the write-back of `len` bytes of `file` from `offset`, without waiting for it.
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else { return };
    // SAFETY: the descriptor is open for as long as `file` is borrowed, and the call reads no
    // memory of ours; a failure only means the final fsync has more to do, so it is ignored.
    #[allow(unsafe_code)]
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE);
    }
}

impl std::io::Write for Tap {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use sha2::Digest;
        let n = self.file.write(buf)?;
        if let Some(sha) = &mut self.sha {
            sha.update(&buf[..n]);
        }
        let total = self.written.fetch_add(n as u64, Ordering::Release) + n as u64;
        if total - self.kicked >= WRITEBACK_STEP {
            start_writeback(&self.file, self.kicked, total - self.kicked);
            self.kicked = total;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Writes the file on a thread of its own (zipping and encrypting it when the save is encrypted),
/// so that the writes, deflate and ChaCha20-Poly1305 run beside the receiving of etcd's stream
/// rather than on the async runtime. etcd's messages
/// are gathered into [`SEAL_BATCH`] batches first: one channel message (and thread wakeup) per
/// 32 KiB message cost more than a tenth of the encryption's own time.
struct Sealer {
    tx: tokio::sync::mpsc::Sender<SealMsg>,
    batch: bytes::BytesMut,
    task: tokio::task::JoinHandle<Result<Sealed>>,
    written: Arc<AtomicU64>,
    /// The age header and payload nonce, written when the stream starts.
    header_len: u64,
}

/// A streamed zip of a snapshot this large or larger (or of unknown size) gets 64-bit sizes: deflate
/// may grow incompressible data a little, and the headers follow it.
const ZIP64_ABOVE: u64 = u32::MAX as u64 - (64 << 20);

/// Bytes of etcd's stream handed to the sealer at a time.
const SEAL_BATCH: usize = 256 << 10;
/// Batches waiting for the sealer: at most this many (2 MiB) are in memory.
const SEAL_QUEUE: usize = 8;

impl Sealer {
    /// Writes `file` through age to `recipients` (zipped first with `zip_entry`), or as it
    /// comes without recipients.
    fn start(
        file: std::fs::File,
        part: &Path,
        recipients: Option<&Recipients>,
        zip_entry: Option<String>,
    ) -> Result<Sealer> {
        use sha2::Digest;
        let written = Arc::new(AtomicU64::new(0));
        let out = match recipients {
            Some(r) => {
                let tap = Tap { file, written: written.clone(), sha: Some(sha2::Sha256::new()), kicked: 0 };
                Out::Age(r.encrypt_to(tap)?)
            }
            None => Out::Plain(Tap { file, written: written.clone(), sha: None, kicked: 0 }),
        };
        let header_len = written.load(Ordering::Acquire);
        let (tx, rx) = tokio::sync::mpsc::channel(SEAL_QUEUE);
        let part = part.to_path_buf();
        let task = tokio::task::spawn_blocking(move || seal(out, zip_entry, rx, &part));
        Ok(Sealer { tx, batch: bytes::BytesMut::new(), task, written, header_len })
    }

    /// Bytes of the encrypted file on disk so far.
    fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    async fn send(&mut self, msg: SealMsg) -> Result<()> {
        if self.tx.send(msg).await.is_ok() {
            return Ok(());
        }
        // The thread stopped: its error says why.
        match (&mut self.task).await {
            Ok(Err(e)) => Err(e),
            Ok(Ok(_)) => Err(Error::Invalid("the encryption thread ended early".into())),
            Err(e) => Err(Error::Invalid(format!("the encryption thread failed: {e}"))),
        }
    }

    /// Adds a piece of etcd's stream, sending a batch when one is full.
    async fn push(&mut self, data: &[u8]) -> Result<()> {
        if self.batch.is_empty() {
            self.batch.reserve(SEAL_BATCH.max(data.len()));
        }
        self.batch.extend_from_slice(data);
        if self.batch.len() >= SEAL_BATCH {
            let full = self.batch.split().freeze();
            self.send(SealMsg::Data(full)).await?;
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<Sealed> {
        if !self.batch.is_empty() {
            let rest = self.batch.split().freeze();
            self.send(SealMsg::Data(rest)).await?;
        }
        self.send(SealMsg::End).await?;
        drop(self.tx);
        self.task.await.map_err(|e| Error::Invalid(format!("the encryption thread failed: {e}")))?
    }
}

/// Where the writer thread sends etcd's stream.
enum Out {
    Plain(Tap),
    Age(age::stream::StreamWriter<Tap>),
    Zip(compress::ZipStream<age::stream::StreamWriter<Tap>>),
}

/// The writer thread: `[[zip →] age →] file`, until [`SealMsg::End`] (then the last chunk and an
/// fsync) or until the save drops its side (then it stops and writes nothing more).
fn seal(
    out: Out,
    zip_entry: Option<String>,
    mut rx: tokio::sync::mpsc::Receiver<SealMsg>,
    part: &Path,
) -> Result<Sealed> {
    use std::io::Write;
    let mut out = Some(out);
    let mut zip_entry = zip_entry;
    let mut start_zip = |out: &mut Option<Out>, zip64: bool| -> std::io::Result<()> {
        if let Some(entry) = zip_entry.take() {
            if let Some(Out::Age(age)) = out.take() {
                *out = Some(Out::Zip(compress::ZipStream::new(age, &entry, zip64)?));
            }
        }
        Ok(())
    };
    while let Some(msg) = rx.blocking_recv() {
        let step = match msg {
            SealMsg::Zip64(zip64) => start_zip(&mut out, zip64),
            SealMsg::Data(b) => {
                // No size was announced: a zip that may be large.
                start_zip(&mut out, true).and_then(|()| match out.as_mut() {
                    Some(Out::Plain(w)) => w.write_all(&b),
                    Some(Out::Age(w)) => w.write_all(&b),
                    Some(Out::Zip(w)) => w.write_all(&b),
                    None => Ok(()),
                })
            }
            SealMsg::End => {
                let _ = start_zip(&mut out, false);
                let tap = match out.take() {
                    Some(Out::Zip(z)) => z.finish().and_then(|a| a.finish()),
                    Some(Out::Age(a)) => a.finish(),
                    Some(Out::Plain(t)) => Ok(t),
                    None => Err(std::io::Error::other("nothing to finish")),
                };
                let tap = tap.map_err(Error::io("write", part))?;
                tap.file.sync_all().map_err(Error::io("fsync", part))?;
                use sha2::Digest;
                let len = tap.written.load(Ordering::Acquire);
                return Ok(Sealed { len, sha256: tap.sha.map(|s| s.finalize().into()) });
            }
        };
        if let Err(cause) = step {
            return Err(Error::Io { action: "write", path: part.to_path_buf(), cause });
        }
    }
    Err(Error::Cancelled)
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
    let mut sealer = Sealer::start(part_file, &part, opts.encryption.as_deref(), entry)?;
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
        let opts = PutOptions {
            content_type: "application/octet-stream".into(),
            user_metadata: user_metadata(&node, token_hash.as_deref()),
            size_hint,
            ranges: Some(ranges),
        };
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
        let opts = PutOptions {
            content_type: "application/octet-stream".into(),
            user_metadata: user_metadata(&node, token_hash.as_deref()),
            size_hint,
            ranges: Some(ranges),
        };
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

#[cfg(test)]
mod tests {
    use std::io::Write;

    use futures::TryStreamExt;

    use super::*;

    async fn read_all(s: ByteStream) -> std::io::Result<Vec<u8>> {
        let chunks: Vec<Bytes> = s.try_collect().await?;
        Ok(chunks.concat())
    }

    /// Ranges of the file a save writes: each waits for its bytes, reads exactly them, and the
    /// range at the end tells a whole file (nothing) from a longer one (bytes) or a short one.
    #[tokio::test]
    async fn ranges_follow_the_file_as_it_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.part");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut f = std::fs::File::create(&path).unwrap();
        let (tee, body) = tee_channel();
        let ranges = tee.ranges();
        tee.attach(std::fs::File::open(&path).unwrap());
        // Asked for before any of their bytes exist.
        let middle = tokio::spawn(read_all((ranges.0)(1_000_000, 1_500_000)));
        let tail = tokio::spawn(read_all((ranges.0)(2_500_000, 500_000)));
        for (i, chunk) in data.chunks(700_000).enumerate() {
            f.write_all(chunk).unwrap();
            tee.advance(((i + 1) * 700_000).min(data.len()) as u64);
            tokio::task::yield_now().await;
        }
        let whole = data.len() as u64;
        tee.finish(whole);
        assert_eq!(middle.await.unwrap().unwrap(), &data[1_000_000..2_500_000]);
        assert_eq!(tail.await.unwrap().unwrap(), &data[2_500_000..]);
        assert_eq!(read_all(body).await.unwrap(), data, "the whole-body follower is unchanged");
        assert!(read_all((ranges.0)(whole, 1)).await.unwrap().is_empty(), "nothing follows a whole file");
        assert!(read_all((ranges.0)(whole - 10, 20)).await.is_err(), "a range past the end is short");
        assert_eq!(read_all((ranges.0)(whole - 10, 10)).await.unwrap(), &data[data.len() - 10..]);
    }

    #[tokio::test]
    async fn a_range_fails_when_the_save_stops_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.part");
        std::fs::write(&path, vec![7u8; 1000]).unwrap();
        let (tee, _body) = tee_channel();
        let ranges = tee.ranges();
        tee.attach(std::fs::File::open(&path).unwrap());
        tee.advance(1000);
        let waiting = tokio::spawn(read_all((ranges.0)(500, 1000)));
        drop(tee);
        assert!(waiting.await.unwrap().is_err(), "a save that ends unfinished fails the range");
    }
}
