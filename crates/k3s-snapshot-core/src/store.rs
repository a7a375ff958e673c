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

/// Why a store will not delete an object yet: a write-once hold (S3 Object Lock) that the
/// store's own credentials cannot lift. See [`SnapshotStore::hold`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// What holds it, for messages: `object lock (COMPLIANCE)`, `legal hold`.
    pub what: String,
    /// Until when; `None`: until someone lifts it (a legal hold).
    pub until: Option<DateTime<Utc>>,
}

impl std::fmt::Display for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.until {
            Some(t) => write!(f, "{} until {}", self.what, t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            None => write!(f, "{} until it is lifted", self.what),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct PutOptions {
    pub content_type: String,
    /// Stored as user metadata where the store supports it (S3 `x-amz-meta-*`).
    pub user_metadata: Vec<(String, String)>,
    /// Total size when known in advance (uploads of an existing file).
    pub size_hint: Option<u64>,
    /// The same body as independent streams of byte ranges, when the caller can give them (a
    /// file being written or written): a store may then send parts of it at the same time.
    pub ranges: Option<Ranges>,
}

/// `(offset, len)` → a stream of exactly those bytes of the body (an error if it has fewer),
/// waiting for them while they are still being written. A range at the end (`offset` = the
/// length) yields nothing once the body is whole, or what follows if it is longer.
#[derive(Clone)]
pub struct Ranges(pub std::sync::Arc<dyn Fn(u64, u64) -> ByteStream + Send + Sync>);

impl std::fmt::Debug for Ranges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ranges")
    }
}

/// Bytes `offset..offset + len` of an object, as [`SnapshotStore::get_parts`] hands them out.
pub struct Part {
    pub offset: u64,
    pub len: u64,
    pub body: ByteStream,
}

/// `size` bytes cut into at most `parts` consecutive parts of at least `min_part` bytes (one when
/// `size` is smaller), as even as whole bytes allow.
pub fn part_bounds(size: u64, parts: usize, min_part: u64) -> Vec<(u64, u64)> {
    let n = (size / min_part.max(1)).clamp(1, parts.max(1) as u64);
    (0..n).map(|i| (i * size / n, (i + 1) * size / n - i * size / n)).collect()
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
    /// Whether the object is under a hold that forbids deleting it now (S3 Object Lock: a
    /// retention date still ahead, or a legal hold); `None` where the store has none (local
    /// files), the hold has passed, or the object is not there. Retention asks before deleting,
    /// and leaves held objects for a later run.
    async fn hold(&self, key: &str) -> Result<Option<Hold>> {
        let _ = key;
        Ok(None)
    }
    /// The user metadata stored with an object (S3 `x-amz-meta-*`, without the prefix), empty
    /// where the store keeps none (local files) or the object is not there.
    async fn user_metadata(&self, key: &str) -> Result<Vec<(String, String)>> {
        let _ = key;
        Ok(Vec::new())
    }
    /// The object in consecutive parts, each its own stream, for a download that fetches them at
    /// once: at most `parts`, none under `min_part` bytes, and one for an object under
    /// `min_size` bytes. `None` where one stream is as fast (local files): the caller then uses
    /// [`get`]. Every part reads the same version of the object (S3: the ETag of the
    /// first response), so an object replaced meanwhile fails the download rather than mixing
    /// two versions.
    ///
    /// [`get`]: SnapshotStore::get
    async fn get_parts(
        &self,
        key: &str,
        parts: usize,
        min_part: u64,
        min_size: u64,
    ) -> Result<Option<(ObjectInfo, Vec<Part>)>> {
        let _ = (key, parts, min_part, min_size);
        Ok(None)
    }
}

/// Creates a directory and its missing parents with mode 0700.
pub fn create_private_dir(path: &Path) -> Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path).map_err(Error::io("create directory", path))
}

/// Creates `dir` (and missing parents) with mode 0700, or checks an existing one: it must be
/// owned by this user (or root) and writable by no one else, because whoever can write into it
/// can plant files and links where ours are written. A symbolic link is followed only if this
/// user (or root) owns the link. `what` names the directory in errors ("snapshot dir").
pub fn ensure_private_dir(dir: &Path, what: &'static str) -> Result<()> {
    create_private_dir(dir)?;
    check_private_dir(dir, what)
}

