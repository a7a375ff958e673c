//! etcd-level view of a snapshot file: the equivalent of
//! `etcdutl snapshot status`, plus the integrity checks used before a restore.
//!
//! An etcd snapshot is a bbolt image, optionally followed by a 32-byte sha256
//! of the image (present when `file_len % 512 == 32`, the rule etcd's restore
//! uses). The status hash is crc32c (Castagnoli) over, for each top-level
//! bucket in key order, the bucket name followed by every key and value of that
//! bucket in key order (nested buckets contribute their key only). `revision`
//! is the main revision of the last key of the `key` bucket, `totalKey` counts
//! all key/value pairs of all top-level buckets and `totalSize` is the meta
//! high-water mark times the page size. etcd 3.4 and 3.5 compute these the
//! same way.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::bbolt::{BoltError, Checker, Db, Value};

/// Length of the sha256 trailer etcd appends to snapshots.
pub const TRAILER_LEN: u64 = 32;
/// Images at least this large are hashed on a second thread while the tree is walked.
const PARALLEL_SHA_MIN: usize = 4 << 20;
/// Read size of [`verify_trailer`], and the chunk after which the mapped hasher releases its pages.
const READ_BUF: usize = 1 << 20;

/// Errors from [`status`] and [`check`].
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Bolt(#[from] BoltError),
    #[error("cannot read snapshot {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "snapshot {} failed its sha256 integrity check: the trailer says {expected} but the data hashes to {actual}",
        .path.display()
    )]
    TrailerMismatch { path: PathBuf, expected: String, actual: String },
    #[error("snapshot {} is not an etcd snapshot: top-level key {name:?} is not a bucket", .path.display())]
    NotABucket { path: PathBuf, name: String },
    #[error(
        "snapshot {} is corrupt: key bucket entry {key} is {len} bytes, too short for a revision (17 bytes)",
        .path.display()
    )]
    BadRevision { path: PathBuf, key: String, len: usize },
}

/// State of the sha256 trailer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum TrailerStatus {
    /// No trailer (`file_len % 512 != 32`).
    Absent,
    /// Trailer present and equal to the sha256 of the image (hex).
    Valid { sha256: String },
    /// Trailer present but different from the computed sha256 (both hex).
    Mismatch { expected: String, actual: String },
    /// Trailer present, not checked (the caller asked to skip the hash check).
    Unchecked { expected: String },
}

impl TrailerStatus {
    /// True unless the trailer is present and wrong.
    pub fn is_ok(&self) -> bool {
        !matches!(self, TrailerStatus::Mismatch { .. })
    }
}

/// A cluster member recorded in the snapshot's `members` bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    /// Member id in hex, as printed by `etcdctl member list`.
    pub id: String,
    pub name: String,
    #[serde(rename = "peerURLs")]
    pub peer_urls: Vec<String>,
    #[serde(rename = "clientURLs")]
    pub client_urls: Vec<String>,
    #[serde(rename = "isLearner")]
    pub is_learner: bool,
}

/// Result of [`status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotStatus {
    pub hash: u32,
    pub revision: i64,
    pub total_key: u64,
    pub total_size: u64,
    /// `meta/consistent_index`, if present.
    pub consistent_index: Option<u64>,
    /// `meta/term`, if present (etcd >= 3.5).
    pub term: Option<u64>,
    pub members: Vec<Member>,
    pub trailer: TrailerStatus,
    pub page_size: u32,
    pub txid: u64,
    /// Non-fatal oddities (e.g. a member entry that is not valid JSON).
    pub warnings: Vec<String>,
}

/// Exactly the fields (and JSON names) of `etcdutl snapshot status -w json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EtcdutlStatus {
    pub hash: u32,
    pub revision: i64,
    #[serde(rename = "totalKey")]
    pub total_key: u64,
    #[serde(rename = "totalSize")]
    pub total_size: u64,
}

impl SnapshotStatus {
    /// The subset reported by `etcdutl snapshot status`.
    pub fn etcdutl(&self) -> EtcdutlStatus {
        EtcdutlStatus {
            hash: self.hash,
            revision: self.revision,
            total_key: self.total_key,
            total_size: self.total_size,
        }
    }

