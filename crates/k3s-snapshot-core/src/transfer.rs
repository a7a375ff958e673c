//! Moving whole snapshots between a local file and any [`SnapshotStore`]: download with
//! verification, upload with a size hint and progress, and reading a snapshot's metadata object.
//!
//! Nothing here knows about S3; these functions only use the trait.

use std::path::{Path, PathBuf};

use futures::{StreamExt, TryStreamExt};
use tokio::io::AsyncWriteExt;

use crate::integrity::{Digests, TrailerCheck};
use crate::metadata::{MetadataDoc, SnapshotMetadata};
use crate::name;
use crate::progress::{NoProgress, Progress};
use crate::store::{self, ensure_free_space, ensure_private_dir, Placed, PutOptions, ScratchFile, SnapshotStore};
use crate::{Error, Result};

/// Downloads snapshot `file` from `store` into `into_dir/file` (mode 0600), through a scratch
/// file ([`download_to_scratch`]). With `expected`, the size and SHA-256 are checked before the
/// file takes its name: on a mismatch (or any failure) nothing is left in `into_dir`.
/// An existing `into_dir/file` is never replaced: if it holds the same bytes it is used, and if
/// it is a different file the download is refused and that file stays as it is.
pub async fn download_snapshot(
    store: &dyn SnapshotStore,
    file: &str,
    into_dir: &Path,
    expected: Option<&SnapshotMetadata>,
) -> Result<PathBuf> {
    download_snapshot_with_progress(store, file, into_dir, expected, &NoProgress).await
}

/// [`download_snapshot`] reporting progress.
pub async fn download_snapshot_with_progress(
    store: &dyn SnapshotStore,
    file: &str,
    into_dir: &Path,
    expected: Option<&SnapshotMetadata>,
    progress: &dyn Progress,
) -> Result<PathBuf> {
    let scratch = download_to_scratch(store, file, into_dir, expected, progress, false).await?;
    match scratch.place()? {
        Placed::New(p) | Placed::Identical(p) => Ok(p),
        Placed::Kept { existing, .. } => Err(Error::Invalid(format!(
            "{} already exists and differs from {}; it was left as it is: move it away, or download into another directory",
            existing.display(),
            store.location(file)
        ))),
    }
}