/// The checks of [`ensure_private_dir`] on an existing directory.
pub fn check_private_dir(dir: &Path, what: &'static str) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    let trusted = |uid: u32| uid == me || uid == 0;
    let unsafe_dir = |detail: String, fix: String| Error::UnsafeDir { what, path: dir.to_path_buf(), detail, fix };
    let link = std::fs::symlink_metadata(dir).map_err(Error::io("stat", dir))?;
    if link.file_type().is_symlink() && !trusted(link.uid()) {
        return Err(unsafe_dir(
            format!("is a symbolic link owned by uid {}, not by this user (uid {me})", link.uid()),
            format!(
                "remove it and let k3s-snapshot create the directory, or point the flag at a directory of yours: rm {}",
                dir.display()
            ),
        ));
    }
    let md = std::fs::metadata(dir).map_err(Error::io("stat", dir))?;
    if !md.is_dir() {
        return Err(unsafe_dir("is not a directory".into(), "give a directory".into()));
    }
    if !trusted(md.uid()) {
        return Err(unsafe_dir(
            format!("is owned by uid {}, not by this user (uid {me}), so someone else can plant files in it", md.uid()),
            format!("chown {me} {} (or remove it and let k3s-snapshot create it)", dir.display()),
        ));
    }
    let mode = md.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(unsafe_dir(
            format!("is writable by group or others (mode {mode:04o}), so someone else can plant files in it"),
            format!("chmod 700 {}", dir.display()),
        ));
    }
    Ok(())
}

/// Takes the group and other permission bits off an existing file or directory of this user,
/// keeping the owner's (a directory becomes 0700, a file 0600). Returns the old mode when it
/// changed it, `None` when there was nothing to do (or no such path). A symbolic link is left alone.
pub fn tighten_mode(path: &Path) -> Result<Option<u32>> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::Io { action: "stat", path: path.into(), cause: e }),
    };
    if md.file_type().is_symlink() || md.uid() != nix::unistd::geteuid().as_raw() {
        return Ok(None);
    }
    let mode = md.mode() & 0o7777;
    let want = if md.is_dir() { 0o700 } else { 0o600 };
    if mode & 0o077 == 0 {
        return Ok(None);
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(want)).map_err(Error::io("chmod", path))?;
    Ok(Some(mode))
}

/// Space that must stay free on a filesystem after a download or an extraction.
pub const FREE_SPACE_MARGIN: u64 = 64 << 20;

/// Refuses to write `need` bytes into `dir` unless its filesystem keeps [`FREE_SPACE_MARGIN`]
/// free afterwards (counting the blocks available to unprivileged users). `what` names the data.
pub fn ensure_free_space(dir: &Path, need: u64, what: &str) -> Result<()> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(|errno| Error::Io {
        action: "check free space in",
        path: dir.into(),
        cause: errno.into(),
    })?;
    // fsblkcnt_t and c_ulong are u64 here but not on every target.
    #[allow(clippy::unnecessary_cast)]
    let free = (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64);
    if need.saturating_add(FREE_SPACE_MARGIN) > free {
        return Err(Error::NoSpace { dir: dir.into(), what: what.to_string(), need, free, margin: FREE_SPACE_MARGIN });
    }
    Ok(())
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

/// Writes a small file atomically with mode 0600 (a unique scratch file opened with
/// `O_EXCL|O_NOFOLLOW`, fsync, rename over `path`, dir fsync).
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let scratch = ScratchFile::create(path)?;
    scratch.file().write_all(bytes).map_err(Error::io("write", path))?;
    scratch.sync()?;
    scratch.replace_target()?;
    Ok(())
}

/// `<path>.part`
pub fn part_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(name::PART_SUFFIX);
    PathBuf::from(s)
}

/// Opens a new file for writing with mode 0600, `O_EXCL` and `O_NOFOLLOW`: it fails if anything,
/// a symbolic link included, is already at `path`, so that nothing planted there is ever written
/// through.
pub fn create_new_private(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o600)
        .open(path)
}

/// A file written under a unique scratch name beside its final name,
/// `<final name>.<16 random alphanumerics>.part` (see [`name::part_target`]), created with
/// [`create_new_private`]. Removed when dropped unless given its final name.
#[derive(Debug)]
pub struct ScratchFile {
    tmp: tempfile::NamedTempFile,
    target: PathBuf,
    /// Set by whoever wrote the file when they hashed it as it was written and its last 32
    /// bytes were the SHA-256 of the rest: an etcd snapshot whose trailer is already checked.
    verified_trailer: Option<[u8; 32]>,
    /// A second file beside this one holding the image (every byte but the trailer), written
    /// from the same buffers as the download landed, and the one the trailer check read back
    /// ([`ScratchFile::take_image_copy`]).
    image_copy: Option<tempfile::NamedTempFile>,
}

/// Where [`ScratchFile::place`] left a verified file.
#[derive(Debug)]
pub enum Placed {
    /// Renamed to its final name, which was free.
    New(PathBuf),
    /// A file with the same content already had the final name; the scratch file is gone.
    Identical(PathBuf),
    /// A different file has the final name and stays as it is; the new file is still the
    /// scratch file, removed when this is dropped.
    Kept { existing: PathBuf, scratch: ScratchFile },
}

