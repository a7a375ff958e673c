//! Delta segments: etcd's changes between full snapshots (continuous backup).
//!
//! A segment holds every event of a contiguous run of revisions `from..=to`, in revision order,
//! as etcd's watch delivered them. Format (all of it covered by the trailer):
//!
//! ```text
//! "K3SDLT01"                       8 bytes of magic
//! { u32 little-endian length, mvccpb.Event protobuf }   one frame per event
//! SHA-256 of everything above      32 bytes, like a snapshot's trailer
//! ```
//!
//! The `Event` messages are etcd's own (`mvccpb.Event`: type 1 = PUT 0 / DELETE 1, kv 2; and
//! `mvccpb.KeyValue`: key 1, create_revision 2, mod_revision 3, version 4, value 5, lease 6), so
//! etcd's `.proto` files decode a segment too. A revision's events are never split between
//! segments, and every revision in `from..=to` has at least one event (etcd bumps the revision
//! only for a transaction that changes something), which is what lets a chain be checked for gaps
//! by its numbers alone.
//!
//! Names sort by revision and carry the node and the time the segment was closed:
//! `delta-<from, 20 digits>-<to, 20 digits>-<node>-<unix seconds>.seg`. They never parse as
//! snapshot names ([`crate::name::parse`] wants digits after the last `-`).

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use prost::Message;
use sha2::{Digest, Sha256};

use crate::store::{create_new_private, durable_rename, RemoveOnDrop};
use crate::{Error, Result};

/// Suffix of a segment.
pub const SUFFIX: &str = ".seg";
/// Name prefix of a segment.
pub const PREFIX: &str = "delta-";
const MAGIC: &[u8; 8] = b"K3SDLT01";
const TRAILER: usize = 32;
/// Largest frame a reader accepts (etcd's default request limit is 1.5 MiB; a value can be no
/// larger than the request that wrote it, with room for etcd raising the limit).
pub const MAX_FRAME: u32 = 64 << 20;

/// `mvccpb.KeyValue`.
#[derive(Clone, PartialEq, Message)]
pub struct KeyValue {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(int64, tag = "2")]
    pub create_revision: i64,
    #[prost(int64, tag = "3")]
    pub mod_revision: i64,
    #[prost(int64, tag = "4")]
    pub version: i64,
    #[prost(bytes = "vec", tag = "5")]
    pub value: Vec<u8>,
    #[prost(int64, tag = "6")]
    pub lease: i64,
}

/// `mvccpb.Event`.
#[derive(Clone, PartialEq, Message)]
pub struct Event {
    /// 0 PUT, 1 DELETE.
    #[prost(int32, tag = "1")]
    pub r#type: i32,
    #[prost(message, optional, tag = "2")]
    pub kv: Option<KeyValue>,
}

pub const PUT: i32 = 0;
pub const DELETE: i32 = 1;

impl Event {
    pub fn revision(&self) -> i64 {
        self.kv.as_ref().map_or(0, |kv| kv.mod_revision)
    }
}

/// A segment's name, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentName {
    pub file: String,
    pub from: i64,
    pub to: i64,
    pub node: String,
    /// Unix seconds at which the segment was closed.
    pub closed: i64,
}

impl SegmentName {
    pub fn new(from: i64, to: i64, node: &str, closed: i64) -> SegmentName {
        SegmentName {
            file: format!("{PREFIX}{from:020}-{to:020}-{node}-{closed}{SUFFIX}"),
            from,
            to,
            node: node.into(),
            closed,
        }
    }

    pub fn parse(file: &str) -> Option<SegmentName> {
        let rest = file.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
        let (from, rest) = rest.split_once('-')?;
        let (to, rest) = rest.split_once('-')?;
        let (node, closed) = rest.rsplit_once('-')?;
        let num =
            |s: &str| (s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse::<i64>().ok()).flatten();
        let (from, to) = (num(from)?, num(to)?);
        if node.is_empty() || from < 1 || to < from || closed.is_empty() || !closed.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        Some(SegmentName { file: file.into(), from, to, node: node.into(), closed: closed.parse().ok()? })
    }
}