    /// `{"hash":..,"revision":..,"totalKey":..,"totalSize":..}` as etcdutl prints it.
    pub fn etcdutl_json(&self) -> String {
        serde_json::to_string(&self.etcdutl()).unwrap_or_default()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StatusError + '_ {
    move |source| StatusError::Io { path: path.to_path_buf(), source }
}

fn has_trailer(file_len: u64) -> bool {
    file_len % 512 == TRAILER_LEN
}

fn compare_trailer(computed: &[u8], stored: &[u8]) -> TrailerStatus {
    let actual = hex::encode(computed);
    if computed == stored {
        TrailerStatus::Valid { sha256: actual }
    } else {
        TrailerStatus::Mismatch { expected: hex::encode(stored), actual }
    }
}

/// Verifies the sha256 trailer of a snapshot file by streaming it through a
/// fixed-size buffer.
pub fn verify_trailer(path: &Path) -> Result<TrailerStatus, StatusError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    if !has_trailer(len) {
        return Ok(TrailerStatus::Absent);
    }
    let mut remaining = len - TRAILER_LEN;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; READ_BUF];
    while remaining > 0 {
        let want = usize::try_from(remaining).unwrap_or(READ_BUF).min(READ_BUF);
        let chunk = &mut buf[..want];
        file.read_exact(chunk).map_err(io_err(path))?;
        hasher.update(&*chunk);
        remaining -= want as u64;
    }
    let mut stored = [0u8; TRAILER_LEN as usize];
    file.read_exact(&mut stored).map_err(io_err(path))?;
    Ok(compare_trailer(&hasher.finalize(), &stored))
}

fn open_snapshot(path: &Path) -> Result<(Db, bool), StatusError> {
    let file = File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    let trailer = has_trailer(len);
    let image_len = if trailer { len - TRAILER_LEN } else { len };
    let db = Db::open_file(path, &file, Some(image_len))?;
    Ok((db, trailer))
}

/// Hashes the image in chunks, releasing each chunk's mapped pages after it
/// (so that hashing a large file does not make it all resident).
fn trailer_of(db: &Db, present: bool, check_hash: bool) -> TrailerStatus {
    if !present {
        return TrailerStatus::Absent;
    }
    if !check_hash {
        return TrailerStatus::Unchecked { expected: hex::encode(db.bytes_after_image()) };
    }
    let mut hasher = Sha256::new();
    for (i, chunk) in db.image().chunks(READ_BUF).enumerate() {
        hasher.update(chunk);
        db.release_range(i * READ_BUF, chunk.len());
    }
    compare_trailer(&hasher.finalize(), db.bytes_after_image())
}

/// Runs `work` while the trailer is verified (on a second thread for large
/// images); a trailer mismatch takes precedence over `work`'s result.
fn with_trailer<T>(
    db: &Db,
    present: bool,
    check_hash: bool,
    work: impl FnOnce() -> Result<T, StatusError>,
) -> Result<(T, TrailerStatus), StatusError> {
    let (result, trailer) = if present && check_hash && db.image().len() >= PARALLEL_SHA_MIN {
        std::thread::scope(|s| {
            let h = s.spawn(|| trailer_of(db, present, check_hash));
            let result = work();
            let trailer = h.join().map_err(|_| StatusError::Io {
                path: db.path().to_path_buf(),
                source: std::io::Error::other("sha256 worker thread panicked"),
            });
            (result, trailer)
        })
    } else {
        let t = trailer_of(db, present, check_hash);
        (work(), Ok(t))
    };
    let trailer = trailer?;
    if let TrailerStatus::Mismatch { expected, actual } = &trailer {
        return Err(StatusError::TrailerMismatch {
            path: db.path().to_path_buf(),
            expected: expected.clone(),
            actual: actual.clone(),
        });
    }
    Ok((result?, trailer))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Special {
    Key,
    Meta,
    Members,
    Other,
}

/// Member records and warnings kept at most: a crafted file can hold millions of either.
pub const MAX_MEMBERS: usize = 64;
pub const MAX_WARNINGS: usize = 32;

#[derive(Default)]
struct Acc {
    crc: u32,
    revision: i64,
    total_key: u64,
    consistent_index: Option<u64>,
    term: Option<u64>,
    members: Vec<Member>,
    warnings: Vec<String>,
    /// Member records and warnings beyond the caps, counted only.
    members_dropped: u64,
    warnings_dropped: u64,
}

/// `s` with control characters, quotes and backslashes escaped and at most 256 characters:
/// text read from a snapshot goes to terminals and logs.
pub fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(256).flat_map(char::escape_debug).collect();
    if s.chars().count() > 256 {
        out.push('…');
    }
    out
}