impl Placed {
    /// Where the file is now.
    pub fn path(&self) -> &Path {
        match self {
            Placed::New(p) | Placed::Identical(p) => p,
            Placed::Kept { scratch, .. } => scratch.path(),
        }
    }
}

impl ScratchFile {
    /// Creates the scratch file for `target` in `target`'s directory.
    pub fn create(target: &Path) -> Result<ScratchFile> {
        let dir = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let file_name =
            target.file_name().ok_or_else(|| Error::Invalid(format!("{} has no file name", target.display())))?;
        let mut prefix = file_name.to_owned();
        prefix.push(".");
        let tmp = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(name::PART_SUFFIX)
            .rand_bytes(name::SCRATCH_RANDOM_LEN)
            .make_in(dir, create_new_private)
            .map_err(Error::io("create", target.with_file_name(format!("{}.*.part", file_name.to_string_lossy()))))?;
        Ok(ScratchFile { tmp, target: target.to_path_buf(), verified_trailer: None, image_copy: None })
    }

    /// Records that the file's bytes, as written, end in the SHA-256 `image` of the bytes before
    /// them ([`crate::integrity::Digests::verified_trailer`]).
    pub fn set_verified_trailer(&mut self, image: Option<[u8; 32]>) {
        self.verified_trailer = image;
    }

    /// See [`ScratchFile::set_verified_trailer`]: a check may compare this with the file's
    /// trailer instead of hashing the file again.
    pub fn verified_trailer(&self) -> Option<[u8; 32]> {
        self.verified_trailer
    }

    /// A new scratch file beside this one, named as scratch files are (so that what a crash
    /// leaves is cleaned up like them), for a copy of its image; removed when dropped (or with
    /// this file) unless taken.
    pub fn create_image_copy(&self) -> Result<tempfile::NamedTempFile> {
        Ok(ScratchFile::create(&self.target)?.tmp)
    }

    /// Attaches the image copy made while this file was written; it is trusted only together
    /// with [`ScratchFile::verified_trailer`], which must have been computed from its bytes.
    pub fn set_image_copy(&mut self, copy: tempfile::NamedTempFile) {
        self.image_copy = Some(copy);
    }

    /// The image copy, when the download made one and its bytes hashed to this file's trailer:
    /// a restore can take it as the member's db instead of copying the snapshot again.
    pub fn take_image_copy(&mut self) -> Option<tempfile::NamedTempFile> {
        self.verified_trailer.and(self.image_copy.take())
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// The final name this file is written for.
    pub fn target(&self) -> &Path {
        &self.target
    }

    pub fn file(&self) -> &std::fs::File {
        self.tmp.as_file()
    }

    /// The file for async writes (a second descriptor of the same open file).
    pub fn tokio_file(&self) -> Result<tokio::fs::File> {
        let f = self.tmp.as_file().try_clone().map_err(Error::io("open", self.path()))?;
        Ok(tokio::fs::File::from_std(f))
    }

    pub fn sync(&self) -> Result<()> {
        self.file().sync_all().map_err(Error::io("fsync", self.path()))
    }

    fn sync_parent(&self) -> Result<()> {
        sync_dir(self.target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))
    }

    /// Renames the file over its final name (for files that are always ours: metadata, keys,
    /// the token), durably. Call [`ScratchFile::sync`] first.
    pub fn replace_target(self) -> Result<PathBuf> {
        let target = self.target;
        self.tmp.persist(&target).map_err(|e| Error::Io {
            action: "rename into place",
            path: target.clone(),
            cause: e.error,
        })?;
        sync_dir(target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))?;
        Ok(target)
    }

    /// Gives a verified file its final name without ever replacing anything there: when a file
    /// with the same bytes is there, the scratch file goes; when a different one (or anything
    /// that is not a regular file) is there, it stays as it is and the new file stays under its
    /// scratch name ([`Placed::Kept`]). Call [`ScratchFile::sync`] first.
    pub fn place(self) -> Result<Placed> {
        let target = self.target.clone();
        match self.tmp.persist_noclobber(&target) {
            Ok(_) => {
                sync_dir(target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))?;
                Ok(Placed::New(target))
            }
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => {
                let scratch = ScratchFile {
                    tmp: e.file,
                    target: target.clone(),
                    verified_trailer: self.verified_trailer,
                    image_copy: None,
                };
                if same_content(scratch.path(), &target)? {
                    drop(scratch);
                    Ok(Placed::Identical(target))
                } else {
                    scratch.sync_parent()?;
                    Ok(Placed::Kept { existing: target, scratch })
                }
            }
            Err(e) => Err(Error::Io { action: "rename into place", path: target, cause: e.error }),
        }
    }
}