/// Downloads snapshot `file` from `store` into a scratch file in `into_dir` (target
/// `into_dir/file`, opened with `O_EXCL|O_NOFOLLOW`, mode 0600) and returns it, fsynced, for the
/// caller to verify further and then [`ScratchFile::place`]. Refused before any byte is written
/// when the store's size does not match `expected` or would not leave
/// [`crate::store::FREE_SPACE_MARGIN`] free; refused when the store sends more or fewer bytes
/// than it announced, or bytes whose SHA-256 is not `expected`'s. On any failure the scratch file
/// is removed. `into_dir` is created 0700, or checked ([`ensure_private_dir`]).
///
/// The bytes are hashed as they land, once: that gives the object's SHA-256 and, for an etcd
/// snapshot, the check of its trailer, recorded on the scratch file
/// ([`ScratchFile::verified_trailer`]) so that a restore does not hash the file again.
///
/// With `image_copy`, a download in parts of what is shaped like an etcd snapshot also writes
/// its image (all but the trailer) into a second scratch file from the same buffers, and the hash
/// reads the image back from that copy: a restore then takes the copy as the member's db
/// ([`ScratchFile::take_image_copy`]) instead of copying the file after the download.
pub async fn download_to_scratch(
    store: &dyn SnapshotStore,
    file: &str,
    into_dir: &Path,
    expected: Option<&SnapshotMetadata>,
    progress: &dyn Progress,
    image_copy: bool,
) -> Result<ScratchFile> {
    name::validate_file_name(file)?;
    ensure_private_dir(into_dir, "snapshot dir")?;
    let path = into_dir.join(file);
    if let Some((info, parts)) = store.get_parts(file, PARTS, PART_MIN, PARALLEL_MIN).await? {
        check_expected_size(store, file, expected, info.size)?;
        ensure_free_space(into_dir, info.size, &store.location(file))?;
        let scratch = ScratchFile::create(&path)?;
        progress.start(file, Some(info.size));
        let n = parts.len();
        let mut scratch = scratch;
        let image_len = info.size.saturating_sub(crate::integrity::TRAILER_LEN as u64);
        let copy = if image_copy && info.size >= 1024 && image_len % 512 == 0 {
            Some(scratch.create_image_copy()?)
        } else {
            None
        };
        let into = copy.as_ref().map(|c| (c.as_file(), image_len));
        let digests = fetch_parts(&store.location(file), &scratch, info.size, parts, into, progress).await?;
        progress.finish();
        scratch.sync()?;
        if let Some(c) = &copy {
            c.as_file().sync_all().map_err(Error::io("sync", c.path()))?;
        }
        check_expected_sha(store, file, expected, &digests)?;
        scratch.set_verified_trailer(digests.verified_trailer);
        if let Some(c) = copy {
            scratch.set_image_copy(c);
        }
        tracing::info!(snapshot = %file, from = %store.location(file), to = %scratch.path().display(), size = info.size, parts = n, "downloaded snapshot");
        return Ok(scratch);
    }
    // A store without parts is read as one stream, without an image copy.
    let (info, mut body) = store.get(file).await?;
    check_expected_size(store, file, expected, info.size)?;
    ensure_free_space(into_dir, info.size, &store.location(file))?;
    let mut scratch = ScratchFile::create(&path)?;
    let mut w = tokio::io::BufWriter::with_capacity(1 << 20, scratch.tokio_file()?);
    let mut sha = TrailerCheck::new();
    let mut n = 0u64;
    progress.start(file, Some(info.size));
    while let Some(chunk) = body.next().await {
        // The store's stream errors already name the store, the key and the cause.
        let chunk = chunk.map_err(|e| Error::Invalid(e.to_string()))?;
        n += chunk.len() as u64;
        if n > info.size {
            return Err(Error::Invalid(format!(
                "{} sent more than the {} bytes it announced; refusing it, nothing was kept",
                store.location(file),
                info.size
            )));
        }
        sha.update(&chunk);
        w.write_all(&chunk).await.map_err(Error::io("write", scratch.path()))?;
        progress.advance(chunk.len() as u64);
    }
    progress.finish();
    drop(body);
    w.flush().await.map_err(Error::io("write", scratch.path()))?;
    drop(w);
    scratch.sync()?;
    if n != info.size {
        return Err(Error::Truncated {
            name: store.location(file),
            detail: format!("received {n} of {} bytes", info.size),
        });
    }
    let digests = sha.digests();
    check_expected_sha(store, file, expected, &digests)?;
    scratch.set_verified_trailer(digests.verified_trailer);
    tracing::info!(snapshot = %file, from = %store.location(file), to = %scratch.path().display(), size = n, "downloaded snapshot");
    Ok(scratch)
}

fn check_expected_sha(
    store: &dyn SnapshotStore,
    file: &str,
    expected: Option<&SnapshotMetadata>,
    digests: &Digests,
) -> Result<()> {
    if let Some(m) = expected {
        let actual = hex::encode(digests.stream);
        if !actual.eq_ignore_ascii_case(&m.sha256) {
            return Err(Error::Checksum { name: store.location(file), expected: m.sha256.clone(), actual });
        }
    }
    Ok(())
}

fn check_expected_size(
    store: &dyn SnapshotStore,
    file: &str,
    expected: Option<&SnapshotMetadata>,
    size: u64,
) -> Result<()> {
    match expected {
        Some(m) if m.size != size => Err(Error::Truncated {
            name: store.location(file),
            detail: format!("the store holds {size} bytes but its metadata says {}", m.size),
        }),
        _ => Ok(()),
    }
}

/// Objects at least this big are fetched in parts at once, where the store can
/// ([`SnapshotStore::get_parts`]): one GET stream is bound by what one connection (and one request
/// handler of the server) carries; several fill the link and the server's cores.
pub const PARALLEL_MIN: u64 = 64 << 20;
/// No part is smaller: each is a request, and some servers pay a pass over the whole object per
/// request (s3s-fs computes the object's MD5 for each GET), so parts are few and large.
const PART_MIN: u64 = 32 << 20;
/// Parts at once.
pub const PARTS: usize = 4;
/// Every this many bytes of a part, the kernel is asked to start writing them to disk.
const WRITEBACK_STEP: u64 = 16 << 20;