#[derive(serde::Deserialize)]
struct MemberJson {
    id: Option<u64>,
    #[serde(default)]
    name: String,
    #[serde(rename = "peerURLs", default)]
    peer_urls: Vec<String>,
    #[serde(rename = "clientURLs", default)]
    client_urls: Vec<String>,
    #[serde(rename = "isLearner", default)]
    is_learner: bool,
}

fn be_u64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

impl Acc {
    fn meta_value(&mut self, k: &[u8], v: &[u8]) {
        let slot = match k {
            b"consistent_index" => &mut self.consistent_index,
            b"term" => &mut self.term,
            _ => return,
        };
        match be_u64(v) {
            Some(n) => *slot = Some(n),
            None => {
                self.warn(format!("meta/{} is {} bytes, expected 8", printable(&String::from_utf8_lossy(k)), v.len()))
            }
        }
    }

    fn warn(&mut self, w: String) {
        if self.warnings.len() < MAX_WARNINGS {
            self.warnings.push(w);
        } else {
            self.warnings_dropped += 1;
        }
    }

    fn member(&mut self, k: &[u8], v: &[u8]) {
        let key = printable(&String::from_utf8_lossy(k));
        if self.members.len() >= MAX_MEMBERS {
            self.members_dropped += 1;
            return;
        }
        match serde_json::from_slice::<MemberJson>(v) {
            Ok(m) => self.members.push(Member {
                id: m.id.map(|id| format!("{id:x}")).unwrap_or(key),
                name: printable(&m.name),
                peer_urls: m.peer_urls.iter().take(16).map(|u| printable(u)).collect(),
                client_urls: m.client_urls.iter().take(16).map(|u| printable(u)).collect(),
                is_learner: m.is_learner,
            }),
            Err(e) => {
                self.warn(format!("members entry {key} is not a valid member record: {}", printable(&e.to_string())))
            }
        }
    }
}

fn compute(db: &Db) -> Result<Acc, StatusError> {
    let path = db.path();
    let mut acc = Acc::default();
    let mut checker = Checker::new(db)?;
    let root = db.root();
    checker.walk_bucket(&root, &mut |c: &mut Checker<'_>, name: &[u8], v: Value<'_>| {
        let Value::Bucket(bucket) = v else {
            return Err(StatusError::NotABucket {
                path: path.to_path_buf(),
                name: String::from_utf8_lossy(name).into_owned(),
            });
        };
        acc.crc = crc32c::crc32c_append(acc.crc, name);
        let special = match name {
            b"key" => Special::Key,
            b"meta" => Special::Meta,
            b"members" => Special::Members,
            _ => Special::Other,
        };
        let acc = &mut acc;
        c.walk_bucket(&bucket, &mut |c: &mut Checker<'_>, k: &[u8], v: Value<'_>| {
            acc.crc = crc32c::crc32c_append(acc.crc, k);
            acc.total_key += 1;
            match v {
                Value::Bucket(nested) => c.check_bucket(&nested)?,
                Value::Data(d) => {
                    acc.crc = crc32c::crc32c_append(acc.crc, d);
                    match special {
                        Special::Key => {
                            if k.len() < 17 {
                                return Err(StatusError::BadRevision {
                                    path: path.to_path_buf(),
                                    key: hex::encode(k),
                                    len: k.len(),
                                });
                            }
                            acc.revision = be_u64(&k[..8]).unwrap_or(0) as i64;
                        }
                        Special::Meta => acc.meta_value(k, d),
                        Special::Members => acc.member(k, d),
                        Special::Other => {}
                    }
                }
            }
            Ok(())
        })
    })?;
    checker.finish()?;
    Ok(acc)
}