/// Whether `existing` is a regular file with the same bytes as `new`.
fn same_content(new: &Path, existing: &Path) -> Result<bool> {
    let md = match std::fs::symlink_metadata(existing) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::Io { action: "stat", path: existing.into(), cause: e }),
    };
    let new_len = std::fs::metadata(new).map_err(Error::io("stat", new))?.len();
    if !md.is_file() || md.len() != new_len {
        return Ok(false);
    }
    Ok(crate::integrity::sha256_file(new)? == crate::integrity::sha256_file(existing)?)
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

    /// Creates the snapshot and metadata dirs (0700), or checks existing ones (owned by this
    /// user, writable by no one else: [`ensure_private_dir`]), and checks the snapshot dir is
    /// writable.
    pub fn ensure_dirs(&self) -> Result<()> {
        ensure_private_dir(&self.dir, "snapshot dir")?;
        ensure_private_dir(&self.metadata_dir, "metadata dir")?;
        nix_access_w(&self.dir)
    }

    /// Takes group and other read/execute permissions off existing snapshot and metadata dirs
    /// of this user ([`tighten_mode`]); returns each path changed with its old mode. Dirs that
    /// others can write to are left for [`LocalStore::ensure_dirs`] to refuse: tightening them
    /// would not remove what may already have been planted in them.
    pub fn tighten_dirs(&self) -> Result<Vec<(PathBuf, u32)>> {
        use std::os::unix::fs::MetadataExt;
        let mut changed = Vec::new();
        for dir in [&self.dir, &self.metadata_dir] {
            let writable_by_others = std::fs::metadata(dir).is_ok_and(|m| m.mode() & 0o022 != 0);
            if writable_by_others {
                continue;
            }
            if let Some(old) = tighten_mode(dir)? {
                changed.push((dir.clone(), old));
            }
        }
        Ok(changed)
    }

    /// Removes `.part` files (of snapshots and metadata) not written to for `older_than`: what a
    /// killed save or download left. Only names this program makes are touched
    /// ([`name::is_our_part`]: a snapshot name of ours plus `.part`, or its scratch name); a
    /// write in progress touches its file continuously, so it is never taken for stale.
    /// Returns the removed paths.
    pub fn remove_stale_parts(&self, older_than: std::time::Duration) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        for dir in [&self.dir, &self.metadata_dir] {
            let Ok(rd) = std::fs::read_dir(dir) else { continue };
            for e in rd.flatten() {
                let path = e.path();
                if !e.file_name().to_str().is_some_and(name::is_our_part) {
                    continue;
                }
                if !e.file_type().is_ok_and(|t| t.is_file()) {
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
        if path.parent() == Some(self.metadata_dir.as_path()) {
            ensure_private_dir(&self.metadata_dir, "metadata dir")?;
        } else {
            ensure_private_dir(&self.dir, "snapshot dir")?;
        }
        let scratch = ScratchFile::create(&path)?;
        let mut w = tokio::io::BufWriter::with_capacity(1 << 20, scratch.tokio_file()?);
        let mut n = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(Error::io("read the source of", &path))?;
            n += chunk.len() as u64;
            w.write_all(&chunk).await.map_err(Error::io("write", scratch.path()))?;
        }
        w.flush().await.map_err(Error::io("write", scratch.path()))?;
        drop(w);
        scratch.sync()?;
        scratch.replace_target()?;
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

    #[test]
    fn place_never_replaces_a_different_file() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("s-n-1");
        let write = |bytes: &[u8]| {
            let s = ScratchFile::create(&target).unwrap();
            std::io::Write::write_all(&mut s.file(), bytes).unwrap();
            s.sync().unwrap();
            s
        };
        assert!(matches!(write(b"one").place().unwrap(), Placed::New(_)));
        assert!(matches!(write(b"one").place().unwrap(), Placed::Identical(_)));
        let kept = write(b"two").place().unwrap();
        let Placed::Kept { existing, scratch } = &kept else { panic!("{kept:?}") };
        assert_eq!(existing, &target);
        assert_eq!(std::fs::read(scratch.path()).unwrap(), b"two");
        assert!(name::is_our_part(&scratch.path().file_name().unwrap().to_string_lossy()));
        drop(kept);
        assert_eq!(std::fs::read(&target).unwrap(), b"one");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1, "a scratch file was left");
    }

    #[test]
    fn scratch_files_never_follow_a_planted_link() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, tmp.path().join("s-n-1.part")).unwrap();
        write_file_atomic(&tmp.path().join("s-n-1"), b"new").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let e = create_new_private(&tmp.path().join("s-n-1.part")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
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
