//! The native replay of delta segments: a chain's events written straight into the `key` bucket
//! of a restored db, as etcd itself would have written them, in one bbolt commit
//! ([`crate::bbolt::append::Appender`]).
//!
//! etcd keeps every revision of every key in `key`, keyed by revision: 8 bytes of main revision
//! (big-endian), `_`, 8 bytes of sub revision (the change's place in its transaction), and a
//! trailing `t` for a deletion's tombstone. A put's value is the `mvccpb.KeyValue` etcd holds (the
//! one its watch delivered, re-encoded field by field as etcd encodes it); a tombstone's is a
//! `KeyValue` with only the key. A revision's events come from the watch in sub-revision order,
//! and a chain's revisions in order, so the whole chain is an append at the right edge of that
//! tree. etcd rebuilds its index from `key` when it starts, as after any restore, so nothing else
//! describes the keys. `meta` (the consistent index etcd's restore tool set) is left as the tool
//! left it.
//!
//! Leases: a put's lease that the db does not know (granted after the snapshot) is added to
//! `lease` with its original id and a TTL of `lease_ttl`, in the same commit, as the private-etcd
//! replay grants it again: its keys stay leased and expire unless an owner keeps it alive.
//!
//! What this cannot express returns [`Outcome::Unsupported`] and the caller replays on a private
//! etcd instead: a db whose root bucket spans several pages, a `key` bucket holding a nested
//! bucket, a persisted freelist that fails its check, a `lease` bucket holding a nested bucket.
//! A damaged segment, a gap, or a db that already holds a revision of the chain is an error:
//! nothing is committed, and the db reads as before.

use std::collections::HashSet;
use std::path::Path;

use prost::Message;

use crate::bbolt::append::Appender;
use crate::bbolt::writer::{Edits, WriteError};
use crate::bbolt::Db;
use crate::delta::{self, KeyValue, DELETE};
use crate::{Error, Result};

/// etcd's bucket of revisions.
pub const KEY_BUCKET: &[u8] = b"key";
/// etcd's bucket of leases (id, 8 bytes big-endian → `leasepb.Lease`).
pub const LEASE_BUCKET: &[u8] = b"lease";
/// The fill percent etcd appends to `key` with (bbolt's, for sequential puts).
const FILL: f64 = 0.9;

/// `leasepb.Lease`.
#[derive(Clone, PartialEq, Message)]
pub struct Lease {
    #[prost(int64, tag = "1")]
    pub id: i64,
    #[prost(int64, tag = "2")]
    pub ttl: i64,
    #[prost(int64, tag = "3")]
    pub remaining_ttl: i64,
}

/// What a native replay wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Revisions written (`reached - base`).
    pub revisions: u64,
    /// Events written (keys added to `key`).
    pub events: u64,
    /// Leases added to `lease`.
    pub leases: Vec<i64>,
    /// Bytes of the db after the commit.
    pub db_bytes: u64,
}

/// The result of [`replay`].
#[derive(Debug)]
pub enum Outcome {
    Replayed(Replayed),
    /// The db has a shape this does not write into (why); nothing was changed.
    Unsupported(String),
}

/// etcd's key of revision `main`.`sub` in the `key` bucket (with the tombstone mark).
pub fn revision_key(main: i64, sub: u64, tombstone: bool) -> Vec<u8> {
    let mut k = Vec::with_capacity(18);
    k.extend_from_slice(&main.to_be_bytes());
    k.push(b'_');
    k.extend_from_slice(&sub.to_be_bytes());
    if tombstone {
        k.push(b't');
    }
    k
}

fn invalid(db: &Path, e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("replaying into {}: {e}", db.display()))
}

/// Writes the revisions `base + 1 ..= reached` of `segments` (plaintext, verified, in order; they
/// may overlap) into the db at `db`, whose newest revision must be `base`, in one commit.
pub fn replay(db: &Path, base: i64, reached: i64, segments: &[&Path], lease_ttl: i64) -> Result<Outcome> {
    let known: HashSet<i64> = {
        let d = Db::open(db).map_err(|e| invalid(db, e))?;
        let mut ids = HashSet::new();
        if let Some(b) = d.root().bucket(LEASE_BUCKET).map_err(|e| invalid(db, e))? {
            let mut nested = false;
            b.for_each(|k, v| -> std::result::Result<(), crate::bbolt::BoltError> {
                match v {
                    crate::bbolt::Value::Data(_) if k.len() == 8 => {
                        ids.insert(i64::from_be_bytes(k.try_into().expect("8 bytes")));
                    }
                    crate::bbolt::Value::Data(_) => {}
                    crate::bbolt::Value::Bucket(_) => nested = true,
                }
                Ok(())
            })
            .map_err(|e| invalid(db, e))?;
            if nested {
                return Ok(Outcome::Unsupported("its lease bucket holds a nested bucket".into()));
            }
        }
        ids
    };
    let mut app = match Appender::open(db, KEY_BUCKET, FILL).map_err(|e| invalid(db, e))? {
        Ok(a) => a,
        Err(why) => return Ok(Outcome::Unsupported(why)),
    };
    if let Some(last) = app.last_key() {
        let main = last.get(..8).map_or(0, |b| i64::from_be_bytes(b.try_into().expect("8 bytes")));
        if main > base {
            return Err(invalid(db, format!("it already holds revision {main}, after the chain's base {base}")));
        }
    }
    let mut leases: Vec<i64> = Vec::new();
    let mut new_leases: HashSet<i64> = HashSet::new();
    // The revision being written and the next sub revision in it.
    let (mut rev, mut sub) = (base, 0u64);
    let mut events = 0u64;
    for path in segments {
        if rev >= reached {
            break;
        }
        // Segments may overlap where one node's ends inside another's: what a segment repeats
        // of revisions already written is skipped (a revision is never split between segments).
        let done = rev;
        let mut failure: Option<WriteError> = None;
        delta::read_events_while(path, |ev| {
            let r = ev.revision();
            if r <= done {
                return Ok(true);
            }
            if r > reached {
                return Ok(false);
            }
            if r == rev + 1 {
                rev = r;
                sub = 0;
            } else if r != rev {
                return Err(format!("revision {r} follows {rev}: a gap"));
            }
            let kv = ev.kv.expect("read_events checks kv");
            let tombstone = ev.r#type == DELETE;
            let value = if tombstone {
                KeyValue { key: kv.key, ..KeyValue::default() }.encode_to_vec()
            } else {
                if kv.lease != 0 && !known.contains(&kv.lease) && new_leases.insert(kv.lease) {
                    leases.push(kv.lease);
                }
                kv.encode_to_vec()
            };
            if let Err(e) = app.push(revision_key(r, sub, tombstone), value) {
                failure = Some(e);
                return Ok(false);
            }
            sub += 1;
            events += 1;
            Ok(true)
        })?;
        if let Some(e) = failure {
            return Err(invalid(db, e));
        }
    }
    if rev != reached {
        return Err(invalid(db, format!("the segments end at revision {rev}, not {reached}")));
    }
    if events == 0 {
        return Ok(Outcome::Replayed(Replayed::default()));
    }
    let mut others = Edits::default();
    for id in &leases {
        let lease = Lease { id: *id, ttl: lease_ttl, remaining_ttl: 0 };
        others.put(LEASE_BUCKET, &id.to_be_bytes(), &lease.encode_to_vec());
    }
    let written = app.commit(&others).map_err(|e| invalid(db, e))?;
    Ok(Outcome::Replayed(Replayed { revisions: (reached - base) as u64, events, leases, db_bytes: written.size }))
}
