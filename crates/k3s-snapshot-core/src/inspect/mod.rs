//! Reading single objects out of an etcd database image without restoring it (`etcd-snapshot
//! inspect`): the key space at a revision ([`state`]), every version of one key that the image
//! still holds ([`history`]), a value by its revision ([`value_at`]), and what the values mean to
//! Kubernetes ([`k8s`]: the key's resource, namespace and name; the `k8s\0` protobuf envelope
//! decoded through compiled descriptors, [`proto`]; values encrypted at rest, [`at_rest`]).
//!
//! etcd's `key` bucket is keyed by revision (8-byte big-endian main, `_`, 8-byte big-endian sub,
//! a trailing `t` for a tombstone), each value an `mvccpb.KeyValue`. The state at revision `R` is,
//! for each key, its newest entry at or below `R`, unless that entry is a tombstone. Compaction
//! removes older revisions, so a state below the compacted revision may miss keys that were live
//! then; [`Scan::compacted`] says where that line is.
//!
//! Memory: the walk goes through the bucket page by page (the reader's resident window bounds
//! what stays mapped) and keeps, per key, only an [`Entry`] (revision, version, lease, value
//! length); values are read again by revision when they are printed or compared, so the
//! footprint grows with the number of keys, never with the bytes of the values.

pub mod at_rest;
pub mod k8s;
#[cfg(feature = "etcd")]
pub mod live;
pub mod proto;

use std::collections::BTreeMap;

use crate::bbolt::{BoltError, Bucket, Db, Value};
use crate::{Error, Result};

const KEY_BUCKET: &[u8] = b"key";
const META_BUCKET: &[u8] = b"meta";

/// Where a key's entry is and what etcd recorded about it; the value itself stays in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The revision that wrote it (its mod revision) and the sub revision inside that revision.
    pub revision: i64,
    pub sub: i64,
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
    pub value_len: u64,
}

impl Entry {
    fn of(revision: i64, sub: i64, kv: &KvRef<'_>) -> Entry {
        Entry {
            revision,
            sub,
            create_revision: kv.create_revision,
            version: kv.version,
            lease: kv.lease,
            value_len: kv.value.len() as u64,
        }
    }
}

/// One version of a key, from [`history`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    pub entry: Entry,
    /// A delete (the key was removed at `entry.revision`).
    pub tombstone: bool,
}

/// The live keys at a revision.
#[derive(Debug, Default)]
pub struct Scan {
    /// The revision the state is at (the image's newest when none was asked for).
    pub revision: i64,
    /// The image's newest revision.
    pub newest: i64,
    /// Revisions at or below this were compacted: only their newest entry per key remains.
    pub compacted: i64,
    pub keys: BTreeMap<Vec<u8>, Entry>,
}

/// An `mvccpb.KeyValue` read in place (the value is a slice of the image).
#[derive(Debug, Default, Clone, Copy)]
pub struct KvRef<'a> {
    pub key: &'a [u8],
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub value: &'a [u8],
    pub lease: i64,
}

/// Decodes an `mvccpb.KeyValue` without copying its value (fields 1 key, 2 create_revision,
/// 3 mod_revision, 4 version, 5 value, 6 lease; others skipped as protobuf allows).
pub fn parse_kv(mut buf: &[u8]) -> std::result::Result<KvRef<'_>, String> {
    use prost::encoding::decode_varint;
    let mut kv = KvRef::default();
    while !buf.is_empty() {
        let tag = decode_varint(&mut buf).map_err(|e| e.to_string())?;
        let (field, wire) = (tag >> 3, tag & 7);
        match wire {
            0 => {
                let v = decode_varint(&mut buf).map_err(|e| e.to_string())? as i64;
                match field {
                    2 => kv.create_revision = v,
                    3 => kv.mod_revision = v,
                    4 => kv.version = v,
                    6 => kv.lease = v,
                    _ => {}
                }
            }
            2 => {
                let len = decode_varint(&mut buf).map_err(|e| e.to_string())?;
                let len = usize::try_from(len).ok().filter(|&l| l <= buf.len()).ok_or("length runs past the end")?;
                let (bytes, rest) = buf.split_at(len);
                buf = rest;
                match field {
                    1 => kv.key = bytes,
                    5 => kv.value = bytes,
                    _ => {}
                }
            }
            1 if buf.len() >= 8 => buf = &buf[8..],
            5 if buf.len() >= 4 => buf = &buf[4..],
            w => return Err(format!("wire type {w} of field {field} cannot be read")),
        }
    }
    Ok(kv)
}