fn status_of(db: &Db, trailer_present: bool, check_hash: bool) -> Result<SnapshotStatus, StatusError> {
    let (acc, trailer) = with_trailer(db, trailer_present, check_hash, || compute(db))?;
    Ok(SnapshotStatus {
        hash: acc.crc,
        revision: acc.revision,
        total_key: acc.total_key,
        total_size: db.size(),
        consistent_index: acc.consistent_index,
        term: acc.term,
        members: acc.members,
        trailer,
        page_size: db.page_size(),
        txid: db.meta().txid,
        warnings: {
            let mut w = acc.warnings;
            if acc.members_dropped > 0 {
                w.push(format!("{} more member records not shown (at most {MAX_MEMBERS})", acc.members_dropped));
            }
            if acc.warnings_dropped > 0 {
                w.push(format!("{} more warnings not shown", acc.warnings_dropped));
            }
            w
        },
    })
}

fn check_of(db: &Db, trailer_present: bool) -> Result<TrailerStatus, StatusError> {
    let ((), trailer) = with_trailer(db, trailer_present, true, || db.check().map_err(StatusError::from))?;
    Ok(trailer)
}

/// `etcdutl snapshot status` equivalent: verifies the sha256 trailer (a
/// mismatch is an error), checks the bbolt structure, and computes hash,
/// revision, key count and size plus etcd metadata.
pub fn status(path: &Path) -> Result<SnapshotStatus, StatusError> {
    status_with(path, true)
}

/// [`status`], optionally without the sha256 check of the trailer (the
/// structural check and everything etcdutl reads still run; the trailer is
/// then reported as [`TrailerStatus::Unchecked`]). Hashing is the slowest part
/// of a status on large files: SHA-256 runs on one core at ~1.5–2 GB/s.
pub fn status_with(path: &Path, check_hash: bool) -> Result<SnapshotStatus, StatusError> {
    let (db, trailer) = open_snapshot(path)?;
    status_of(&db, trailer, check_hash)
}

/// Integrity check for restore: sha256 trailer (if present) and bbolt structure.
/// Returns the trailer state (never `Mismatch`; that is an error).
pub fn check(path: &Path) -> Result<TrailerStatus, StatusError> {
    let (db, trailer) = open_snapshot(path)?;
    check_of(&db, trailer)
}

/// [`check`] of a file whose image was hashed as it was written (a download,
/// [`crate::store::ScratchFile::verified_trailer`]): when `hashed` is the file's own trailer, the
/// trailer is taken as checked and only the structure is read; otherwise the file is hashed as
/// [`check`] does.
pub fn check_hashed(path: &Path, hashed: Option<[u8; 32]>) -> Result<TrailerStatus, StatusError> {
    let (db, trailer) = open_snapshot(path)?;
    match hashed {
        Some(h) if trailer && db.bytes_after_image() == h.as_slice() => {
            db.check()?;
            Ok(TrailerStatus::Valid { sha256: hex::encode(h) })
        }
        _ => check_of(&db, trailer),
    }
}

fn db_from_bytes(name: &Path, bytes: Vec<u8>) -> Result<(Db, bool), StatusError> {
    let len = bytes.len() as u64;
    let trailer = has_trailer(len);
    let image_len = if trailer { len - TRAILER_LEN } else { len };
    Ok((Db::from_bytes(name, bytes, Some(image_len))?, trailer))
}

/// [`status`] of an in-memory snapshot (`name` is used in messages).
pub fn status_from_bytes(name: &Path, bytes: Vec<u8>) -> Result<SnapshotStatus, StatusError> {
    let (db, trailer) = db_from_bytes(name, bytes)?;
    status_of(&db, trailer, true)
}

/// [`check`] of an in-memory snapshot (`name` is used in messages).
pub fn check_from_bytes(name: &Path, bytes: Vec<u8>) -> Result<TrailerStatus, StatusError> {
    let (db, trailer) = db_from_bytes(name, bytes)?;
    check_of(&db, trailer)
}

/// Real-etcd test harness (binaries from `K3S_SNAPSHOT_ETCD35_BIN_DIR` /
/// `K3S_SNAPSHOT_ETCD34_BIN_DIR`, installed by `cargo xtask test`).
#[cfg(test)]
pub(crate) mod etcdtest {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use super::EtcdutlStatus;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Ver {
        V34,
        V35,
    }

