//! The database half of `etcdutl snapshot restore`, done natively so that a large snapshot is not
//! hashed, copied and fsynced by etcd's tool a second time after the reset's own check.
//!
//! What the tool does to a db on restore (trim the old members, add the new one, reset the
//! consistent index, as each etcd version sees fit) touches only the small buckets, never `key`.
//! So the reset lets the tool restore a *probe*: the snapshot with `key` emptied ([`write_probe`],
//! a few pages). The tool writes the WAL and snap files of the new member, as it always does, and
//! a restored probe db. [`edits_between`] reads what the tool changed in the probe, the full image
//! is copied in the kernel ([`copy_image`], `copy_file_range`) and read back to hash to the
//! snapshot's trailer ([`verify_copy`]: the snapshot's own checks read the source, not the copy),
//! the same edits are committed into it ([`apply`]), and [`same_outside_key`] confirms that every
//! bucket but `key` now reads exactly as the tool left it in the probe. Anything this cannot express (a nested bucket, a created or
//! dropped bucket, a key written into `key`) is an error, and the caller restores the whole
//! snapshot with the tool instead.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::bbolt::writer::{self, dump_except, Edits};
use crate::bbolt::Db;
use crate::integrity::TRAILER_LEN;
use crate::{Error, Result};

/// etcd's keyspace: the bulk of any db, and untouched by a restore.
pub const KEY_BUCKET: &[u8] = b"key";

fn invalid(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{what} {}: {e}", path.display()))
}

fn io<'p>(action: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> Error + 'p {
    move |cause| Error::Io { action, path: path.to_path_buf(), cause }
}

/// The length of `snapshot`'s bbolt image (the file without etcd's 32-byte sha256 trailer).
fn image_len(snapshot: &Path) -> Result<u64> {
    let len = std::fs::metadata(snapshot).map_err(io("read", snapshot))?.len();
    match len.checked_sub(TRAILER_LEN as u64) {
        Some(n) if n > 0 => Ok(n),
        _ => Err(Error::Invalid(format!("{} is too short to be an etcd snapshot", snapshot.display()))),
    }
}

/// Writes `probe` (a new file): `snapshot`'s image with the `key` bucket emptied, then a sha256
/// trailer over it, as etcd's Snapshot API ends a snapshot.
/// Refused: a snapshot taken while a compaction was under way (its scheduled compaction revision
/// is not the finished one), which etcd 3.4's restore finishes in `key` itself.
pub fn write_probe(snapshot: &Path, probe: &Path) -> Result<()> {
    let db = Db::open_image(snapshot, image_len(snapshot)?).map_err(|e| invalid("cannot read", snapshot, e))?;
    let read = |e| invalid("cannot read", snapshot, e);
    if let Some(meta) = db.root().bucket(b"meta").map_err(read)? {
        let value = |k: &[u8]| -> Result<Option<Vec<u8>>> {
            Ok(match meta.get(k).map_err(read)? {
                Some(crate::bbolt::Value::Data(d)) => Some(d.to_vec()),
                _ => None,
            })
        };
        let scheduled = value(b"scheduledCompactRev")?;
        if scheduled.is_some() && scheduled != value(b"finishedCompactRev")? {
            return Err(Error::Invalid(format!("{} was taken during a compaction", snapshot.display())));
        }
    }
    writer::write_image_emptying(&db, probe, &Edits::default(), &[KEY_BUCKET])
        .map_err(|e| invalid("cannot write the probe", probe, e))?;
    let mut f = std::fs::OpenOptions::new().read(true).append(true).open(probe).map_err(io("open", probe))?;
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = f.read(&mut buf).map_err(io("read", probe))?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
    }
    f.write_all(&sha.finalize()).map_err(io("write", probe))?;
    Ok(())
}

/// What [`copy_image`] copied: the image's length, and the sha256 trailer the snapshot carried
/// when the copy began, which the copy must hash to ([`verify_copy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopiedImage {
    pub len: u64,
    pub trailer: [u8; TRAILER_LEN],
}

