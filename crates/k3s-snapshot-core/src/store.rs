//! Where snapshots live. One small trait, [`SnapshotStore`], implemented here for a local
//! directory ([`LocalStore`]) and in the `s3-backend` crate for S3.
//!
//! Keys are relative: `<file>` for a snapshot and `.metadata/<file>` for its metadata. A local
//! store maps them to the snapshot dir and its sibling `.metadata` dir (k3s's layout); S3 maps them
//! under the folder.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::{BoxStream, StreamExt};
use tokio::io::AsyncWriteExt;

use crate::metadata::METADATA_DIR;
use crate::{name, Error, Result};

/// A stream of bytes. An `Err` item means the source failed: a store must then leave nothing
/// under the key it was writing.
pub type ByteStream = BoxStream<'static, std::io::Result<Bytes>>;

/// One stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub modified: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Default)]
pub struct PutOptions {
    pub content_type: String,
    /// Stored as user metadata where the store supports it (S3 `x-amz-meta-*`).
    pub user_metadata: Vec<(String, String)>,
    /// Total size when known in advance (uploads of an existing file).
    pub size_hint: Option<u64>,
}

/// A place that holds snapshots and their metadata.
///
/// Guarantees every implementation must keep (checked by the conformance suite in `tests`):
/// - `put` is atomic: no reader sees a partial object, and when the body stream yields an error
///   or the call fails, nothing is left under the key (an earlier object there stays as it was).
/// - `list(prefix)` yields every key that starts with `prefix` and has no `/` after it, each once,
///   without holding the whole listing in memory where the store pages (S3).
/// - `delete` of a key that is not there is not an error.
#[async_trait]
pub trait SnapshotStore: Send + Sync {
    /// The store as a URL for messages: `file:///var/lib/...` or `s3://bucket/folder`.
    fn describe(&self) -> String;
    /// Where a key lives, as shown by `ls`: `file:///abs/path` or `s3://bucket/folder/key`.
    fn location(&self, key: &str) -> String;
    /// Stores the body under the key and returns the number of bytes stored.
    async fn put(&self, key: &str, body: ByteStream, opts: PutOptions) -> Result<u64>;
    /// Reads an object as a stream.
    async fn get(&self, key: &str) -> Result<(ObjectInfo, ByteStream)>;
    /// Size and time of an object, `None` when it does not exist.
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>>;
    /// Objects whose key starts with `prefix` and has no further `/`.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, Result<ObjectInfo>>;
    /// Deletes objects; missing ones are ignored.
    async fn delete(&self, keys: &[String]) -> Result<()>;
    /// The user metadata stored with an object (S3 `x-amz-meta-*`, without the prefix), empty
    /// where the store keeps none (local files) or the object is not there.
    async fn user_metadata(&self, key: &str) -> Result<Vec<(String, String)>> {
        let _ = key;
        Ok(Vec::new())
    }
}

/// Creates a directory and its missing parents with mode 0700.
pub fn create_private_dir(path: &Path) -> Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path).map_err(Error::io("create directory", path))
}

/// fsyncs a directory so that a rename inside it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(Error::io("fsync directory", dir))
}

/// Renames `from` to `to` and makes the rename durable.
pub fn durable_rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(Error::io("rename into place", to))?;
    sync_dir(to.parent().unwrap_or(Path::new(".")))
}

/// Writes a small file atomically with mode 0600 (`.part`, fsync, rename, dir fsync).
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let part = part_path(path);
    let res = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&part)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&part);
        return Err(Error::Io { action: "write", path: path.into(), cause: e });
    }
    durable_rename(&part, path)
}

/// `<path>.part`
pub fn part_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(name::PART_SUFFIX);
    PathBuf::from(s)
}

/// Creates (or truncates) `part` with mode 0600 for writing, with a guard that removes it unless
/// disarmed after the rename into place.
pub async fn create_part(part: &Path) -> Result<(tokio::fs::File, RemoveOnDrop)> {
    let guard = RemoveOnDrop::new(part.to_path_buf());
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(part)
        .await
        .map_err(Error::io("create", part))?;
    Ok((file, guard))
}

/// Removes a file when dropped, unless disarmed: the `.part` of an interrupted write.
pub struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    pub fn new(path: PathBuf) -> Self {
        RemoveOnDrop(Some(path))
    }
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Snapshots in a local directory, metadata in a sibling `.metadata` directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    dir: PathBuf,
    metadata_dir: PathBuf,
}