/// The segments to replay after a base at revision `base`: each starts right after the previous
/// one ends (of several that do, the one that reaches furthest, whichever node shipped it), none
/// closed after `to_time`, stopping once `to_revision` is covered. Returns them and the revision
/// the chain reaches (capped at `to_revision`).
pub fn chain_after(
    base: i64,
    segments: &[SegmentName],
    to_revision: Option<i64>,
    to_time: Option<i64>,
) -> (Vec<&SegmentName>, i64) {
    let mut chain = Vec::new();
    let mut reached = base;
    while to_revision.is_none_or(|n| reached < n) {
        let next = segments
            .iter()
            .filter(|s| s.from == reached + 1 && to_time.is_none_or(|t| s.closed <= t))
            .max_by_key(|s| s.to);
        let Some(s) = next else { break };
        chain.push(s);
        reached = s.to;
    }
    (chain, to_revision.map_or(reached, |n| reached.min(n)))
}

/// Maximal runs of contiguous segments, for `ls`: `(from, to, count)` in revision order.
pub fn chains(segments: &[SegmentName]) -> Vec<(i64, i64, usize)> {
    let mut sorted: Vec<&SegmentName> = segments.iter().collect();
    sorted.sort_by_key(|s| (s.from, std::cmp::Reverse(s.to)));
    let mut out: Vec<(i64, i64, usize)> = Vec::new();
    for s in sorted {
        match out.last_mut() {
            Some(last) if s.from <= last.1 + 1 => {
                if s.to > last.1 {
                    last.1 = s.to;
                    last.2 += 1;
                }
            }
            _ => out.push((s.from, s.to, 1)),
        }
    }
    out
}

/// Deletes the segments of `store` closed before its oldest snapshot was taken: they follow no
/// snapshot that is still kept, so nothing can replay them. Returns the names deleted.
pub async fn prune_segments(store: &dyn crate::store::SnapshotStore) -> Result<Vec<String>> {
    use futures::StreamExt;
    let (mut oldest, mut segments) = (None::<i64>, Vec::new());
    let mut listing = store.list("");
    while let Some(obj) = listing.next().await {
        let obj = obj?;
        if let Some(p) = crate::name::parse(&obj.key) {
            oldest = Some(oldest.map_or(p.timestamp, |o: i64| o.min(p.timestamp)));
        } else if let Some(s) = SegmentName::parse(&obj.key) {
            segments.push(s);
        }
    }
    drop(listing);
    let Some(oldest) = oldest else { return Ok(Vec::new()) };
    let doomed: Vec<String> = segments.into_iter().filter(|s| s.closed < oldest).map(|s| s.file).collect();
    if !doomed.is_empty() {
        store.delete(&doomed).await?;
        tracing::info!(store = %store.describe(), segments = doomed.len(), "deleted delta segments older than the oldest kept snapshot");
    }
    Ok(doomed)
}

/// Writes one segment: events are appended as they arrive (nothing is held in memory), then
/// [`SegmentWriter::finish`] adds the trailer, fsyncs and gives the file its name. Dropped
/// unfinished, the file is removed.
pub struct SegmentWriter {
    out: BufWriter<std::fs::File>,
    path: PathBuf,
    guard: Option<RemoveOnDrop>,
    hasher: Sha256,
    from: i64,
    to: i64,
    events: u64,
    bytes: u64,
}