/// Copies `snapshot`'s image (without its trailer) into the new file `dest` (mode 0600), in the
/// kernel where it can (`std::io::copy` between files uses `copy_file_range`, which a filesystem
/// may answer by sharing blocks: a reflink, or OpenZFS's block cloning). Not fsynced, and not yet
/// known to be right: [`verify_copy`] reads it back.
pub fn copy_image(snapshot: &Path, dest: &Path) -> Result<CopiedImage> {
    use std::os::unix::fs::FileExt;
    let len = image_len(snapshot)?;
    let src = std::fs::File::open(snapshot).map_err(io("open", snapshot))?;
    let mut trailer = [0u8; TRAILER_LEN];
    src.read_exact_at(&mut trailer, len).map_err(io("read", snapshot))?;
    let mut out =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(dest).map_err(io("create", dest))?;
    let copied = std::io::copy(&mut src.take(len), &mut out).map_err(io("copy into", dest))?;
    if copied != len {
        return Err(Error::Invalid(format!(
            "{} ended after {copied} of {len} bytes while it was copied",
            snapshot.display()
        )));
    }
    Ok(CopiedImage { len, trailer })
}

/// Reads the copy `dest` back and checks that it hashes to the trailer `snapshot` carried (the
/// snapshot's own check compares the same trailer with the snapshot, so the db the member gets is
/// exactly what was checked). Refuses a copy of another length, and one that differs: a faulty
/// kernel copy (a filesystem's block cloning bug) or a snapshot that changed while it was copied.
pub fn verify_copy(snapshot: &Path, dest: &Path, copied: &CopiedImage) -> Result<()> {
    let refuse = |what: String| {
        Error::Invalid(format!(
            "the copy of {} in {} {what}: the filesystem's copy is faulty or the snapshot changed while it was copied; refusing to restore it, nothing was changed",
            snapshot.display(),
            dest.display()
        ))
    };
    let mut f = std::fs::File::open(dest).map_err(io("open", dest))?;
    let on_disk = f.metadata().map_err(io("stat", dest))?.len();
    if on_disk != copied.len {
        return Err(refuse(format!("holds {on_disk} bytes instead of {}", copied.len)));
    }
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io("read", dest)(e)),
        };
        sha.update(&buf[..n]);
    }
    let actual: [u8; TRAILER_LEN] = sha.finalize().into();
    if actual != copied.trailer {
        return Err(refuse(format!(
            "hashes to sha256 {}, not the snapshot's {}",
            hex::encode(actual),
            hex::encode(copied.trailer)
        )));
    }
    Ok(())
}

type Entries = std::collections::BTreeMap<(Vec<u8>, Vec<u8>), Vec<u8>>;

/// The top-level buckets of `db` (name with sequence) and their keys, `key`'s contents left out.
fn entries(db: &Db) -> Result<(Vec<Vec<u8>>, Entries)> {
    let all = dump_except(db, &[KEY_BUCKET]).map_err(|e| invalid("cannot read", db.path(), e))?;
    let (mut buckets, mut keys) = (Vec::new(), Entries::new());
    for (path, key, value) in all {
        match (path.as_slice(), value) {
            ([], None) => buckets.push(key),
            ([bucket], Some(v)) => {
                keys.insert((bucket.clone(), key), v);
            }
            _ => {
                return Err(Error::Invalid(format!(
                    "{} has nested buckets, which etcd does not make",
                    db.path().display()
                )))
            }
        }
    }
    Ok((buckets, keys))
}

/// The puts and deletes that turn `before`'s top-level buckets into `after`'s, `key` aside.
/// Refused: buckets created, dropped or re-sequenced, nested buckets, and keys in `after`'s
/// `key` bucket (what a restore never does).
pub fn edits_between(before: &Db, after: &Db) -> Result<Edits> {
    let (b_buckets, b_keys) = entries(before)?;
    let (a_buckets, a_keys) = entries(after)?;
    if b_buckets != a_buckets {
        return Err(Error::Invalid(format!("the restore changed the set of buckets in {}", after.path().display())));
    }
    let key_bucket = after.root().bucket(KEY_BUCKET).map_err(|e| invalid("cannot read", after.path(), e))?;
    if let Some(b) = key_bucket {
        if b.last().map_err(|e| invalid("cannot read", after.path(), e))?.is_some() {
            return Err(Error::Invalid(format!("the restore wrote keys into {}", after.path().display())));
        }
    }
    let mut edits = Edits::default();
    for ((bucket, key), value) in &a_keys {
        if b_keys.get(&(bucket.clone(), key.clone())) != Some(value) {
            edits.put(bucket, key, value);
        }
    }
    for (bucket, key) in b_keys.keys() {
        if !a_keys.contains_key(&(bucket.clone(), key.clone())) {
            edits.delete(bucket, key);
        }
    }
    Ok(edits)
}