/// A revision key: (main, sub, tombstone).
pub fn parse_revision_key(k: &[u8]) -> Option<(i64, i64, bool)> {
    if !(k.len() == 17 || (k.len() == 18 && k[17] == b't')) || k[8] != b'_' {
        return None;
    }
    let main = i64::from_be_bytes(k[..8].try_into().ok()?);
    let sub = i64::from_be_bytes(k[9..17].try_into().ok()?);
    Some((main, sub, k.len() == 18))
}

fn invalid(db: &Db, detail: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{}: {detail}", db.path().display()))
}

fn key_bucket(db: &Db) -> Result<Bucket<'_>> {
    db.root()
        .bucket(KEY_BUCKET)
        .map_err(|e| invalid(db, e))?
        .ok_or_else(|| invalid(db, "no `key` bucket: not an etcd v3 database"))
}

/// The compacted revision recorded in `meta` (0 when none).
pub fn compacted_revision(db: &Db) -> Result<i64> {
    let Some(meta) = db.root().bucket(META_BUCKET).map_err(|e| invalid(db, e))? else { return Ok(0) };
    Ok(match meta.get(b"finishedCompactRev").map_err(|e| invalid(db, e))? {
        Some(Value::Data(v)) => crate::revision::main_of(v).unwrap_or(0),
        _ => 0,
    })
}

enum Walk {
    Bolt(BoltError),
    Bad(String),
    Stop,
}

impl From<BoltError> for Walk {
    fn from(e: BoltError) -> Self {
        Walk::Bolt(e)
    }
}

/// Calls `f` for every revision entry of the `key` bucket up to `at` (all when `None`), in
/// revision order, with the decoded `KeyValue` and whether it is a tombstone.
fn walk(db: &Db, at: Option<i64>, mut f: impl FnMut(i64, i64, bool, KvRef<'_>)) -> Result<()> {
    let bucket = key_bucket(db)?;
    let r = bucket.for_each(|k, v| {
        let Value::Data(v) = v else { return Err(Walk::Bad("the `key` bucket holds a nested bucket".into())) };
        let Some((main, sub, tomb)) = parse_revision_key(k) else {
            return Err(Walk::Bad(format!("a key of the `key` bucket is not a revision ({} bytes)", k.len())));
        };
        if at.is_some_and(|at| main > at) {
            return Err(Walk::Stop);
        }
        let kv =
            parse_kv(v).map_err(|e| Walk::Bad(format!("revision {main}.{sub}: the KeyValue does not decode: {e}")))?;
        f(main, sub, tomb, kv);
        Ok(())
    });
    match r {
        Ok(()) | Err(Walk::Stop) => Ok(()),
        Err(Walk::Bolt(e)) => Err(invalid(db, e)),
        Err(Walk::Bad(m)) => Err(invalid(db, m)),
    }
}

/// The live keys under `prefix` at revision `at` (the newest state when `None`).
pub fn state(db: &Db, at: Option<i64>, prefix: &[u8]) -> Result<Scan> {
    let newest = crate::revision::latest_revision(db)?;
    let compacted = compacted_revision(db)?;
    let mut keys: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
    walk(db, at, |main, sub, tomb, kv| {
        if !kv.key.starts_with(prefix) {
            return;
        }
        if tomb {
            keys.remove(kv.key);
            return;
        }
        let e = Entry::of(main, sub, &kv);
        match keys.get_mut(kv.key) {
            Some(slot) => *slot = e,
            None => {
                keys.insert(kv.key.to_vec(), e);
            }
        }
    })?;
    Ok(Scan { revision: at.map_or(newest, |a| a.min(newest)), newest, compacted, keys })
}

/// Every version of `key` the image holds, oldest first (up to `at` when given).
pub fn history(db: &Db, key: &[u8], at: Option<i64>) -> Result<Vec<Version>> {
    let mut out = Vec::new();
    walk(db, at, |main, sub, tomb, kv| {
        if kv.key == key {
            out.push(Version { entry: Entry::of(main, sub, &kv), tombstone: tomb });
        }
    })?;
    Ok(out)
}

/// The value written at `entry`'s revision, read from the image.
pub fn value_at<'a>(db: &'a Db, entry: &Entry) -> Result<&'a [u8]> {
    let bucket = key_bucket(db)?;
    let rk = crate::revision::rev_bytes(entry.revision, entry.sub);
    match bucket.get(&rk).map_err(|e| invalid(db, e))? {
        Some(Value::Data(v)) => {
            Ok(parse_kv(v).map_err(|e| invalid(db, format!("revision {}: {e}", entry.revision)))?.value)
        }
        _ => Err(invalid(db, format!("revision {}.{} is not in the `key` bucket", entry.revision, entry.sub))),
    }
}

