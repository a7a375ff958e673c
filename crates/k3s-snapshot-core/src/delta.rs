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
//! Names sort by revision and carry the node, the time the segment was closed and the history
//! it belongs to: `delta-<from, 20 digits>-<to, 20 digits>-<node>-<unix seconds>-h<etcd cluster
//! ID, 16 hex digits>.seg` (segments written before the history was recorded lack `-h…`). They
//! never parse as snapshot names ([`crate::name::parse`] wants digits after the last `-`).
//!
//! A history is etcd's cluster ID. A restore from a snapshot gives the member a new one (the
//! reset restores with a cluster token of its own), so after a restore that keeps the revision
//! numbers (`--cluster-reset-restore-bump-revision 0`) the old history's segments, whose numbers
//! now mean other writes, never chain onto the new history's: a chain never crosses histories.
//!
//! Encrypted segments (the server's `--etcd-snapshot-encryption-recipients-file`) are the same
//! bytes inside an age v1 file, named `<name>.seg.age`: the open segment is written through
//! [`Recipients::encrypt_to`] into its `.part`, so no plaintext segment ever reaches the disk, and
//! `age -d` of one gives the plain format above. A restore decrypts them with
//! [`crate::encryption::decrypt_to_scratch`] before [`verify`] and [`read_events`].

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use prost::Message;
use sha2::{Digest, Sha256};

use crate::encryption::Recipients;
use crate::name::AGE_SUFFIX;
use crate::store::{create_new_private, durable_rename, RemoveOnDrop, SnapshotStore};
use crate::{Error, Result};

/// Suffix of a segment (an encrypted one adds `.age`).
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
    /// An age file (`.seg.age`).
    pub encrypted: bool,
    /// etcd's cluster ID of the history it belongs to; none in names from before it was recorded.
    pub history: Option<u64>,
}

impl SegmentName {
    pub fn new(from: i64, to: i64, node: &str, closed: i64, encrypted: bool) -> SegmentName {
        SegmentName { file: String::new(), from, to, node: node.into(), closed, encrypted, history: None }.named()
    }

    /// The same segment in history `history` (etcd's cluster ID).
    pub fn in_history(self, history: Option<u64>) -> SegmentName {
        SegmentName { history, ..self }.named()
    }

    fn named(mut self) -> SegmentName {
        let age = if self.encrypted { AGE_SUFFIX } else { "" };
        let history = self.history.map(|h| format!("-h{h:016x}")).unwrap_or_default();
        let SegmentName { from, to, node, closed, .. } = &self;
        self.file = format!("{PREFIX}{from:020}-{to:020}-{node}-{closed}{history}{SUFFIX}{age}");
        self
    }

    /// Whether the segment may follow a base of history `base` (none: a base whose history is
    /// not known, which any segment may follow, as before histories were recorded).
    pub fn follows_history(&self, base: Option<u64>) -> bool {
        base.is_none_or(|b| self.history == Some(b))
    }

    pub fn parse(file: &str) -> Option<SegmentName> {
        let (plain, encrypted) = match file.strip_suffix(AGE_SUFFIX) {
            Some(p) => (p, true),
            None => (file, false),
        };
        let rest = plain.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
        let (from, rest) = rest.split_once('-')?;
        let (to, rest) = rest.split_once('-')?;
        let (rest, history) = match rest.rsplit_once('-') {
            Some((head, h)) if h.len() == 17 && h.starts_with('h') && h[1..].bytes().all(|b| b.is_ascii_hexdigit()) => {
                (head, Some(u64::from_str_radix(&h[1..], 16).ok()?))
            }
            _ => (rest, None),
        };
        let (node, closed) = rest.rsplit_once('-')?;
        let num =
            |s: &str| (s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse::<i64>().ok()).flatten();
        let (from, to) = (num(from)?, num(to)?);
        if node.is_empty() || from < 1 || to < from || closed.is_empty() || !closed.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        Some(SegmentName {
            file: file.into(),
            from,
            to,
            node: node.into(),
            closed: closed.parse().ok()?,
            encrypted,
            history,
        })
    }
}