/// Commits `edits` into the bbolt file `db`: as one appended commit when the touched buckets
/// allow it (milliseconds), else by rewriting the file.
pub fn apply(db: &Path, edits: &Edits) -> Result<()> {
    let to_core = |e| invalid("cannot edit", db, e);
    if writer::append_commit(db, edits).map_err(to_core)?.is_none() {
        tracing::debug!(db = %db.display(), "the restore's edits need a full rewrite");
        writer::rewrite_file(db, edits).map_err(|e| invalid("cannot rewrite", db, e))?;
    }
    Ok(())
}

/// Whether every bucket of `a` but `key` reads exactly as in `b` (names, sequences, keys, values).
pub fn same_outside_key(a: &Db, b: &Db) -> Result<bool> {
    Ok(entries(a)? == entries(b)?)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::bbolt::testdb::Builder;
    use crate::bbolt::NO_FREELIST;

    /// An etcd-shaped db written by our writer from `edits`, with a sha256 trailer, at `dir/name`.
    fn snapshot(dir: &Path, name: &str, edits: &Edits) -> PathBuf {
        let mut b = Builder::new(4096);
        let root = b.leaf(&[]);
        let empty = Db::from_bytes("empty.db", b.finish(root, NO_FREELIST), None).unwrap();
        let image = dir.join(format!("{name}.image"));
        writer::write_image(&empty, &image, edits).unwrap();
        let mut bytes = std::fs::read(&image).unwrap();
        let sum = Sha256::digest(&bytes);
        bytes.extend_from_slice(&sum);
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn etcd_like() -> Edits {
        let mut e = Edits::default();
        for i in 0..300u32 {
            e.put(KEY_BUCKET, format!("rev-{i:05}").as_bytes(), &[i as u8; 1000]);
        }
        e.put(b"meta", b"consistent_index", &7u64.to_be_bytes());
        e.put(b"members", b"aaaa", b"{\"old\":1}").put(b"members", b"bbbb", b"{\"old\":2}");
        e.put(b"members_removed", b"cccc", b"removed");
        e
    }

    fn image_of(p: &Path) -> Db {
        Db::open_image(p, image_len(p).unwrap()).unwrap()
    }

    #[test]
    fn the_probe_is_everything_but_the_keys_with_a_valid_trailer() {
        let dir = tempfile::tempdir().unwrap();
        let snap = snapshot(dir.path(), "snap.db", &etcd_like());
        let probe = dir.path().join("probe.db");
        write_probe(&snap, &probe).unwrap();
        crate::status::check(&probe).expect("the probe's trailer and structure check out");
        let (p, s) = (image_of(&probe), image_of(&snap));
        assert!(p.root().bucket(KEY_BUCKET).unwrap().expect("key stays a bucket").last().unwrap().is_none());
        assert_eq!(entries(&p).unwrap(), entries(&s).unwrap());
        assert!(std::fs::metadata(&probe).unwrap().len() * 4 < std::fs::metadata(&snap).unwrap().len());
    }

    #[test]
    fn a_snapshot_taken_during_a_compaction_gets_no_probe() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = etcd_like();
        e.put(b"meta", b"scheduledCompactRev", b"5").put(b"meta", b"finishedCompactRev", b"4");
        let snap = snapshot(dir.path(), "mid.db", &e);
        let err = write_probe(&snap, &dir.path().join("p1")).unwrap_err();
        assert!(err.to_string().contains("during a compaction"), "{err}");
        e.put(b"meta", b"finishedCompactRev", b"5");
        let snap = snapshot(dir.path(), "done.db", &e);
        write_probe(&snap, &dir.path().join("p2")).unwrap();
    }

    #[test]
    fn what_the_tool_changed_in_the_probe_is_carried_into_the_full_image() {
        let dir = tempfile::tempdir().unwrap();
        let snap = snapshot(dir.path(), "snap.db", &etcd_like());
        let probe = dir.path().join("probe.db");
        write_probe(&snap, &probe).unwrap();
        // What a restore tool does: members replaced, removed members dropped, a new index.
        let mut tool = Edits::default();
        tool.delete(b"members", b"aaaa").delete(b"members", b"bbbb").put(b"members", b"dddd", b"{\"new\":1}");
        tool.delete(b"members_removed", b"cccc");
        tool.put(b"meta", b"consistent_index", &1u64.to_be_bytes()).put(b"meta", b"term", &1u64.to_be_bytes());
        let restored = dir.path().join("restored.db");
        writer::write_image(&image_of(&probe), &restored, &tool).unwrap();
        let after = Db::open(&restored).unwrap();

        let edits = edits_between(&image_of(&probe), &after).unwrap();
        let full = dir.path().join("full.db");
        let copied = copy_image(&snap, &full).unwrap();
        assert_eq!(copied.len, image_len(&snap).unwrap());
        verify_copy(&snap, &full, &copied).unwrap();
        apply(&full, &edits).unwrap();
        let full_db = Db::open(&full).unwrap();
        full_db.check().unwrap();
        assert!(same_outside_key(&full_db, &after).unwrap());
        let keys = |db: &Db| {
            writer::dump(db)
                .unwrap()
                .into_iter()
                .filter(|(p, ..)| p.first().is_some_and(|b| b == KEY_BUCKET))
                .collect::<Vec<_>>()
        };
        let original = keys(&image_of(&snap));
        assert_eq!(original.len(), 300);
        assert_eq!(keys(&full_db), original, "the keys are the snapshot's");
        // Without the edits, the copy does not read as the tool's result.
        let untouched = dir.path().join("untouched.db");
        copy_image(&snap, &untouched).unwrap();
        assert!(!same_outside_key(&Db::open(&untouched).unwrap(), &after).unwrap());
    }

    #[test]
    fn a_tool_that_adds_buckets_or_keys_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let snap = snapshot(dir.path(), "snap.db", &etcd_like());
        let probe = dir.path().join("probe.db");
        write_probe(&snap, &probe).unwrap();
        for (i, (bucket, key)) in [(&b"extra"[..], &b"k"[..]), (KEY_BUCKET, &b"rev-x"[..])].into_iter().enumerate() {
            let mut tool = Edits::default();
            tool.put(bucket, key, b"v");
            let restored = dir.path().join(format!("restored-{i}.db"));
            writer::write_image(&image_of(&probe), &restored, &tool).unwrap();
            assert!(edits_between(&image_of(&probe), &Db::open(&restored).unwrap()).is_err());
        }
    }

    /// Issue 26.8: the copy the member gets was never read back. A copy that differs from the
    /// snapshot after the copy (a byte flipped, as a faulty block clone serves it, or cut short)
    /// is refused naming both files.
    #[test]
    fn a_copy_that_differs_from_the_snapshot_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let snap = snapshot(dir.path(), "snap.db", &etcd_like());
        let good = dir.path().join("good.db");
        let copied = copy_image(&snap, &good).unwrap();
        verify_copy(&snap, &good, &copied).unwrap();

        let flipped = dir.path().join("flipped.db");
        let copied = copy_image(&snap, &flipped).unwrap();
        let mut bytes = std::fs::read(&flipped).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x40;
        std::fs::write(&flipped, &bytes).unwrap();
        let err = verify_copy(&snap, &flipped, &copied).unwrap_err().to_string();
        assert!(err.contains("hashes to sha256") && err.contains(&hex::encode(copied.trailer)), "{err}");
        assert!(err.contains(&snap.display().to_string()) && err.contains(&flipped.display().to_string()), "{err}");

        let short = dir.path().join("short.db");
        let copied = copy_image(&snap, &short).unwrap();
        std::fs::OpenOptions::new().write(true).open(&short).unwrap().set_len(copied.len - 4096).unwrap();
        let err = verify_copy(&snap, &short, &copied).unwrap_err().to_string();
        assert!(err.contains(&format!("holds {} bytes instead of {}", copied.len - 4096, copied.len)), "{err}");
    }
}