/// How a key differs between two states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Added,
    Removed,
    Changed,
}

/// Merges two sorted key lists, calling `f` with each key that differs and how. `same` says
/// whether a key present on both sides holds the same value.
pub fn diff_sorted<'k, A: 'k, B: 'k>(
    a: impl IntoIterator<Item = (&'k Vec<u8>, &'k A)>,
    b: impl IntoIterator<Item = (&'k Vec<u8>, &'k B)>,
    mut same: impl FnMut(&[u8], &A, &B) -> Result<bool>,
    mut f: impl FnMut(&[u8], Change) -> Result<()>,
) -> Result<()> {
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return Ok(()),
            (Some((ka, _)), None) => {
                f(ka, Change::Removed)?;
                a.next();
            }
            (None, Some((kb, _))) => {
                f(kb, Change::Added)?;
                b.next();
            }
            (Some((ka, ea)), Some((kb, eb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    f(ka, Change::Removed)?;
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    f(kb, Change::Added)?;
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if !same(ka, ea, eb)? {
                        f(ka, Change::Changed)?;
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
}

/// What two values are compared by: the SHA-256 of the value, or of its plaintext when it is
/// encrypted at rest and `keys` decrypts it (the API server encrypts with a fresh IV or nonce
/// each time, so equal objects differ as ciphertext).
pub fn fingerprint(value: &[u8], keys: Option<&at_rest::KeyRing>) -> [u8; 32] {
    use sha2::Digest;
    let plain = at_rest::envelope(value).and_then(|env| keys.and_then(|k| k.decrypt(&env).ok()));
    sha2::Sha256::digest(plain.as_deref().unwrap_or(value)).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revision_keys_parse_and_refuse_other_shapes() {
        let mut k = crate::revision::rev_bytes(5, 2).to_vec();
        assert_eq!(parse_revision_key(&k), Some((5, 2, false)));
        k.push(b't');
        assert_eq!(parse_revision_key(&k), Some((5, 2, true)));
        k[17] = b'x';
        assert_eq!(parse_revision_key(&k), None);
        assert_eq!(parse_revision_key(b"short"), None);
    }

    #[test]
    fn keyvalue_parse_matches_prost_and_refuses_a_length_past_the_end() {
        use prost::Message;
        let kv = crate::delta::KeyValue {
            key: b"/registry/a".to_vec(),
            create_revision: 3,
            mod_revision: 9,
            version: 4,
            value: vec![7; 300],
            lease: 11,
        };
        let bytes = kv.encode_to_vec();
        let r = parse_kv(&bytes).unwrap();
        assert_eq!(
            (r.key, r.create_revision, r.mod_revision, r.version, r.value, r.lease),
            (&kv.key[..], 3, 9, 4, &kv.value[..], 11)
        );
        assert!(parse_kv(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn diff_reports_added_removed_and_changed_in_key_order() {
        let a: BTreeMap<Vec<u8>, u8> = [(b"a".to_vec(), 1), (b"b".to_vec(), 1), (b"c".to_vec(), 1)].into();
        let b: BTreeMap<Vec<u8>, u8> = [(b"b".to_vec(), 2), (b"c".to_vec(), 1), (b"d".to_vec(), 1)].into();
        let mut got = Vec::new();
        diff_sorted(
            &a,
            &b,
            |_, x, y| Ok(x == y),
            |k, c| {
                got.push((k.to_vec(), c));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(
            got,
            vec![(b"a".to_vec(), Change::Removed), (b"b".to_vec(), Change::Changed), (b"d".to_vec(), Change::Added)]
        );
    }
}