/// Bytes of a part gathered before they are written: the network hands over a few KiB at a time
/// (s3s-fs sends 4 KiB frames), and a write, a wake-up of the hasher and a progress tick for
/// each of them cost more than the bytes. Memory: this much per part in flight.
const LAND_STEP: usize = 256 << 10;

/// How far each part has landed in the file, for the hasher that follows them in order.
struct Landed {
    state: std::sync::Mutex<(Vec<u64>, bool)>,
    cond: std::sync::Condvar,
}

impl Landed {
    fn advance(&self, part: usize, upto: u64) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0[part] = upto;
        self.cond.notify_all();
    }
    fn fail(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.cond.notify_all();
    }
    /// Waits until `part` has landed past `at`; returns how far, or `None` when the download
    /// failed first.
    fn wait_past(&self, part: usize, at: u64) -> Option<u64> {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if g.0[part] > at {
                return Some(g.0[part]);
            }
            if g.1 {
                return None;
            }
            g = self.cond.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Fetches the object's parts at once, each written at its offset in `scratch` as it arrives
/// (memory stays [`LAND_STEP`] per part and a few network buffers). A thread reads the bytes back
/// in order as they land (from the page cache) and hashes them ([`TrailerCheck::digests`]), so
/// that when the last part ends, the object's SHA-256 and the snapshot's trailer check are known.
/// With `copy` (a file and the image length), the first `image_len` bytes are also written there,
/// and the hash reads them back from it, so that the trailer check vouches for the copy.
/// A part that fails, or sends more or fewer bytes than it covers, fails the download.
async fn fetch_parts(
    location: &str,
    scratch: &ScratchFile,
    size: u64,
    parts: Vec<store::Part>,
    copy: Option<(&std::fs::File, u64)>,
    progress: &dyn Progress,
) -> Result<Digests> {
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;
    let covered: u64 = parts.iter().map(|p| p.len).sum();
    if covered != size || parts.iter().zip(parts.iter().skip(1)).any(|(a, b)| a.offset + a.len != b.offset) {
        return Err(Error::Invalid(format!("{location}: the store's parts do not cover the object; refusing them")));
    }
    let bounds: Vec<(u64, u64)> = parts.iter().map(|p| (p.offset, p.offset + p.len)).collect();
    let path = scratch.path().to_path_buf();
    let file = Arc::new(scratch.file().try_clone().map_err(Error::io("open", &path))?);
    file.set_len(size).map_err(Error::io("write", &path))?;
    let (copy, image_len) = match copy {
        Some((c, n)) => {
            let c = c.try_clone().map_err(Error::io("open", &path))?;
            c.set_len(n).map_err(Error::io("write", &path))?;
            (Some(Arc::new(c)), n)
        }
        None => (None, size),
    };
    let landed = Arc::new(Landed {
        state: std::sync::Mutex::new((bounds.iter().map(|b| b.0).collect(), false)),
        cond: Default::default(),
    });
    let hasher = {
        let (file, copy, landed, path, bounds) =
            (file.clone(), copy.clone(), landed.clone(), path.clone(), bounds.clone());
        tokio::task::spawn_blocking(move || -> Result<Option<Digests>> {
            let mut sha = TrailerCheck::new();
            let mut buf = vec![0u8; 1 << 20];
            for (i, &(start, end)) in bounds.iter().enumerate() {
                let mut at = start;
                while at < end {
                    let Some(upto) = landed.wait_past(i, at) else { return Ok(None) };
                    while at < upto {
                        // The image from the copy when there is one, the trailer from the file.
                        let (src, stop) = match &copy {
                            Some(c) if at < image_len => (c.as_ref(), upto.min(image_len)),
                            _ => (file.as_ref(), upto),
                        };
                        let n = ((stop - at) as usize).min(buf.len());
                        src.read_exact_at(&mut buf[..n], at).map_err(Error::io("read", &path))?;
                        sha.update(&buf[..n]);
                        at += n as u64;
                    }
                }
            }
            Ok(Some(sha.digests()))
        })
    };
    let fetch_one = |(i, part): (usize, store::Part)| {
        let (file, copy, landed, path) = (file.clone(), copy.clone(), landed.clone(), path.clone());
        async move {
            let (start, end) = (part.offset, part.offset + part.len);
            let mut body = part.body;
            // `at`: bytes received; `written`: bytes in the file; `kicked`: write-back started.
            let (mut at, mut written, mut kicked) = (start, start, start);
            let mut pending: Vec<u8> = Vec::with_capacity(LAND_STEP);
            // Writes `bytes` at `at` into the file, and the part of them below the image's end
            // into the copy.
            let put = |bytes: &[u8], at: u64| -> Result<()> {
                file.write_all_at(bytes, at).map_err(Error::io("write", &path))?;
                if let Some(c) = &copy {
                    let n = image_len.saturating_sub(at).min(bytes.len() as u64) as usize;
                    c.write_all_at(&bytes[..n], at).map_err(Error::io("write", &path))?;
                }
                Ok(())
            };
            let land = |pending: &mut Vec<u8>, written: &mut u64| -> Result<()> {
                put(pending, *written)?;
                *written += pending.len() as u64;
                progress.advance(pending.len() as u64);
                pending.clear();
                landed.advance(i, *written);
                Ok(())
            };
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| Error::Invalid(e.to_string()))?;
                if at + chunk.len() as u64 > end {
                    return Err(Error::Invalid(format!(
                        "{location} sent more than the bytes {start}-{} asked for; refusing it, nothing was kept",
                        end.saturating_sub(1)
                    )));
                }
                at += chunk.len() as u64;
                // `pending` never grows past its capacity (a doubled buffer per part).
                if !pending.is_empty() && pending.len() + chunk.len() > LAND_STEP {
                    land(&mut pending, &mut written)?;
                }
                if pending.is_empty() && chunk.len() >= LAND_STEP {
                    // A large chunk goes straight to the file.
                    put(&chunk, written)?;
                    written += chunk.len() as u64;
                    progress.advance(chunk.len() as u64);
                    landed.advance(i, written);
                } else {
                    pending.extend_from_slice(&chunk);
                    if pending.len() >= LAND_STEP {
                        land(&mut pending, &mut written)?;
                    }
                }
                if written - kicked >= WRITEBACK_STEP {
                    start_writeback(&file, kicked, written - kicked);
                    if let Some(c) = &copy {
                        start_writeback(c, kicked, written - kicked);
                    }
                    kicked = written;
                }
            }
            if !pending.is_empty() {
                land(&mut pending, &mut written)?;
            }
            if at != end {
                return Err(Error::Truncated {
                    name: location.to_string(),
                    detail: format!("received {} of the bytes {start}-{}", at - start, end.saturating_sub(1)),
                });
            }
            Ok::<(), Error>(())
        }
    };
    // All parts at once; the first failure stops the rest.
    let n = parts.len();
    let fetched = futures::stream::iter(parts.into_iter().enumerate().map(Ok::<_, Error>))
        .try_for_each_concurrent(n, fetch_one)
        .await;
    if fetched.is_err() {
        landed.fail();
    }
    let digests = hasher.await.map_err(|e| Error::Invalid(format!("the download's hash task failed: {e}")))??;
    fetched?;
    digests.ok_or_else(|| Error::Invalid(format!("{location}: the download stopped before its end")))
}