/// The segments to replay after a base at revision `base`: each starts at most right after the
/// previous one ends and reaches past it (of several that do, the one that reaches furthest,
/// whichever node shipped it; an overlap is skipped by the replay, and covers a base that is a
/// little newer than the revision recorded for it, as when a chain's zipped or encrypted full
/// snapshot is read from its metadata), none that may have closed after `to_time` (names keep
/// whole seconds, so one named with `to_time`'s own second may hold changes made after it and is
/// left out: the restored point is never after the time asked for), only of the base's
/// `history` when it is known ([`SegmentName::follows_history`]), stopping once `to_revision` is
/// covered. Returns them and the revision the chain reaches (capped at `to_revision`).
pub fn chain_after(
    base: i64,
    history: Option<u64>,
    segments: &[SegmentName],
    to_revision: Option<i64>,
    to_time: Option<i64>,
) -> (Vec<&SegmentName>, i64) {
    let mut chain = Vec::new();
    let mut reached = base;
    while to_revision.is_none_or(|n| reached < n) {
        let next = segments
            .iter()
            .filter(|s| s.follows_history(history))
            .filter(|s| s.from <= reached + 1 && s.to > reached && to_time.is_none_or(|t| s.closed < t))
            .max_by_key(|s| s.to);
        let Some(s) = next else { break };
        chain.push(s);
        reached = s.to;
    }
    (chain, to_revision.map_or(reached, |n| reached.min(n)))
}

/// A maximal run of contiguous segments in one place, as `ls` shows it (and a server's list
/// answers it, see [`crate::k3s_list::SnapshotFileList::delta_chains`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Chain {
    /// The store: `file:///dir` or `s3://bucket/folder`.
    pub location: String,
    pub from_revision: i64,
    pub to_revision: i64,
    /// Segments the run is made of (one that only overlaps the others is not counted).
    pub segments: usize,
    /// How many of those are encrypted (`.seg.age`).
    #[serde(default)]
    pub encrypted: usize,
    /// The history (etcd's cluster ID, 16 hex digits) of its segments, when recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<String>,
}

/// Maximal runs of contiguous segments of one history in `location`, in revision order.
pub fn chains(location: &str, segments: &[SegmentName]) -> Vec<Chain> {
    let mut sorted: Vec<&SegmentName> = segments.iter().collect();
    sorted.sort_by_key(|s| (s.from, std::cmp::Reverse(s.to)));
    let mut out: Vec<Chain> = Vec::new();
    for s in sorted {
        let history = s.history.map(|h| format!("{h:016x}"));
        // The open run of this segment's history (runs of other histories may be interleaved).
        let last = out.iter_mut().rev().find(|c| c.history == history);
        match last {
            Some(last) if s.from <= last.to_revision + 1 => {
                if s.to > last.to_revision {
                    last.to_revision = s.to;
                    last.segments += 1;
                    last.encrypted += usize::from(s.encrypted);
                }
            }
            _ => out.push(Chain {
                location: location.to_string(),
                from_revision: s.from,
                to_revision: s.to,
                segments: 1,
                encrypted: usize::from(s.encrypted),
                history,
            }),
        }
    }
    out
}

/// The chains of every store in `stores`, in that order.
pub async fn chains_in(stores: &[&dyn SnapshotStore]) -> Result<Vec<Chain>> {
    let mut out = Vec::new();
    for store in stores {
        out.extend(chains(&store.describe(), &list_segments(*store).await?));
    }
    Ok(out)
}

/// The segments in `store` (plain and encrypted).
pub async fn list_segments(store: &dyn SnapshotStore) -> Result<Vec<SegmentName>> {
    use futures::StreamExt;
    let mut names = Vec::new();
    let mut listing = store.list(PREFIX);
    while let Some(obj) = listing.next().await {
        names.extend(SegmentName::parse(&obj?.key));
    }
    Ok(names)
}