impl LocalStore {
    /// A store over `dir`, with metadata in `dir/../.metadata` as k3s lays it out.
    /// Relative paths are made absolute so that locations are stable.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        let metadata_dir = dir.parent().unwrap_or(Path::new("/")).join(METADATA_DIR);
        LocalStore { dir, metadata_dir }
    }

    pub fn with_metadata_dir(mut self, metadata_dir: impl Into<PathBuf>) -> Self {
        self.metadata_dir = metadata_dir.into();
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn metadata_dir(&self) -> &Path {
        &self.metadata_dir
    }

    /// Path of a key, refusing anything that could leave the store.
    pub fn path_of(&self, key: &str) -> Result<PathBuf> {
        match key.strip_prefix(METADATA_DIR).and_then(|r| r.strip_prefix('/')) {
            Some(file) => {
                name::validate_file_name(file)?;
                Ok(self.metadata_dir.join(file))
            }
            None => {
                name::validate_file_name(key)?;
                Ok(self.dir.join(key))
            }
        }
    }

    /// Creates the snapshot and metadata dirs (0700) and checks the snapshot dir is writable.
    pub fn ensure_dirs(&self) -> Result<()> {
        create_private_dir(&self.dir)?;
        create_private_dir(&self.metadata_dir)?;
        nix_access_w(&self.dir)
    }

    /// Removes `.part` files (of snapshots and metadata) not written to for `older_than`: what a
    /// killed save or download left. A write in progress touches its file continuously, so it is
    /// never taken for stale. Returns the removed paths.
    pub fn remove_stale_parts(&self, older_than: std::time::Duration) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        for dir in [&self.dir, &self.metadata_dir] {
            let Ok(rd) = std::fs::read_dir(dir) else { continue };
            for e in rd.flatten() {
                let path = e.path();
                if !e.file_name().to_string_lossy().ends_with(name::PART_SUFFIX) {
                    continue;
                }
                let stale = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= older_than);
                if stale && std::fs::remove_file(&path).is_ok() {
                    tracing::info!(path = %path.display(), "removed a partial file left by an interrupted save or download");
                    removed.push(path);
                }
            }
        }
        removed
    }

    fn list_dir(dir: &Path, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let rd = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::Io { action: "list", path: dir.into(), cause: e }),
        };
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(Error::io("list", dir))?;
            let Ok(file) = entry.file_name().into_string() else { continue };
            if !file.starts_with(prefix) || file.ends_with(name::PART_SUFFIX) {
                continue;
            }
            let Ok(md) = entry.metadata() else { continue };
            if !md.is_file() {
                continue;
            }
            let modified = md.modified().ok().map(DateTime::<Utc>::from);
            out.push(ObjectInfo { key: file, size: md.len(), modified });
        }
        Ok(out)
    }
}

fn nix_access_w(dir: &Path) -> Result<()> {
    use nix::unistd::{access, AccessFlags};
    // access(2) answers for the real uid, which is what writing will use.
    access(dir, AccessFlags::W_OK | AccessFlags::X_OK).map_err(|errno| Error::Io {
        action: "write to snapshot dir",
        path: dir.into(),
        cause: std::io::Error::from(errno),
    })
}

#[async_trait]
impl SnapshotStore for LocalStore {
    fn describe(&self) -> String {
        format!("file://{}", self.dir.display())
    }

    fn location(&self, key: &str) -> String {
        match self.path_of(key) {
            Ok(p) => format!("file://{}", p.display()),
            Err(_) => format!("file://{}/{key}", self.dir.display()),
        }
    }