    pub(crate) struct Bins {
        pub etcd: PathBuf,
        pub etcdctl: PathBuf,
        /// `etcdutl` (3.5) — absent for 3.4, whose `etcdctl snapshot status` is used.
        pub etcdutl: Option<PathBuf>,
        pub ver: Ver,
    }

    /// Binaries of an etcd version; panics (failing the test) when they are missing.
    pub(crate) fn bins(ver: Ver) -> Bins {
        let (var, version, tools): (&str, &str, &[&str]) = match ver {
            Ver::V35 => ("K3S_SNAPSHOT_ETCD35_BIN_DIR", "3.5.1", &["etcd", "etcdctl", "etcdutl"]),
            Ver::V34 => ("K3S_SNAPSHOT_ETCD34_BIN_DIR", "3.4.23", &["etcd", "etcdctl"]),
        };
        let dir = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
            panic!(
                "etcd {version} binaries are required: {var} is not set; run the tests with `cargo xtask test`, which installs etcd and sets it"
            )
        });
        for t in tools {
            assert!(
                dir.join(t).is_file(),
                "etcd {version} binary {t} not found in {} ({var}); run the tests with `cargo xtask test`, which installs etcd",
                dir.display()
            );
        }
        Bins {
            etcd: dir.join("etcd"),
            etcdctl: dir.join("etcdctl"),
            etcdutl: (ver == Ver::V35).then(|| dir.join("etcdutl")),
            ver,
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    pub(crate) struct Etcd {
        child: Child,
        pub endpoint: String,
        pub dir: tempfile::TempDir,
        pub bins: Bins,
        pub user: Option<String>,
    }

    impl Etcd {
        pub(crate) fn start(ver: Ver, extra: &[&str]) -> Etcd {
            let bins = bins(ver);
            let dir = tempfile::tempdir().unwrap();
            let (cp, pp) = (free_port(), free_port());
            let client = format!("http://127.0.0.1:{cp}");
            let peer = format!("http://127.0.0.1:{pp}");
            let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
            let child = Command::new(&bins.etcd)
                .args(["--name", "n1", "--data-dir"])
                .arg(dir.path().join("data"))
                .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &format!("n1={peer}")])
                .args(extra)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            let etcd = Etcd { child, endpoint: client, dir, bins, user: None };
            let deadline = Instant::now() + Duration::from_secs(20);
            while !etcd.healthy(cp) {
                assert!(Instant::now() < deadline, "etcd did not become healthy: {}", etcd.log());
                std::thread::sleep(Duration::from_millis(50));
            }
            etcd
        }

        fn healthy(&self, port: u16) -> bool {
            let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
                return false;
            }
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out.contains("\"health\":\"true\"")
        }

        pub(crate) fn log(&self) -> String {
            std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
        }

        /// Runs etcdctl; panics on failure. Returns stdout.
        pub(crate) fn ctl(&self, args: &[&str], stdin: Option<&[u8]>) -> String {
            let mut cmd = Command::new(&self.bins.etcdctl);
            cmd.env("ETCDCTL_API", "3").args(["--endpoints", &self.endpoint]);
            if let Some(u) = &self.user {
                cmd.args(["--user", u]);
            }
            let mut child = cmd
                .args(args)
                .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            if let Some(input) = stdin {
                let mut si = child.stdin.take().unwrap();
                si.write_all(input).unwrap();
            }
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "etcdctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).into_owned()
        }

        pub(crate) fn snapshot(&self, name: &str) -> PathBuf {
            let p = self.dir.path().join(name);
            self.ctl(&["snapshot", "save", p.to_str().unwrap()], None);
            p
        }
    }

    impl Drop for Etcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Status as reported by the reference tool of `bins` (etcdutl for 3.5,
    /// `etcdctl snapshot status` for 3.4).
    pub(crate) fn reference_status(bins: &Bins, snap: &Path) -> EtcdutlStatus {
        let out = match &bins.etcdutl {
            Some(u) => Command::new(u).args(["snapshot", "status", "-w", "json"]).arg(snap).output(),
            None => Command::new(&bins.etcdctl)
                .env("ETCDCTL_API", "3")
                .args(["snapshot", "status", "-w", "json"])
                .arg(snap)
                .output(),
        }
        .unwrap();
        assert!(out.status.success(), "reference status failed: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        EtcdutlStatus {
            hash: v["hash"].as_u64().unwrap() as u32,
            revision: v["revision"].as_i64().unwrap(),
            total_key: v["totalKey"].as_u64().unwrap(),
            total_size: v["totalSize"].as_u64().unwrap(),
        }
    }

    /// Deterministic printable filler.
    pub(crate) fn filler(len: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                b'!' + (s % 90) as u8
            })
            .collect()
    }

    /// Puts, overwrites, deletes, a lease, values larger than a page, a compaction.
    pub(crate) fn workload(e: &Etcd) {
        let mut txn = String::from("\n");
        for i in 0..100 {
            txn.push_str(&format!("put k/{i:03} value-{i}\n"));
        }
        txn.push('\n');
        txn.push('\n');
        e.ctl(&["txn"], Some(txn.as_bytes()));
        for i in 0..5 {
            e.ctl(&["put", "k/007", &format!("v{i}")], None);
        }
        e.ctl(&["del", "k/001"], None);
        e.ctl(&["del", "--prefix", "k/05"], None);
        let lease = e.ctl(&["lease", "grant", "600"], None);
        let id = lease.split_whitespace().nth(1).unwrap().to_string();
        e.ctl(&["put", "leased", "v", "--lease", &id], None);
        for (i, n) in [5_000usize, 20_000, 300_000].iter().enumerate() {
            e.ctl(&["put", &format!("big/{i}")], Some(&filler(*n, i as u64 + 1)));
        }
        e.ctl(&["put", "big/1", "small-now"], None);
        let rev = e.ctl(&["put", "k/002", "x", "-w", "json"], None);
        let v: serde_json::Value = serde_json::from_str(&rev).unwrap();
        let r = v["header"]["revision"].as_i64().unwrap();
        e.ctl(&["compact", &(r - 3).to_string()], None);
        e.ctl(&["put", "after-compact", "1"], None);
    }
}