impl SegmentWriter {
    /// Starts `<dir>/.delta-open-<node>.part` (a leftover of a crash is replaced).
    pub fn create(dir: &Path, node: &str) -> Result<SegmentWriter> {
        let path = dir.join(format!(".{PREFIX}open-{node}.part"));
        let _ = std::fs::remove_file(&path);
        let file = create_new_private(&path).map_err(Error::io("create", &path))?;
        let mut w = SegmentWriter {
            out: BufWriter::with_capacity(256 << 10, file),
            guard: Some(RemoveOnDrop::new(path.clone())),
            path,
            hasher: Sha256::new(),
            from: 0,
            to: 0,
            events: 0,
            bytes: 0,
        };
        w.write(MAGIC)?;
        Ok(w)
    }

    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.hasher.update(b);
        self.bytes += b.len() as u64;
        self.out.write_all(b).map_err(Error::io("write", &self.path))
    }

    /// Appends one event; revisions must not go backwards.
    pub fn append(&mut self, ev: &Event) -> Result<()> {
        let rev = ev.revision();
        if rev < self.to || rev < 1 {
            return Err(Error::Invalid(format!("delta event at revision {rev} after revision {}", self.to)));
        }
        if self.events == 0 {
            self.from = rev;
        }
        self.to = rev;
        self.events += 1;
        let body = ev.encode_to_vec();
        self.write(&(body.len() as u32).to_le_bytes())?;
        self.write(&body)
    }

    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// First and last revision so far.
    pub fn range(&self) -> (i64, i64) {
        (self.from, self.to)
    }

    pub fn events(&self) -> u64 {
        self.events
    }

    /// Bytes written so far (without the trailer).
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// Adds the trailer, fsyncs, and renames the file to its segment name in the same dir.
    pub fn finish(mut self, node: &str, closed: i64) -> Result<(SegmentName, PathBuf, u64)> {
        let sum = std::mem::take(&mut self.hasher).finalize();
        self.out.write_all(&sum).map_err(Error::io("write", &self.path))?;
        self.out.flush().map_err(Error::io("write", &self.path))?;
        self.out.get_ref().sync_all().map_err(Error::io("fsync", &self.path))?;
        let name = SegmentName::new(self.from, self.to, node, closed);
        let dest = self.path.with_file_name(&name.file);
        durable_rename(&self.path, &dest)?;
        if let Some(g) = self.guard.take() {
            g.disarm();
        }
        Ok((name, dest, self.bytes + TRAILER as u64))
    }
}

/// Checks a segment file's magic, frames and SHA-256 trailer, and that its events cover exactly
/// the revisions its name says, each one; returns the number of events.
pub fn verify(path: &Path, name: &SegmentName) -> Result<u64> {
    let mut n = 0;
    let mut last = name.from - 1;
    read_events(path, |ev| {
        let rev = ev.revision();
        if rev != last && rev != last + 1 {
            return Err(format!("revision {rev} follows {last}: a gap"));
        }
        last = rev;
        n += 1;
        Ok(())
    })?;
    if n == 0 || last != name.to {
        return Err(bad(path, format!("its events end at revision {last}, its name says {}", name.to)));
    }
    Ok(n)
}

fn bad(path: &Path, detail: String) -> Error {
    Error::Invalid(format!("delta segment {} is damaged: {detail}; it cannot be replayed", path.display()))
}

