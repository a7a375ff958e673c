//! Moving a restored database's revision forward and marking every revision up to the new one
//! compacted, natively: what `etcdutl snapshot restore --bump-revision N --mark-compacted` does
//! in later etcd 3.5 releases (read in etcdutl/snapshot/v3_snapshot.go, `modifyLatestRevision`,
//! and server/storage/mvcc's revision encoding and `UnsafeSetScheduledCompact`), which the
//! etcdutl 3.5.1 and etcdctl 3.4.23 we restore with cannot do.
//!
//! The change (from etcd's current revision, [`current_revision`]): a key `(latest + N, 0)` with an empty value in the `key` bucket, so etcd's
//! current revision starts there, and `scheduledCompactRev = latest + N` in `meta`, so etcd
//! compacts up to it when it starts. A client that asks for an older revision, or resumes a watch
//! from one, gets "required revision has been compacted" and relists instead of trusting a cache
//! from a future that the restore undid. A revision is 8 bytes big-endian main, `_`, 8 bytes
//! big-endian sub (a tombstone adds a trailing `t`).
//!
//! The change is committed as bbolt commits ([`crate::bbolt::writer::append_commit`]): copies of
//! the few touched pages appended, fsync, then a new meta in the other slot; a database of a shape
//! that commit does not handle is rewritten whole ([`crate::bbolt::writer::rewrite_file`]: a new
//! file, fsynced and checked, renamed over the old one).

use std::path::Path;

use crate::bbolt::writer::{append_commit, rewrite_file, Edits, WriteError};
use crate::bbolt::{Db, Value};
use crate::{Error, Result};

const KEY_BUCKET: &[u8] = b"key";
const META_BUCKET: &[u8] = b"meta";
const SCHEDULED_COMPACT_KEY: &[u8] = b"scheduledCompactRev";

/// The default bump of a restore: far beyond any revision a cluster reaches between snapshots.
pub const DEFAULT_BUMP: u64 = 1_000_000_000;

/// A revision's 17 bytes.
pub fn rev_bytes(main: i64, sub: i64) -> [u8; 17] {
    let mut b = [0u8; 17];
    b[..8].copy_from_slice(&main.to_be_bytes());
    b[8] = b'_';
    b[9..].copy_from_slice(&sub.to_be_bytes());
    b
}

/// The main revision of a revision key; `None` if it is not one.
pub fn main_of(key: &[u8]) -> Option<i64> {
    if key.len() < 17 || key[8] != b'_' {
        return None;
    }
    Some(i64::from_be_bytes(key[..8].try_into().ok()?))
}

/// The newest revision recorded in the `key` bucket (0 when it is empty).
pub fn latest_revision(db: &Db) -> Result<i64> {
    let path = db.path().display().to_string();
    let invalid = |detail: String| Error::Invalid(format!("{path}: {detail}"));
    let bucket = db.root().bucket(KEY_BUCKET).map_err(|e| invalid(e.to_string()))?;
    let Some(bucket) = bucket else {
        return Err(invalid("no `key` bucket: not an etcd v3 database".into()));
    };
    match bucket.last().map_err(|e| invalid(e.to_string()))? {
        None => Ok(0),
        Some((k, Value::Data(_))) => main_of(k)
            .ok_or_else(|| invalid(format!("the last key of the `key` bucket is not a revision ({} bytes)", k.len()))),
        Some((_, Value::Bucket(_))) => Err(invalid("the `key` bucket holds a nested bucket".into())),
    }
}

/// The revision etcd starts at on this database: the newest revision in the `key` bucket, or a
/// later compaction's (`finishedCompactRev`, `scheduledCompactRev` in `meta`: keys can be gone
/// while their revisions are not), and at least 1 (a new etcd's revision).
pub fn current_revision(db: &Db) -> Result<i64> {
    let mut rev = latest_revision(db)?.max(1);
    let meta = db.root().bucket(META_BUCKET).map_err(|e| Error::Invalid(e.to_string()))?;
    if let Some(meta) = meta {
        for k in [&b"finishedCompactRev"[..], SCHEDULED_COMPACT_KEY] {
            if let Some(Value::Data(v)) = meta.get(k).map_err(|e| Error::Invalid(e.to_string()))? {
                rev = rev.max(main_of(v).unwrap_or(0));
            }
        }
    }
    Ok(rev)
}

/// [`current_revision`] of a snapshot file (with or without its SHA-256 trailer).
pub fn snapshot_revision(path: &Path) -> Result<i64> {
    let len = std::fs::metadata(path).map_err(Error::io("read", path))?.len();
    let trailer = crate::integrity::TRAILER_LEN as u64;
    let image = if len % 512 == trailer { len - trailer } else { len };
    let db = Db::open_image(path, image).map_err(|e| Error::Invalid(e.to_string()))?;
    current_revision(&db)
}

/// Old and new revision of a bump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bumped {
    pub old: i64,
    pub new: i64,
}

/// Bumps the revision of the etcd database file `db` by `amount` and marks everything up to the
/// new revision compacted; the file is replaced atomically.
pub fn bump_revision(db: &Path, amount: u64) -> Result<Bumped> {
    let old = current_revision(&Db::open(db).map_err(|e| Error::Invalid(e.to_string()))?)?;
    let new = i64::try_from(amount).ok().and_then(|a| old.checked_add(a)).ok_or_else(|| {
        Error::Invalid(format!("revision {old} + {amount} is beyond etcd's largest revision ({})", i64::MAX))
    })?;
    let rev = rev_bytes(new, 0);
    let mut edits = Edits::default();
    edits.put(KEY_BUCKET, &rev, b"");
    edits.put(META_BUCKET, SCHEDULED_COMPACT_KEY, &rev);
    let to_core = |e: WriteError| match e {
        WriteError::Io { action, path, source } => Error::Io { action, path, cause: source },
        e => Error::Invalid(e.to_string()),
    };
    // Usually a commit of the few touched pages, as bbolt makes one; a db of another shape is
    // rewritten whole. Either way the result is checked with the reader.
    if append_commit(db, &edits).map_err(to_core)?.is_none() {
        tracing::debug!(db = %db.display(), "the database's shape needs a full rewrite for the bump");
        rewrite_file(db, &edits).map_err(to_core)?;
    } else {
        let opened = Db::open(db).map_err(|e| Error::Invalid(e.to_string()))?;
        opened.check().map_err(|e| Error::Invalid(format!("the bumped database fails its check: {e}")))?;
    }
    Ok(Bumped { old, new })
}