#[cfg(test)]
mod tests {
    use super::etcdtest::*;
    use super::*;
    use crate::bbolt::testdb::{bucket_value, Builder};
    use crate::bbolt::{LEAF_FLAG_BUCKET, NO_FREELIST};

    fn compare_with_reference(e: &Etcd, snap: &Path) -> SnapshotStatus {
        let ours = status(snap).unwrap();
        let reference = reference_status(&e.bins, snap);
        assert_eq!(ours.etcdutl(), reference, "{}", snap.display());
        assert!(matches!(ours.trailer, TrailerStatus::Valid { .. }));
        assert_eq!(ours.trailer, verify_trailer(snap).unwrap());
        if e.bins.ver == Ver::V34 {
            // etcdutl 3.5 reads 3.4 snapshots too.
            let b35 = bins(Ver::V35);
            assert_eq!(ours.etcdutl(), reference_status(&b35, snap));
        }
        assert!(check(snap).unwrap() == ours.trailer);
        ours
    }

    fn real_snapshot(ver: Ver) {
        let e = Etcd::start(ver, &[]);
        workload(&e);
        let snap = e.snapshot("snap.db");
        let st = compare_with_reference(&e, &snap);
        assert!(st.revision > 10 && st.total_key > 100, "{st:?}");
        assert!(st.consistent_index.is_some_and(|c| c > 0));
        assert_eq!(st.term.is_some(), ver == Ver::V35, "{st:?}");
        assert_eq!(st.members.len(), 1);
        assert_eq!(st.members[0].name, "n1");
        assert!(st.members[0].peer_urls[0].starts_with("http://127.0.0.1:"));
        assert!(st.warnings.is_empty());
        let json = st.etcdutl_json();
        assert_eq!(
            json,
            format!(
                "{{\"hash\":{},\"revision\":{},\"totalKey\":{},\"totalSize\":{}}}",
                st.hash, st.revision, st.total_key, st.total_size
            )
        );

        // With auth enabled (adds the auth buckets).
        e.ctl(&["user", "add", "root:pw"], None);
        e.ctl(&["auth", "enable"], None);
        let mut e = e;
        e.user = Some("root:pw".into());
        e.ctl(&["put", "authed", "yes"], None);
        let snap = e.snapshot("auth.db");
        compare_with_reference(&e, &snap);

        damage(&snap);
    }