/// Calls `f` for each event of the segment at `path` after checking its trailer: one pass to
/// hash, one to decode, so nothing is applied from a file that turns out torn.
pub fn read_events(path: &Path, mut f: impl FnMut(Event) -> std::result::Result<(), String>) -> Result<()> {
    let len = std::fs::metadata(path).map_err(Error::io("read", path))?.len();
    if len < (MAGIC.len() + TRAILER) as u64 {
        return Err(bad(path, format!("{len} bytes is shorter than a segment can be")));
    }
    let body_len = len - TRAILER as u64;
    let open = || std::fs::File::open(path).map_err(Error::io("read", path));
    let mut r = std::io::BufReader::with_capacity(256 << 10, open()?);
    let mut hasher = Sha256::new();
    let mut left = body_len;
    let mut buf = vec![0u8; 256 << 10];
    while left > 0 {
        let want = buf.len().min(left as usize);
        r.read_exact(&mut buf[..want]).map_err(Error::io("read", path))?;
        hasher.update(&buf[..want]);
        left -= want as u64;
    }
    let mut trailer = [0u8; TRAILER];
    r.read_exact(&mut trailer).map_err(Error::io("read", path))?;
    if hasher.finalize().as_slice() != trailer {
        return Err(bad(path, "its SHA-256 trailer does not match".into()));
    }
    let mut r = std::io::BufReader::with_capacity(256 << 10, open()?).take(body_len);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(Error::io("read", path))?;
    if &magic != MAGIC {
        return Err(bad(path, "it does not start with K3SDLT01".into()));
    }
    let mut at = MAGIC.len() as u64;
    let mut frame = Vec::new();
    while at < body_len {
        let mut l = [0u8; 4];
        r.read_exact(&mut l).map_err(|_| bad(path, format!("a frame header at byte {at} is cut")))?;
        let l = u32::from_le_bytes(l);
        if l > MAX_FRAME || u64::from(l) > body_len - at - 4 {
            return Err(bad(path, format!("a frame at byte {at} claims {l} bytes")));
        }
        frame.resize(l as usize, 0);
        r.read_exact(&mut frame).map_err(Error::io("read", path))?;
        let ev = Event::decode(frame.as_slice()).map_err(|e| bad(path, format!("frame at byte {at}: {e}")))?;
        if ev.kv.is_none() || !(ev.r#type == PUT || ev.r#type == DELETE) {
            return Err(bad(path, format!("frame at byte {at} is not a put or delete event")));
        }
        f(ev).map_err(|d| bad(path, d))?;
        at += 4 + u64::from(l);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(rev: i64, key: &str, value: &str) -> Event {
        Event {
            r#type: PUT,
            kv: Some(KeyValue {
                key: key.into(),
                create_revision: rev,
                mod_revision: rev,
                version: 1,
                value: value.into(),
                lease: 0,
            }),
        }
    }

    #[test]
    fn names_round_trip_and_never_parse_as_snapshots() {
        let n = SegmentName::new(1001, 2000, "node-a-1", 1_700_000_000);
        assert_eq!(n.file, "delta-00000000000000001001-00000000000000002000-node-a-1-1700000000.seg");
        assert_eq!(SegmentName::parse(&n.file), Some(n.clone()));
        assert!(crate::name::parse(&n.file).is_none());
        for bad in ["delta-1-2-n-3.seg", "delta-00000000000000000002-00000000000000000001-n-3.seg", "x.seg"] {
            assert!(SegmentName::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn written_segments_read_back_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SegmentWriter::create(dir.path(), "n1").unwrap();
        let evs = vec![put(5, "a", "1"), put(6, "b", "2"), put(6, "c", "3"), put(7, "a", "4")];
        for e in &evs {
            w.append(e).unwrap();
        }
        let (name, path, bytes) = w.finish("n1", 42).unwrap();
        assert_eq!((name.from, name.to), (5, 7));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), bytes);
        assert_eq!(verify(&path, &name).unwrap(), 4);
        let mut got = Vec::new();
        read_events(&path, |e| {
            got.push(e);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, evs);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no .part left");

        let mut bytes = std::fs::read(&path).unwrap();
        bytes[12] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(verify(&path, &name).unwrap_err().to_string().contains("trailer"));
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        assert!(verify(&path, &name).is_err());
    }

    #[test]
    fn an_unfinished_segment_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SegmentWriter::create(dir.path(), "n1").unwrap();
        w.append(&put(3, "a", "1")).unwrap();
        assert!(w.append(&put(2, "a", "1")).is_err(), "revisions never go backwards");
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn chains_follow_contiguous_revisions_and_stop_at_gaps() {
        let s = |from, to, node: &str, closed| SegmentName::new(from, to, node, closed);
        let segs = vec![
            s(11, 20, "a", 100),
            s(11, 25, "b", 101),
            s(21, 30, "a", 110),
            s(26, 40, "b", 120),
            s(41, 50, "a", 130),
            s(60, 70, "a", 140),
        ];
        let (c, reached) = chain_after(10, &segs, None, None);
        assert_eq!(c.iter().map(|x| (x.from, x.to)).collect::<Vec<_>>(), [(11, 25), (26, 40), (41, 50)]);
        assert_eq!(reached, 50, "the gap 51..59 stops the chain");
        let (c, reached) = chain_after(10, &segs, Some(33), None);
        assert_eq!((c.len(), reached), (2, 33));
        let (c, reached) = chain_after(10, &segs, None, Some(105));
        assert_eq!((c.len(), reached), (1, 25));
        assert_eq!(chains(&segs), vec![(11, 50, 4), (60, 70, 1)]);
    }
}
