//! Feeds random event sequences to the native replay of delta segments and checks it against a
//! second, independent writer.
//!
//! The input drives a small model of etcd's keyspace: puts (creates and overwrites, small values
//! and values larger than a page, with or without one of a few leases), deletes, a DeleteRange of
//! every live key under a prefix in one revision, and transactions of several puts in one
//! revision, each revision numbered and each key given the create revision and version etcd would
//! give it. The chain is cut into one to three segments (some overlapping, as two nodes' segments
//! can) and replayed into a copy of a real etcd 3.5.1 snapshot with
//! [`delta_replay::replay`]; the same revisions are written into another copy by the whole-image
//! rewriter ([`write_image`] with edits), which shares no code with the appender's page building.
//! Both must pass the structure check and hold exactly the same entries in every bucket; the
//! appender's db must hold every revision the model wrote. Revisions the segments do not reach,
//! or a db that already holds a revision of the chain, must be refused with the db unchanged.
#![no_main]

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use k3s_snapshot_core::bbolt::writer::{dump, write_image, Edits};
use k3s_snapshot_core::bbolt::Db;
use k3s_snapshot_core::delta::{Event, KeyValue, SegmentWriter, DELETE, PUT};
use k3s_snapshot_core::delta_replay::{self, revision_key, Lease, Outcome, KEY_BUCKET, LEASE_BUCKET};
use libfuzzer_sys::fuzz_target;
use prost::Message;

const BASE: &[u8] = include_bytes!("../seeds/snapshot_reader/etcd-3.5.1-small.db");
const LEASE_TTL: i64 = 60;

/// Bytes of input, read one at a time; zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
}

/// etcd's keyspace: live keys with create revision, version and lease.
#[derive(Default)]
struct Model {
    live: BTreeMap<Vec<u8>, (i64, i64)>,
    /// The chain: one list of events per revision.
    revisions: Vec<Vec<Event>>,
}