    /// Damaged copies of a real snapshot: errors, never panics.
    fn damage(snap: &Path) {
        let bytes = std::fs::read(snap).unwrap();
        let image = &bytes[..bytes.len() - 32];
        let name = Path::new("/d/snap.db");
        // Any flipped byte in the image is caught by the trailer.
        for off in (0..image.len()).step_by(image.len() / 50) {
            let mut b = bytes.clone();
            b[off] ^= 0x40;
            let e = status_from_bytes(name, b).unwrap_err().to_string();
            assert!(e.contains("failed its sha256 integrity check"), "{e}");
        }
        // Without the trailer, flipped bytes may or may not be detected, but never panic.
        let mut errors = 0;
        for off in (0..image.len()).step_by(61) {
            let mut b = image.to_vec();
            b[off] ^= 0x5a;
            if status_from_bytes(name, b).is_err() {
                errors += 1;
            }
        }
        assert!(errors > 0);
        // Truncations.
        let ps = 4096;
        for cut in [0, 100, ps, ps + 80, 2 * ps, image.len() - ps, image.len() - 1] {
            let e = status_from_bytes(name, image[..cut].to_vec()).unwrap_err().to_string();
            assert!(e.contains("is truncated") || e.contains("is not a bbolt database"), "{cut}: {e}");
        }
        let e = status_from_bytes(name, image[..image.len() - ps].to_vec()).unwrap_err().to_string();
        assert!(e.starts_with("snapshot /d/snap.db is truncated: page "), "{e}");
        // Trailer stripped: same numbers, trailer absent.
        let full = status_from_bytes(name, bytes.clone()).unwrap();
        let stripped = status_from_bytes(name, image.to_vec()).unwrap();
        assert_eq!(stripped.trailer, TrailerStatus::Absent);
        assert_eq!(full.etcdutl(), stripped.etcdutl());
    }

    #[test]
    fn matches_etcd_35() {
        real_snapshot(Ver::V35);
    }

    #[test]
    fn matches_etcd_34() {
        real_snapshot(Ver::V34);
    }

    #[test]
    fn large_snapshot_matches_etcdutl() {
        let e = Etcd::start(Ver::V35, &["--quota-backend-bytes", "4294967296"]);
        let value = filler(1_400_000, 99);
        for i in 0..76 {
            e.ctl(&["put", &format!("blob/{i:03}")], Some(&value[i..]));
        }
        workload(&e);
        let snap = e.snapshot("large.db");
        assert!(std::fs::metadata(&snap).unwrap().len() > 100 << 20);
        let t = std::time::Instant::now();
        let ours = status(&snap).unwrap();
        let ours_t = t.elapsed();
        let t = std::time::Instant::now();
        let reference = reference_status(&e.bins, &snap);
        eprintln!("status: ours {ours_t:?}, etcdutl {:?}", t.elapsed());
        assert_eq!(ours.etcdutl(), reference);
    }