/// Deletes the segments of `store` closed before its oldest snapshot was taken: they follow no
/// snapshot that is still kept, so nothing can replay them. Returns the names deleted.
pub async fn prune_segments(store: &dyn SnapshotStore) -> Result<Vec<String>> {
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
/// unfinished, the file is removed. With recipients everything goes through age on its way to the
/// `.part`, which then holds only ciphertext.
pub struct SegmentWriter {
    out: Sink,
    path: PathBuf,
    guard: Option<RemoveOnDrop>,
    hasher: Sha256,
    from: i64,
    to: i64,
    events: u64,
    bytes: u64,
}

/// Where a segment's bytes go: the file, or age in front of it.
enum Sink {
    Plain(BufWriter<std::fs::File>),
    Sealed(age::stream::StreamWriter<BufWriter<std::fs::File>>),
}

impl Sink {
    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Plain(w) => w.write_all(b),
            Sink::Sealed(w) => w.write_all(b),
        }
    }

    /// Ends the stream (age's last chunk) and returns the file, flushed.
    fn finish(self) -> std::io::Result<std::fs::File> {
        let buffered = match self {
            Sink::Plain(w) => w,
            Sink::Sealed(w) => w.finish()?,
        };
        buffered.into_inner().map_err(|e| e.into_error())
    }
}