/// Downloads snapshot `file` with what its metadata document lets us check: the size and SHA-256
/// of ours. With k3s's document (its extra metadata) or none, no digest is known: the download is
/// taken as it comes, and the snapshot's own SHA-256 trailer is what vouches for it (a restore and
/// `status` check it before using the file). Returns the path and the document.
pub async fn download_with_metadata(
    store: &dyn SnapshotStore,
    file: &str,
    into_dir: &Path,
    progress: &dyn Progress,
) -> Result<(PathBuf, Option<MetadataDoc>)> {
    name::validate_file_name(file)?;
    let doc = fetch_metadata(store, file).await?;
    let expected = doc.as_ref().and_then(MetadataDoc::ours);
    if expected.is_none() {
        let why = if doc.is_some() { "its metadata is k3s's extra metadata" } else { "it has no metadata" };
        tracing::info!(snapshot = %file, store = %store.describe(), "{why}, so no size or sha256 is known for it; its sha256 trailer is checked instead");
    }
    let path = download_snapshot_with_progress(store, file, into_dir, expected, progress).await?;
    Ok((path, doc))
}

/// Times [`upload_file`] sends a file whose upload failed with a retryable error.
const FILE_UPLOAD_ATTEMPTS: u32 = 3;

/// Uploads a local file to `store` under `key`, with its size as the hint (so that parts are
/// large enough, or the store sends it as one request) and progress reporting. A retryable
/// failure sends the file again, up to three times in all: a store that streams the body in one
/// request cannot retry it itself. Returns the bytes stored.
pub async fn upload_file(
    store: &dyn SnapshotStore,
    key: &str,
    path: &Path,
    opts: PutOptions,
    progress: &dyn Progress,
) -> Result<u64> {
    let mut delay = std::time::Duration::from_millis(500);
    let mut attempt = 1;
    loop {
        match upload_file_once(store, key, path, opts.clone(), progress).await {
            Err(e) if e.is_retryable() && attempt < FILE_UPLOAD_ATTEMPTS => {
                tracing::warn!(key, attempt, store = %store.describe(), error = %e, "upload failed; sending the file again in {delay:?}");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            r => return r,
        }
    }
}

async fn upload_file_once(
    store: &dyn SnapshotStore,
    key: &str,
    path: &Path,
    mut opts: PutOptions,
    progress: &dyn Progress,
) -> Result<u64> {
    let f = tokio::fs::File::open(path).await.map_err(Error::io("open", path))?;
    let size = f.metadata().await.map_err(Error::io("stat", path))?.len();
    opts.size_hint = Some(size);
    let label = key.to_string();
    progress.start(&label, Some(size));
    // The stream must be 'static; progress is a borrowed trait object, so count through a channel.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let body = tokio_util::io::ReaderStream::with_capacity(f, 1 << 20)
        .inspect(move |c| {
            if let Ok(c) = c {
                let _ = tx.send(c.len() as u64);
            }
        })
        .boxed();
    let put = store.put(key, body, opts);
    tokio::pin!(put);
    let res = loop {
        tokio::select! {
            r = &mut put => break r,
            Some(n) = rx.recv() => progress.advance(n),
        }
    };
    while let Ok(n) = rx.try_recv() {
        progress.advance(n);
    }
    progress.finish();
    let n = res?;
    if n != size {
        return Err(Error::Truncated {
            name: path.display().to_string(),
            detail: format!("uploaded {n} bytes but the file has {size}; it changed while uploading"),
        });
    }
    Ok(n)
}

/// Reads `.metadata/<file>` from the store; `None` when there is none. A k3s document (its extra
/// metadata) is [`MetadataDoc::K3s`]: no size or SHA-256 is known from it.
pub async fn fetch_metadata(store: &dyn SnapshotStore, file: &str) -> Result<Option<MetadataDoc>> {
    let key = SnapshotMetadata::key_for(file);
    let (info, mut body) = match store.get(&key).await {
        Ok(v) => v,
        Err(Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    const MAX_METADATA: u64 = 1 << 20;
    if info.size > MAX_METADATA {
        return Err(Error::Metadata {
            path: PathBuf::from(store.location(&key)),
            detail: format!("{} bytes is too large for snapshot metadata", info.size),
        });
    }
    let mut buf = Vec::with_capacity(info.size as usize);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Error::Invalid(e.to_string()))?;
        buf.extend_from_slice(&chunk);
        if buf.len() as u64 > MAX_METADATA {
            return Err(Error::Metadata {
                path: PathBuf::from(store.location(&key)),
                detail: "too large for snapshot metadata".into(),
            });
        }
    }
    MetadataDoc::parse(&buf).map(Some).map_err(|e| Error::Metadata {
        path: PathBuf::from(store.location(&key)),
        detail: format!("{e}; repair or remove that document"),
    })
}

/// Starts the write-back of `len` bytes of `file` from `offset`, without waiting for it.
pub(crate) fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else { return };
    // SAFETY: the descriptor is open for as long as `file` is borrowed, and the call reads no
    // memory of ours; a failure only means the final fsync has more to do, so it is ignored.
    #[allow(unsafe_code)]
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;
    use bytes::Bytes;
    use chrono::Utc;
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::PermissionsExt;

    fn meta(file: &str, data: &[u8]) -> SnapshotMetadata {
        SnapshotMetadata {
            name: file.into(),
            node_name: "n1".into(),
            size: data.len() as u64,
            created_at: Utc::now(),
            compressed: false,
            sha256: hex::encode(Sha256::digest(data)),
            etcd_revision: None,
            etcd_version: None,
            total_key: None,
            token_hash: None,
            encrypted: false,
            recipients: Vec::new(),
            cluster_id: None,
            live_hash: None,
            verified: None,
            extra: Default::default(),
        }
    }

    async fn source_with(file: &str, data: &'static [u8]) -> (tempfile::TempDir, LocalStore) {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::new(tmp.path().join("remote/snapshots"));
        store.ensure_dirs().unwrap();
        let body = futures::stream::iter(vec![Ok(Bytes::from_static(data))]).boxed();
        store.put(file, body, PutOptions::default()).await.unwrap();
        (tmp, store)
    }

    #[tokio::test]
    async fn download_verifies_and_is_private() {
        let (tmp, store) = source_with("s-n1-1", b"snapshot bytes").await;
        let dest = tmp.path().join("local");
        let m = meta("s-n1-1", b"snapshot bytes");
        let p = download_snapshot(&store, "s-n1-1", &dest, Some(&m)).await.unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"snapshot bytes");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[tokio::test]
    async fn checksum_mismatch_leaves_nothing() {
        let (tmp, store) = source_with("s-n1-1", b"snapshot bytes").await;
        let dest = tmp.path().join("local");
        let m = meta("s-n1-1", b"snapshot bytez");
        let err = download_snapshot(&store, "s-n1-1", &dest, Some(&m)).await.unwrap_err();
        assert!(matches!(err, Error::Checksum { .. }), "{err}");
        assert_eq!(std::fs::read_dir(&dest).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn size_mismatch_is_refused_before_downloading() {
        let (tmp, store) = source_with("s-n1-1", b"snapshot bytes").await;
        let dest = tmp.path().join("local");
        let mut m = meta("s-n1-1", b"snapshot bytes");
        m.size += 1;
        let err = download_snapshot(&store, "s-n1-1", &dest, Some(&m)).await.unwrap_err();
        assert!(matches!(err, Error::Truncated { .. }), "{err}");
        assert_eq!(std::fs::read_dir(&dest).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn missing_snapshot_is_not_found_and_path_names_are_refused() {
        let (tmp, store) = source_with("s-n1-1", b"x").await;
        let dest = tmp.path().join("local");
        let err = download_snapshot(&store, "s-n1-2", &dest, None).await.unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
        assert!(download_snapshot(&store, "../s-n1-1", &dest, None).await.is_err());
    }

    #[tokio::test]
    async fn upload_file_reports_progress_and_metadata_round_trips() {
        use std::sync::atomic::{AtomicU64, Ordering};
        struct Count(AtomicU64);
        impl Progress for Count {
            fn advance(&self, n: u64) {
                self.0.fetch_add(n, Ordering::Relaxed);
            }
        }
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::new(tmp.path().join("remote/snapshots"));
        let src = tmp.path().join("s-n1-5");
        std::fs::write(&src, vec![7u8; 3 << 20]).unwrap();
        let count = Count(AtomicU64::new(0));
        let n = upload_file(&store, "s-n1-5", &src, PutOptions::default(), &count).await.unwrap();
        assert_eq!(n, 3 << 20);
        assert_eq!(count.0.load(Ordering::Relaxed), 3 << 20);

        assert!(fetch_metadata(&store, "s-n1-5").await.unwrap().is_none());
        let m = meta("s-n1-5", b"abc");
        let body = futures::stream::iter(vec![Ok(Bytes::from(m.to_json()))]).boxed();
        store.put(&SnapshotMetadata::key_for("s-n1-5"), body, PutOptions::default()).await.unwrap();
        assert_eq!(fetch_metadata(&store, "s-n1-5").await.unwrap(), Some(MetadataDoc::Ours(m)));
    }
}