    async fn put(&self, key: &str, mut body: ByteStream, _opts: PutOptions) -> Result<u64> {
        let path = self.path_of(key)?;
        if let Some(parent) = path.parent() {
            create_private_dir(parent)?;
        }
        let part = part_path(&path);
        let (file, guard) = create_part(&part).await?;
        let mut w = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut n = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(Error::io("read the source of", &path))?;
            n += chunk.len() as u64;
            w.write_all(&chunk).await.map_err(Error::io("write", &part))?;
        }
        w.flush().await.map_err(Error::io("write", &part))?;
        let f = w.into_inner();
        f.sync_all().await.map_err(Error::io("fsync", &part))?;
        drop(f);
        durable_rename(&part, &path)?;
        guard.disarm();
        Ok(n)
    }

    async fn get(&self, key: &str) -> Result<(ObjectInfo, ByteStream)> {
        let path = self.path_of(key)?;
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound { name: key.into(), location: self.describe() })
            }
            Err(e) => return Err(Error::Io { action: "open", path, cause: e }),
        };
        let md = file.metadata().await.map_err(Error::io("stat", &path))?;
        let info = ObjectInfo { key: key.into(), size: md.len(), modified: md.modified().ok().map(Into::into) };
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20);
        Ok((info, stream.boxed()))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let path = self.path_of(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(md) if md.is_file() => {
                Ok(Some(ObjectInfo { key: key.into(), size: md.len(), modified: md.modified().ok().map(Into::into) }))
            }
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Io { action: "stat", path, cause: e }),
        }
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, Result<ObjectInfo>> {
        let (dir, file_prefix, key_prefix) = match prefix.strip_prefix(METADATA_DIR).and_then(|r| r.strip_prefix('/')) {
            Some(rest) => (self.metadata_dir.clone(), rest.to_string(), format!("{METADATA_DIR}/")),
            None => (self.dir.clone(), prefix.to_string(), String::new()),
        };
        let fut = async move {
            tokio::task::spawn_blocking(move || LocalStore::list_dir(&dir, &file_prefix))
                .await
                .map_err(|e| Error::Invalid(format!("listing task failed: {e}")))?
        };
        futures::stream::once(fut)
            .flat_map(move |res| {
                let items: Vec<Result<ObjectInfo>> = match res {
                    Ok(v) => v
                        .into_iter()
                        .map(|mut o| {
                            o.key = format!("{key_prefix}{}", o.key);
                            Ok(o)
                        })
                        .collect(),
                    Err(e) => vec![Err(e)],
                };
                futures::stream::iter(items)
            })
            .boxed()
    }

    async fn delete(&self, keys: &[String]) -> Result<()> {
        let mut dirs = std::collections::BTreeSet::new();
        for key in keys {
            let path = self.path_of(key)?;
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {
                    if let Some(p) = path.parent() {
                        dirs.insert(p.to_path_buf());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::Io { action: "delete", path, cause: e }),
            }
        }
        for d in dirs {
            sync_dir(&d)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn body(parts: Vec<std::io::Result<Bytes>>) -> ByteStream {
        futures::stream::iter(parts).boxed()
    }

    #[tokio::test]
    async fn put_is_atomic_and_private() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::new(tmp.path().join("db/snapshots"));
        store.ensure_dirs().unwrap();
        let n = store
            .put(
                "a-n-1",
                body(vec![Ok(Bytes::from_static(b"hello ")), Ok(Bytes::from_static(b"world"))]),
                PutOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(n, 11);
        let p = store.dir().join("a-n-1");
        assert_eq!(std::fs::read(&p).unwrap(), b"hello world");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(store.dir()).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(store.metadata_dir(), tmp.path().join("db/.metadata"));
    }

    #[tokio::test]
    async fn failed_body_leaves_nothing_and_keeps_the_old_object() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::new(tmp.path().join("snapshots"));
        store.put("k-n-1", body(vec![Ok(Bytes::from_static(b"old"))]), PutOptions::default()).await.unwrap();
        let err = store
            .put(
                "k-n-1",
                body(vec![Ok(Bytes::from_static(b"new")), Err(std::io::Error::other("boom"))]),
                PutOptions::default(),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
        assert_eq!(std::fs::read(store.dir().join("k-n-1")).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(store.dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn stale_part_files_are_removed_fresh_ones_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::new(tmp.path().join("snapshots"));
        store.ensure_dirs().unwrap();
        std::fs::write(store.dir().join("s-n-1.part"), b"x").unwrap();
        std::fs::write(store.metadata_dir().join("s-n-1.part"), b"x").unwrap();
        std::fs::write(store.dir().join("s-n-2"), b"x").unwrap();
        assert!(store.remove_stale_parts(std::time::Duration::from_secs(3600)).is_empty(), "fresh parts stay");
        let removed = store.remove_stale_parts(std::time::Duration::ZERO);
        assert_eq!(removed.len(), 2);
        assert!(store.dir().join("s-n-2").exists(), "snapshots are never touched");
    }

    #[tokio::test]
    async fn keys_cannot_escape_the_store() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::new(tmp.path().join("snapshots"));
        for bad in ["../x", ".metadata/../x", "a/b", ".metadata/"] {
            assert!(store.path_of(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn list_skips_part_files_and_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::new(tmp.path().join("snapshots"));
        store.ensure_dirs().unwrap();
        std::fs::write(store.dir().join("s-n-1"), b"x").unwrap();
        std::fs::write(store.dir().join("s-n-2.part"), b"x").unwrap();
        std::fs::create_dir(store.dir().join("s-dir")).unwrap();
        let keys: Vec<String> = store.list("s-").map(|o| o.unwrap().key).collect().await;
        assert_eq!(keys, vec!["s-n-1".to_string()]);
    }
}