impl Model {
    fn put(&mut self, rev: i64, key: Vec<u8>, value: Vec<u8>, lease: i64) -> Event {
        let (create, version) = match self.live.get(&key) {
            Some(&(c, v)) => (c, v + 1),
            None => (rev, 1),
        };
        self.live.insert(key.clone(), (create, version));
        let kv = KeyValue { key, create_revision: create, mod_revision: rev, version, value, lease };
        Event { r#type: PUT, kv: Some(kv) }
    }

    fn delete(&mut self, rev: i64, key: Vec<u8>) -> Event {
        self.live.remove(&key);
        Event { r#type: DELETE, kv: Some(KeyValue { key, mod_revision: rev, ..KeyValue::default() }) }
    }
}

fn key(i: u8) -> Vec<u8> {
    format!("/registry/{}/k{}", ["pods", "secrets", "leases"][(i % 3) as usize], i % 24).into_bytes()
}

fn value(input: &mut Input, rev: i64) -> Vec<u8> {
    let len = match input.byte() {
        b if b > 250 => 5000 + (b as usize) * 16, // larger than a page: an overflow value
        b => b as usize,
    };
    let mut v = format!("r{rev}:").into_bytes();
    v.resize(len.max(v.len()), b'v');
    v
}

/// The events of the chain after `base`, as many revisions as the input gives (at most 300).
fn chain(input: &mut Input, base: i64) -> Model {
    let mut m = Model::default();
    let mut rev = base;
    while !input.0.is_empty() && m.revisions.len() < 300 {
        let op = input.byte();
        let next = rev + 1;
        let events = match op % 6 {
            0 | 1 => {
                let (k, lease) = (key(input.byte()), [0, 0, 0x11, 0x22][(input.byte() % 4) as usize]);
                let v = value(input, next);
                vec![m.put(next, k, v, lease)]
            }
            2 => {
                let k = key(input.byte());
                if !m.live.contains_key(&k) {
                    continue; // etcd does not bump the revision for a delete of nothing
                }
                vec![m.delete(next, k)]
            }
            3 => {
                // DeleteRange of a prefix: every live key under it, in key order, one revision.
                let prefix = key(input.byte());
                let prefix = &prefix[..prefix.iter().rposition(|&b| b == b'/').unwrap_or(0) + 1];
                let doomed: Vec<Vec<u8>> = m.live.keys().filter(|k| k.starts_with(prefix)).cloned().collect();
                if doomed.is_empty() {
                    continue;
                }
                doomed.into_iter().map(|k| m.delete(next, k)).collect()
            }
            _ => {
                // A transaction of distinct puts (etcd refuses duplicate keys in one txn).
                let n = 1 + input.byte() % 12;
                let mut seen = HashSet::new();
                let mut evs = Vec::new();
                for _ in 0..n {
                    let k = key(input.byte());
                    if seen.insert(k.clone()) {
                        let v = value(input, next);
                        evs.push(m.put(next, k, v, 0));
                    }
                }
                evs
            }
        };
        rev = next;
        m.revisions.push(events);
    }
    m
}

/// Writes revisions `base + 1 + from ..= base + to` (1-based, inclusive) as one segment.
fn segment(dir: &Path, m: &Model, from: usize, to: usize, node: &str) -> PathBuf {
    let mut w = SegmentWriter::create(dir, node, None).expect("segment");
    for evs in &m.revisions[from..to] {
        for e in evs {
            w.append(e).expect("append");
        }
    }
    w.finish(node, 1_700_000_000, None).expect("finish").1
}

fn newest_revision(db: &Db) -> i64 {
    let mut last = 0;
    let key = db.root().bucket(KEY_BUCKET).expect("key bucket").expect("etcd's key bucket");
    key.for_each(|k, _| {
        last = i64::from_be_bytes(k[..8].try_into().expect("8 bytes"));
        Ok::<_, k3s_snapshot_core::bbolt::BoltError>(())
    })
    .expect("walk key");
    last
}

/// A refused replay leaves the db as it was: every page up to its high-water mark byte for byte,
/// and the file's length (bytes past the high-water mark belong to no page, as etcdctl's
/// checksum trailer after a snapshot's last page, and may be overwritten before the refusal).
fn assert_same_db(before: &[u8], after: &[u8]) {
    let db = Db::from_bytes(Path::new("before.db"), before.to_vec(), None).expect("opens");
    let hwm = (db.meta().pgid * u64::from(db.page_size())) as usize;
    assert_eq!(before.len(), after.len(), "a refused replay changed the db's length");
    assert!(before[..hwm] == after[..hwm], "a refused replay changed a page of the db");
}

fn known_leases(db: &Db) -> HashSet<i64> {
    let mut ids = HashSet::new();
    if let Some(b) = db.root().bucket(LEASE_BUCKET).expect("lease bucket") {
        b.for_each(|k, _| {
            ids.insert(i64::from_be_bytes(k.try_into().expect("8 bytes")));
            Ok::<_, k3s_snapshot_core::bbolt::BoltError>(())
        })
        .expect("walk lease");
    }
    ids
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let cuts = (input.byte(), input.byte());
    let base_db = Db::from_bytes(Path::new("base.db"), BASE.to_vec(), None).expect("the seed opens");
    let base = newest_revision(&base_db);
    let m = chain(&mut input, base);
    let n = m.revisions.len();
    if n == 0 {
        return;
    }
    let reached = base + n as i64;
    let scratch = tempfile::Builder::new()
        .prefix("k3s-snapshot-fuzz-replay-")
        .tempdir_in(if Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" })
        .expect("scratch dir");
    let dir = scratch.path();

    // One to three segments; the second may start inside the first (an overlap is skipped).
    let a = 1 + cuts.0 as usize % n;
    let mut segments = vec![segment(dir, &m, 0, a, "a")];
    if a < n {
        let overlap = (cuts.1 as usize % 3).min(a);
        let b = a + 1 + cuts.1 as usize % (n - a);
        segments.push(segment(dir, &m, a - overlap, b.min(n), "b"));
        if b < n {
            segments.push(segment(dir, &m, b, n, "c"));
        }
    }
    let refs: Vec<&Path> = segments.iter().map(PathBuf::as_path).collect();

    // The appender's path.
    let native = dir.join("native.db");
    std::fs::write(&native, BASE).expect("copy the base");

    // Asked for more than the segments hold: refused, and the db unchanged.
    let refused = delta_replay::replay(&native, base, reached + 1, &refs, LEASE_TTL);
    assert!(refused.is_err(), "a replay past the chain's end was accepted");
    assert_same_db(BASE, &std::fs::read(&native).expect("read"));

    match delta_replay::replay(&native, base, reached, &refs, LEASE_TTL).expect("the replay") {
        Outcome::Replayed(r) => assert_eq!(r.revisions, n as u64),
        Outcome::Unsupported(why) => panic!("the seed db is one the native replay must write into: {why}"),
    }

    // Replayed again onto its own result: it already holds the chain's revisions.
    let before = std::fs::read(&native).expect("read");
    assert!(delta_replay::replay(&native, base, reached, &refs, LEASE_TTL).is_err(), "a second replay was accepted");
    assert_same_db(&before, &std::fs::read(&native).expect("read"));

    // The rewriter's path: the same revisions as edits of the base image.
    let mut edits = Edits::default();
    let known = known_leases(&base_db);
    for (i, evs) in m.revisions.iter().enumerate() {
        let rev = base + 1 + i as i64;
        for (sub, e) in evs.iter().enumerate() {
            let kv = e.kv.clone().expect("kv");
            let tombstone = e.r#type == DELETE;
            if !tombstone && kv.lease != 0 && !known.contains(&kv.lease) {
                let lease = Lease { id: kv.lease, ttl: LEASE_TTL, remaining_ttl: 0 };
                edits.put(LEASE_BUCKET, &kv.lease.to_be_bytes(), &lease.encode_to_vec());
            }
            let v = if tombstone { KeyValue { key: kv.key, ..KeyValue::default() } } else { kv };
            edits.put(KEY_BUCKET, &revision_key(rev, sub as u64, tombstone), &v.encode_to_vec());
        }
    }
    let rewritten = dir.join("rewritten.db");
    write_image(&base_db, &rewritten, &edits).expect("the rewriter");

    let (x, y) = (Db::open(&native).expect("native opens"), Db::open(&rewritten).expect("rewritten opens"));
    x.check().expect("the native replay's db passes the structure check");
    y.check().expect("the rewritten db passes the structure check");
    assert_eq!(newest_revision(&x), reached);
    assert!(dump(&x).expect("dump") == dump(&y).expect("dump"), "the native replay and the rewriter disagree");
});
