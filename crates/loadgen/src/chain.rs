//! `loadgen chain`: writes a delta chain straight into segment files, as the server's follower
//! would have shipped it, without an etcd to write through: millions of revisions in a minute
//! instead of hours. Used by `cargo xtask bench --only replay` to time a restore that replays
//! chains of 100,000 to 5,000,000 revisions.
//!
//! Every revision is one event: a put of a `--value-bytes` value to one of `--keys` keys (a
//! create or an overwrite, with the create revision and version etcd would give it) or, every
//! `--delete-every`-th revision, a delete of a key that exists, so that the private-etcd replay,
//! which needs each revision to change something, can replay the same chain. The chain starts
//! right after `--after` (the base snapshot's revision) and is cut into segments of
//! `--segment-revisions` revisions, named in `--history` (etcd's cluster ID, hex).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use k3s_snapshot_core::delta::{Event, KeyValue, SegmentWriter, DELETE, PUT};
use serde_json::json;

pub const USAGE: &str = "  loadgen chain --dir DIR --after REV --revisions N [--segment-revisions N] [--keys N]
                [--value-bytes N] [--delete-every N] [--node NAME] [--history HEX] [--closed UNIX]";

struct Args {
    dir: PathBuf,
    after: i64,
    revisions: i64,
    segment_revisions: i64,
    keys: u64,
    value_bytes: usize,
    delete_every: i64,
    node: String,
    history: Option<u64>,
    closed: i64,
}

fn parse(args: &[String]) -> Result<Args> {
    let mut a = Args {
        dir: PathBuf::new(),
        after: 0,
        revisions: 0,
        segment_revisions: 10_000,
        keys: 50_000,
        value_bytes: 1024,
        delete_every: 10,
        node: "bench".into(),
        history: None,
        closed: 1_700_000_000,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        let int = |what: &str| v.parse::<i64>().with_context(|| format!("{what} takes a whole number, not {v:?}"));
        match flag.as_str() {
            "--dir" => a.dir = v.into(),
            "--after" => a.after = int("--after")?,
            "--revisions" => a.revisions = int("--revisions")?,
            "--segment-revisions" => a.segment_revisions = int("--segment-revisions")?,
            "--keys" => a.keys = int("--keys")? as u64,
            "--value-bytes" => a.value_bytes = int("--value-bytes")? as usize,
            "--delete-every" => a.delete_every = int("--delete-every")?,
            "--node" => a.node = v.clone(),
            "--history" => {
                a.history = Some(u64::from_str_radix(v, 16).with_context(|| format!("--history takes hex, not {v:?}"))?)
            }
            "--closed" => a.closed = int("--closed")?,
            _ => bail!("unknown flag {flag:?}\n{USAGE}"),
        }
    }
    if a.dir.as_os_str().is_empty() || a.after < 1 || a.revisions < 1 || a.segment_revisions < 1 || a.keys < 2 {
        bail!("--dir, --after ≥ 1, --revisions ≥ 1, --segment-revisions ≥ 1 and --keys ≥ 2 are needed\n{USAGE}");
    }
    Ok(a)
}

/// A small deterministic generator (xorshift64*), so every run of the bench replays the same chain.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Keys that exist, with their create revision and version, and a list to pick one at random.
#[derive(Default)]
struct Live {
    at: HashMap<u64, (usize, i64, i64)>,
    ids: Vec<u64>,
}

impl Live {
    fn put(&mut self, id: u64, rev: i64) -> (i64, i64) {
        match self.at.get_mut(&id) {
            Some((_, create, version)) => {
                *version += 1;
                (*create, *version)
            }
            None => {
                self.at.insert(id, (self.ids.len(), rev, 1));
                self.ids.push(id);
                (rev, 1)
            }
        }
    }

    fn delete_random(&mut self, rng: &mut Rng) -> Option<u64> {
        if self.ids.is_empty() {
            return None;
        }
        let i = (rng.next() % self.ids.len() as u64) as usize;
        let id = self.ids.swap_remove(i);
        self.at.remove(&id);
        if let Some(&moved) = self.ids.get(i) {
            self.at.get_mut(&moved).expect("every listed key is mapped").0 = i;
        }
        Some(id)
    }
}

pub fn run(args: &[String]) -> Result<()> {
    let a = parse(args)?;
    std::fs::create_dir_all(&a.dir).with_context(|| format!("create {}", a.dir.display()))?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut live = Live::default();
    let mut value = vec![0u8; a.value_bytes];
    let (mut segments, mut bytes, mut puts, mut deletes) = (0u64, 0u64, 0u64, 0u64);
    let last = a.after + a.revisions;
    let mut rev = a.after + 1;
    while rev <= last {
        let mut w = SegmentWriter::create(&a.dir, &a.node, None)?;
        let end = (rev + a.segment_revisions - 1).min(last);
        while rev <= end {
            let deleted =
                if a.delete_every > 0 && rev % a.delete_every == 0 { live.delete_random(&mut rng) } else { None };
            let ev = match deleted {
                Some(id) => {
                    deletes += 1;
                    Event {
                        r#type: DELETE,
                        kv: Some(KeyValue { key: key(id), mod_revision: rev, ..KeyValue::default() }),
                    }
                }
                None => {
                    puts += 1;
                    let id = rng.next() % a.keys;
                    let (create_revision, version) = live.put(id, rev);
                    for chunk in value.chunks_mut(8) {
                        let r = rng.next().to_le_bytes();
                        chunk.copy_from_slice(&r[..chunk.len()]);
                    }
                    let kv = KeyValue {
                        key: key(id),
                        create_revision,
                        mod_revision: rev,
                        version,
                        value: value.clone(),
                        lease: 0,
                    };
                    Event { r#type: PUT, kv: Some(kv) }
                }
            };
            w.append(&ev)?;
            rev += 1;
        }
        let (_, _, size) = w.finish(&a.node, a.closed + segments as i64, a.history)?;
        segments += 1;
        bytes += size;
    }
    let summary = json!({"from": a.after + 1, "to": last, "segments": segments, "bytes": bytes, "puts": puts, "deletes": deletes});
    println!("{summary}");
    Ok(())
}

fn key(id: u64) -> Vec<u8> {
    format!("/registry/bench/chain/key-{id:08}").into_bytes()
}