    #[test]
    fn trailer_verification() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Builder::new(4096);
        let inner = bucket_value(0, 0, &[(0, b"k", b"v")]);
        let root = b.leaf(&[(LEAF_FLAG_BUCKET, b"x", &inner)]);
        let image = b.finish(root, NO_FREELIST);
        let p = dir.path().join("plain.db");
        std::fs::write(&p, &image).unwrap();
        assert_eq!(verify_trailer(&p).unwrap(), TrailerStatus::Absent);
        let mut with = image.clone();
        with.extend_from_slice(&Sha256::digest(&image));
        std::fs::write(&p, &with).unwrap();
        assert!(matches!(verify_trailer(&p).unwrap(), TrailerStatus::Valid { .. }));
        let st = status(&p).unwrap();
        assert_eq!((st.total_key, st.revision, st.total_size), (1, 0, 3 * 4096));
        assert_eq!(st.hash, crc32c::crc32c(b"xkv"));
        *with.last_mut().unwrap() ^= 1;
        std::fs::write(&p, &with).unwrap();
        assert!(matches!(verify_trailer(&p).unwrap(), TrailerStatus::Mismatch { .. }));
        let e = status(&p).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("snapshot {} failed its sha256 integrity check: the trailer says ", p.display())),
            "{e}"
        );
        assert!(check(&p).is_err());
        let e = status(&dir.path().join("missing.db")).unwrap_err().to_string();
        assert!(e.starts_with("cannot read snapshot "), "{e}");
    }

    #[test]
    fn etcd_level_errors() {
        let name = Path::new("/e/snap.db");
        let mut b = Builder::new(4096);
        let root = b.leaf(&[(0, b"plain", b"v")]);
        let e = status_from_bytes(name, b.finish(root, NO_FREELIST)).unwrap_err().to_string();
        assert_eq!(e, "snapshot /e/snap.db is not an etcd snapshot: top-level key \"plain\" is not a bucket");
        let mut b = Builder::new(4096);
        let inner = bucket_value(0, 0, &[(0, b"short", b"v")]);
        let root = b.leaf(&[(LEAF_FLAG_BUCKET, b"key", &inner)]);
        let e = status_from_bytes(name, b.finish(root, NO_FREELIST)).unwrap_err().to_string();
        assert!(e.contains("key bucket entry 73686f7274 is 5 bytes, too short"), "{e}");
        let mut b = Builder::new(4096);
        let members = bucket_value(0, 0, &[(0, b"abc", b"{not json")]);
        let meta = bucket_value(0, 0, &[(0, b"consistent_index", &7u64.to_be_bytes()), (0, b"term", b"x")]);
        let root = b.leaf(&[(LEAF_FLAG_BUCKET, b"members", &members), (LEAF_FLAG_BUCKET, b"meta", &meta)]);
        let st = status_from_bytes(name, b.finish(root, NO_FREELIST)).unwrap();
        assert_eq!((st.consistent_index, st.term), (Some(7), None));
        assert_eq!(st.warnings.len(), 2, "{:?}", st.warnings);
        let e = status_from_bytes(name, b"hello".to_vec()).unwrap_err().to_string();
        assert!(e.starts_with("snapshot /e/snap.db is not a bbolt database"), "{e}");
    }

    /// Crafted snapshots: what a hostile file makes `status` keep and print.
    mod hostile {
        use super::*;

        #[test]
        fn member_records_and_warnings_are_capped_and_escaped() {
            let mut b = Builder::new(65536);
            let bad: Vec<(Vec<u8>, Vec<u8>)> =
                (0..150u32).map(|i| (format!("bad{i:03}").into_bytes(), b"{".to_vec())).collect();
            let good: Vec<(Vec<u8>, Vec<u8>)> = (0..100u32)
                .map(|i| {
                    let v =
                        format!(r#"{{"id":{},"name":"\u001b[31mevil\nname","peerURLs":["http://x\u0007"]}}"#, i + 1);
                    (format!("m{i:03}").into_bytes(), v.into_bytes())
                })
                .collect();
            let mut entries: Vec<(u32, &[u8], &[u8])> =
                bad.iter().chain(good.iter()).map(|(k, v)| (0, k.as_slice(), v.as_slice())).collect();
            entries.sort_by(|a, b| a.1.cmp(b.1));
            let members = bucket_value(0, 0, &entries);
            let root = b.leaf(&[(LEAF_FLAG_BUCKET, b"members", &members)]);
            let st = status_from_bytes(Path::new("/e/crafted.db"), b.finish(root, NO_FREELIST)).unwrap();
            assert_eq!(st.members.len(), MAX_MEMBERS);
            // The capped warnings, then one line per cap saying how much was left out.
            assert_eq!(st.warnings.len(), MAX_WARNINGS + 2, "{:?}", st.warnings);
            assert!(st.warnings.iter().any(|w| w.contains("more warnings not shown")));
            assert!(st.warnings.iter().any(|w| w.contains("more member records not shown")));
            for m in &st.members {
                assert!(!m.name.chars().any(char::is_control), "{:?}", m.name);
                assert!(m.name.contains("\\u{1b}[31mevil\\nname"), "{:?}", m.name);
                assert!(!m.peer_urls.iter().any(|u| u.chars().any(char::is_control)));
            }
        }
    }
}