impl SegmentWriter {
    /// Starts `<dir>/.delta-open-<node>.part` (a leftover of a crash is replaced), encrypted to
    /// `recipients` when given.
    pub fn create(dir: &Path, node: &str, recipients: Option<&Recipients>) -> Result<SegmentWriter> {
        let path = dir.join(format!(".{PREFIX}open-{node}.part"));
        let _ = std::fs::remove_file(&path);
        let file = create_new_private(&path).map_err(Error::io("create", &path))?;
        let guard = Some(RemoveOnDrop::new(path.clone()));
        let buffered = BufWriter::with_capacity(256 << 10, file);
        let out = match recipients {
            Some(r) => Sink::Sealed(r.encrypt_to(buffered)?),
            None => Sink::Plain(buffered),
        };
        let mut w = SegmentWriter { out, guard, path, hasher: Sha256::new(), from: 0, to: 0, events: 0, bytes: 0 };
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

    /// Plaintext bytes written so far (without the trailer).
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// Adds the trailer (and, encrypted, age's last chunk), fsyncs, and renames the file to its
    /// segment name in the same dir. Returns the name, the path and the file's size.
    pub fn finish(mut self, node: &str, closed: i64, history: Option<u64>) -> Result<(SegmentName, PathBuf, u64)> {
        let sum = std::mem::take(&mut self.hasher).finalize();
        self.write(&sum)?;
        let SegmentWriter { out, path, guard, from, to, .. } = self;
        let encrypted = matches!(out, Sink::Sealed(_));
        let file = out.finish().map_err(Error::io("write", &path))?;
        file.sync_all().map_err(Error::io("fsync", &path))?;
        let size = file.metadata().map_err(Error::io("stat", &path))?.len();
        drop(file);
        let name = SegmentName::new(from, to, node, closed, encrypted).in_history(history);
        let dest = path.with_file_name(&name.file);
        durable_rename(&path, &dest)?;
        if let Some(g) = guard {
            g.disarm();
        }
        Ok((name, dest, size))
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
    read_events_while(path, |ev| f(ev).map(|()| true))
}

/// [`read_events`], stopping (normally, the rest unread) when `f` returns `false`: a replay that
/// has reached its target revision inside the segment.
pub fn read_events_while(path: &Path, mut f: impl FnMut(Event) -> std::result::Result<bool, String>) -> Result<()> {
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
        if !f(ev).map_err(|d| bad(path, d))? {
            return Ok(());
        }
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
        let n = SegmentName::new(1001, 2000, "node-a-1", 1_700_000_000, false);
        assert_eq!(n.file, "delta-00000000000000001001-00000000000000002000-node-a-1-1700000000.seg");
        assert_eq!(SegmentName::parse(&n.file), Some(n.clone()));
        assert!(crate::name::parse(&n.file).is_none());
        let e = SegmentName::new(1001, 2000, "node-a-1", 1_700_000_000, true);
        assert_eq!(e.file, format!("{}.age", n.file));
        assert_eq!(SegmentName::parse(&e.file), Some(e.clone()));
        assert!(e.encrypted && !n.encrypted);
        assert!(crate::name::parse(&e.file).is_none(), "an encrypted segment is no snapshot either");
        for bad in [
            "delta-1-2-n-3.seg",
            "delta-00000000000000000002-00000000000000000001-n-3.seg",
            "x.seg",
            "x.seg.age",
            "delta-00000000000000000001-00000000000000000002-n-3.age",
            "delta-00000000000000000001-00000000000000000002-n-3.seg.age.age",
        ] {
            assert!(SegmentName::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn written_segments_read_back_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SegmentWriter::create(dir.path(), "n1", None).unwrap();
        let evs = vec![put(5, "a", "1"), put(6, "b", "2"), put(6, "c", "3"), put(7, "a", "4")];
        for e in &evs {
            w.append(e).unwrap();
        }
        let (name, path, bytes) = w.finish("n1", 42, None).unwrap();
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
        let mut w = SegmentWriter::create(dir.path(), "n1", None).unwrap();
        w.append(&put(3, "a", "1")).unwrap();
        assert!(w.append(&put(2, "a", "1")).is_err(), "revisions never go backwards");
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn chains_follow_contiguous_revisions_and_stop_at_gaps() {
        let s = |from, to, node: &str, closed| SegmentName::new(from, to, node, closed, false);
        let segs = vec![
            s(11, 20, "a", 100),
            s(11, 25, "b", 101),
            s(21, 30, "a", 110),
            s(26, 40, "b", 120),
            s(41, 50, "a", 130),
            s(60, 70, "a", 140),
        ];
        let (c, reached) = chain_after(10, None, &segs, None, None);
        assert_eq!(c.iter().map(|x| (x.from, x.to)).collect::<Vec<_>>(), [(11, 25), (26, 40), (41, 50)]);
        assert_eq!(reached, 50, "the gap 51..59 stops the chain");
        let (c, reached) = chain_after(10, None, &segs, Some(33), None);
        assert_eq!((c.len(), reached), (2, 33));
        let (c, reached) = chain_after(10, None, &segs, None, Some(105));
        assert_eq!((c.len(), reached), (1, 25));
        // Closed within the time's own second (at 110.x): maybe after it, so left out.
        let (c, reached) = chain_after(10, None, &segs, None, Some(110));
        assert_eq!((c.len(), reached), (1, 25));
        let (c, reached) = chain_after(10, None, &segs, None, Some(111));
        assert_eq!((c.len(), reached), (2, 30));
        let runs: Vec<(i64, i64, usize)> =
            chains("here", &segs).iter().map(|c| (c.from_revision, c.to_revision, c.segments)).collect();
        assert_eq!(runs, vec![(11, 50, 4), (60, 70, 1)]);
        // A base a little past where the first segment starts (a full snapshot newer than the
        // revision recorded for it): the overlapping segment still continues the chain.
        let (c, reached) = chain_after(15, None, &segs, None, None);
        assert_eq!((c.first().map(|x| (x.from, x.to)), reached), (Some((11, 25)), 50));
        let (c, reached) = chain_after(50, None, &segs, None, None);
        assert_eq!((c.len(), reached), (0, 50), "nothing reaches past 50 without a gap");
    }

    #[test]
    fn a_chain_never_crosses_histories() {
        let (old, new) = (Some(0xaaaa_u64), Some(0xbbbb_u64));
        let s = |from, to, closed, h| SegmentName::new(from, to, "a", closed, false).in_history(h);
        // History `old` shipped to 120; a restore to 100 (numbers kept) started `new`.
        let segs = vec![s(51, 80, 100, old), s(81, 120, 110, old), s(101, 105, 200, new), s(106, 140, 210, new)];
        let n = &segs[1];
        assert_eq!(n.file, "delta-00000000000000000081-00000000000000000120-a-110-h000000000000aaaa.seg");
        assert_eq!(SegmentName::parse(&n.file).as_ref(), Some(n));
        let (c, reached) = chain_after(100, new, &segs, None, None);
        assert_eq!(
            (c.iter().map(|x| (x.from, x.to)).collect::<Vec<_>>(), reached),
            (vec![(101, 105), (106, 140)], 140)
        );
        let (c, reached) = chain_after(50, old, &segs, None, None);
        assert_eq!((c.len(), reached), (2, 120), "the old history's chain is still whole");
        let runs: Vec<(i64, i64, Option<String>)> =
            chains("here", &segs).into_iter().map(|c| (c.from_revision, c.to_revision, c.history)).collect();
        assert_eq!(runs, vec![(51, 120, Some("000000000000aaaa".into())), (101, 140, Some("000000000000bbbb".into()))]);
        // A node name that ends like a history is still read as the node.
        let odd = SegmentName::new(1, 2, "n-hzzzzzzzzzzzzzzzz", 3, false);
        assert_eq!(SegmentName::parse(&odd.file), Some(odd));
    }

    #[test]
    fn encrypted_segments_hold_only_ciphertext_and_decrypt_to_the_plain_format() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let id = age::x25519::Identity::generate();
        let rf = dir.path().join("r.txt");
        std::fs::write(&rf, format!("{}\n", id.to_public())).unwrap();
        let recipients = Recipients::from_file(&rf).unwrap();
        let idf = dir.path().join("k.txt");
        use age::secrecy::ExposeSecret;
        std::fs::write(&idf, format!("{}\n", id.to_string().expose_secret())).unwrap();
        std::fs::set_permissions(&idf, std::fs::Permissions::from_mode(0o600)).unwrap();
        let ids = crate::encryption::Identities::from_file(&idf).unwrap();

        let segs = dir.path().join("segs");
        std::fs::create_dir(&segs).unwrap();
        let mut w = SegmentWriter::create(&segs, "n1", Some(&recipients)).unwrap();
        // Enough events for several age chunks, and a value that would show in plaintext.
        let evs: Vec<Event> = (0..3000).map(|i| put(10 + i / 3, "/registry/secret", "hunter2-plain")).collect();
        for e in &evs {
            w.append(e).unwrap();
            let part = std::fs::read(segs.join(".delta-open-n1.part")).unwrap();
            assert!(!part.windows(13).any(|x| x == b"hunter2-plain"), "plaintext reached the .part");
        }
        let (name, path, bytes) = w.finish("n1", 42, None).unwrap();
        assert!(name.encrypted && name.file.ends_with(".seg.age"), "{}", name.file);
        assert_eq!((name.from, name.to), (10, 10 + 2999 / 3));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), bytes);
        let stored = std::fs::read(&path).unwrap();
        assert!(stored.starts_with(crate::encryption::AGE_MAGIC));
        assert!(!stored.windows(8).any(|x| x == MAGIC));
        assert_eq!(std::fs::read_dir(&segs).unwrap().count(), 1, "only the .seg.age");

        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let plain = crate::encryption::decrypt_to_scratch(&path, &out, Some(&ids), &name.file).unwrap();
        assert_eq!(plain.target(), out.join(name.file.strip_suffix(".age").unwrap()));
        assert_eq!(verify(plain.path(), &name).unwrap(), 3000);
        let mut got = Vec::new();
        read_events(plain.path(), |e| {
            got.push(e);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, evs);
    }
}
