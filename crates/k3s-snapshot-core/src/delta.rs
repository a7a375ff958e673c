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

/// Name prefix of the full snapshots the continuous-backup follower takes to start a chain
/// (`chain-base-<node>-<unix seconds>[.zip][.age]`): the first chain, a new one after a gap, and a
/// new one when the current chain reached `--etcd-snapshot-delta-max-revisions` or
/// `--etcd-snapshot-delta-max-age`. They are ordinary snapshots (k3s's `ls` and a restore read
/// them as any other), but neither `--etcd-snapshot-retention` (the cron's prefix) nor `prune`
/// (`on-demand`) selects them: chain retention ([`chain_expired`]) keeps them.
pub const BASE_PREFIX: &str = "chain-base";

/// A full snapshot a chain may follow, as `ls` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    pub file: String,
    /// The etcd revision recorded for it (its metadata).
    pub revision: i64,
    /// etcd's cluster ID recorded for it, when known.
    pub history: Option<u64>,
    /// Unix seconds from its name.
    pub taken: i64,
}

/// A run of contiguous segments in one place, as `ls` shows it (and a server's list answers it,
/// see [`crate::k3s_list::SnapshotFileList::delta_chains`]): what a restore from `base` replays
/// (up to the next snapshot, from which a restore would start instead), or a run that follows
/// no kept snapshot.
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
    /// The snapshot it follows, when one is kept there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// Revisions a restore from `base` replays to reach `to_revision` (without a base: the
    /// run's length); 0 in answers of servers from before it was recorded.
    #[serde(default)]
    pub revisions: i64,
    /// Bytes of its segments, when known (listings give sizes).
    #[serde(default)]
    pub bytes: u64,
}

impl Chain {
    /// Revisions to replay, also for an answer that does not carry them.
    pub fn revision_count(&self) -> i64 {
        if self.revisions > 0 {
            self.revisions
        } else {
            self.to_revision - self.from_revision + 1
        }
    }
}

/// The chains of `location`: for every snapshot in `bases` (of a known revision) the segments a
/// restore from it replays up to the next snapshot of its history ([`chain_after`] capped at that
/// snapshot's revision; an overlapping segment counts in both), then the maximal runs of
/// contiguous segments of one history that follow none of them. Snapshots at the same revision
/// count once (the newest: `latest` picks it). Sizes come from `sizes` (file → bytes) when given.
/// In revision order per history.
pub fn chains(
    location: &str,
    segments: &[SegmentName],
    bases: &[Base],
    sizes: &std::collections::HashMap<String, u64>,
) -> Vec<Chain> {
    let mut bases: Vec<&Base> = bases.iter().collect();
    bases.sort_by_key(|b| (b.revision, std::cmp::Reverse(b.taken)));
    bases.dedup_by_key(|b| (b.revision, b.history));
    let size = |s: &SegmentName| sizes.get(&s.file).copied().unwrap_or(0);
    let mut used = std::collections::HashSet::new();
    let mut out: Vec<Chain> = Vec::new();
    for (i, b) in bases.iter().enumerate() {
        let next =
            bases[i + 1..].iter().find(|n| n.revision > b.revision && (b.history.is_none() || n.history == b.history));
        let (chain, reached) = chain_after(b.revision, b.history, segments, next.map(|n| n.revision), None);
        let Some(first) = chain.first() else { continue };
        used.extend(chain.iter().map(|s| s.file.clone()));
        out.push(Chain {
            location: location.to_string(),
            from_revision: first.from.max(b.revision + 1),
            to_revision: reached,
            segments: chain.len(),
            encrypted: chain.iter().filter(|s| s.encrypted).count(),
            history: first.history.map(|h| format!("{h:016x}")),
            base: Some(b.file.clone()),
            revisions: reached - b.revision,
            bytes: chain.iter().map(|s| size(s)).sum(),
        });
    }
    let mut sorted: Vec<&SegmentName> = segments.iter().filter(|s| !used.contains(&s.file)).collect();
    sorted.sort_by_key(|s| (s.from, std::cmp::Reverse(s.to)));
    let first_orphan = out.len();
    for s in sorted {
        let history = s.history.map(|h| format!("{h:016x}"));
        // The open run of this segment's history (runs of other histories may be interleaved).
        let last = out[first_orphan..].iter_mut().rev().find(|c| c.history == history);
        match last {
            Some(last) if s.from <= last.to_revision + 1 => {
                if s.to > last.to_revision {
                    last.to_revision = s.to;
                    last.segments += 1;
                    last.encrypted += usize::from(s.encrypted);
                    last.bytes += size(s);
                    last.revisions = last.to_revision - last.from_revision + 1;
                }
            }
            _ => out.push(Chain {
                location: location.to_string(),
                from_revision: s.from,
                to_revision: s.to,
                segments: 1,
                encrypted: usize::from(s.encrypted),
                history,
                base: None,
                revisions: s.to - s.from + 1,
                bytes: size(s),
            }),
        }
    }
    out.sort_by_key(|c| (c.from_revision, c.to_revision));
    out
}

/// The chains of every store in `stores`, in that order. Every snapshot of a store that holds
/// segments is a possible base: its revision and history come from its metadata document.
pub async fn chains_in(stores: &[&dyn SnapshotStore]) -> Result<Vec<Chain>> {
    use futures::StreamExt;
    let mut out = Vec::new();
    for store in stores {
        let (mut segments, mut snapshots, mut sizes) = (Vec::new(), Vec::new(), std::collections::HashMap::new());
        let mut listing = store.list("");
        while let Some(obj) = listing.next().await {
            let obj = obj?;
            if let Some(s) = SegmentName::parse(&obj.key) {
                sizes.insert(obj.key, obj.size);
                segments.push(s);
            } else if let Some(p) = crate::name::parse(&obj.key) {
                snapshots.push((obj.key.clone(), p.timestamp));
            }
        }
        drop(listing);
        if segments.is_empty() {
            continue;
        }
        let bases: Vec<Base> = futures::stream::iter(snapshots)
            .map(|(file, taken)| async move {
                let doc = crate::list::read_metadata(*store, &file).await?;
                let md = doc.ours()?;
                let history = md.cluster_id.as_deref().and_then(|h| u64::from_str_radix(h, 16).ok());
                // An empty keyspace is recorded as revision 0; etcd starts at 1.
                Some(Base { file, revision: md.etcd_revision?.max(1), history, taken })
            })
            .buffered(16)
            .filter_map(|b| async move { b })
            .collect()
            .await;
        out.extend(chains(&store.describe(), &segments, &bases, &sizes));
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

/// What chain retention removes from a store.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ChainPrune {
    /// Chain bases ([`BASE_PREFIX`]), removed with their metadata documents.
    pub bases: Vec<String>,
    pub segments: Vec<String>,
}

impl ChainPrune {
    pub fn is_empty(&self) -> bool {
        self.bases.is_empty() && self.segments.is_empty()
    }
}

/// Chain retention (`--etcd-snapshot-delta-retention`) of one store, given its snapshots
/// (`(file, unix seconds from the name)`, every prefix) and segments, at `now`, keeping
/// `retention` seconds (`None` or < 1: chain bases are kept whatever their age), never touching
/// what `keep` names (what waits in the upload queue).
///
/// The rule: let `W = now - retention` and `K` the newest chain base taken before `W` (its
/// name's second `< W`). Every chain base older than `K` is removed, and every segment closed
/// before `K` was taken. `K`, every newer base and every segment closed at or after `K` stay;
/// so do segments when no base is older than `W`. This is what a restore needs for any time
/// `T` in the window `W ..= now`: `--cluster-reset-restore-to-time T` starts from the newest
/// snapshot named before `T`'s second, which is `K` or a newer snapshot (`K` is named before
/// `W <= T`), and replays the segments after it closed before `T`; every such segment holds
/// changes made after that snapshot was taken, so it closed at or after it, hence at or after
/// `K`, and is kept. The newest base and the current chain's segments (closed after it) always
/// stay. As before chain retention existed, segments closed before the oldest snapshot kept
/// (any prefix) follow nothing and go too.
pub fn chain_expired(
    snapshots: &[(String, i64)],
    segments: &[SegmentName],
    now: i64,
    retention: Option<i64>,
    keep: &std::collections::HashSet<String>,
) -> ChainPrune {
    let is_base = |f: &str| crate::name::matches_prefix(f, BASE_PREFIX).is_some();
    let anchor = retention.filter(|r| *r > 0).and_then(|r| {
        let window = now.saturating_sub(r);
        snapshots.iter().filter(|(f, ts)| is_base(f) && *ts < window).map(|(_, ts)| *ts).max()
    });
    let mut bases: Vec<String> = match anchor {
        Some(k) => snapshots.iter().filter(|(f, ts)| is_base(f) && *ts < k).map(|(f, _)| f.clone()).collect(),
        None => Vec::new(),
    };
    bases.retain(|f| !keep.contains(f));
    bases.sort();
    let oldest_kept = snapshots.iter().filter(|(f, _)| !bases.contains(f)).map(|(_, ts)| *ts).min();
    let Some(cutoff) = [oldest_kept, anchor].into_iter().flatten().max() else {
        return ChainPrune { bases, segments: Vec::new() };
    };
    let mut segments: Vec<String> =
        segments.iter().filter(|s| s.closed < cutoff && !keep.contains(&s.file)).map(|s| s.file.clone()).collect();
    segments.sort();
    ChainPrune { bases, segments }
}

/// Applies [`chain_expired`] to `store` at the current time; returns what it deleted.
pub async fn prune_chains(
    store: &dyn SnapshotStore,
    retention: Option<std::time::Duration>,
    keep: &std::collections::HashSet<String>,
) -> Result<ChainPrune> {
    use futures::StreamExt;
    let (mut snapshots, mut segments) = (Vec::new(), Vec::new());
    let mut listing = store.list("");
    while let Some(obj) = listing.next().await {
        let obj = obj?;
        if let Some(p) = crate::name::parse(&obj.key) {
            if crate::name::validate_file_name(&obj.key).is_ok() {
                snapshots.push((obj.key.clone(), p.timestamp));
            }
        } else if let Some(s) = SegmentName::parse(&obj.key) {
            segments.push(s);
        }
    }
    drop(listing);
    let now = chrono::Utc::now().timestamp();
    let retention = retention.map(|r| r.as_secs().min(i64::MAX as u64) as i64);
    let mut doomed = chain_expired(&snapshots, &segments, now, retention, keep);
    // Objects under an S3 Object Lock stay until their lock has passed (oldest first: bases by
    // the time in their name, segments by revision).
    doomed.bases.sort_by_key(|b| crate::name::parse(b).map(|p| p.timestamp));
    doomed.bases =
        crate::retention::without_held(store, std::mem::take(&mut doomed.bases), "chain bases past chain retention")
            .await?;
    doomed.segments = crate::retention::without_held(
        store,
        std::mem::take(&mut doomed.segments),
        "delta segments past chain retention",
    )
    .await?;
    for chunk in doomed.bases.chunks(500) {
        let keys: Vec<String> =
            chunk.iter().flat_map(|f| [f.clone(), crate::metadata::SnapshotMetadata::key_for(f)]).collect();
        store.delete(&keys).await?;
    }
    for chunk in doomed.segments.chunks(500) {
        // A segment's metadata document (the live hash at its end) goes with it.
        let keys: Vec<String> =
            chunk.iter().flat_map(|f| [f.clone(), crate::metadata::SnapshotMetadata::key_for(f)]).collect();
        store.delete(&keys).await?;
    }
    if !doomed.is_empty() {
        tracing::info!(
            store = %store.describe(),
            bases = doomed.bases.len(),
            segments = doomed.segments.len(),
            "chain retention: deleted chain bases and delta segments no restore inside --etcd-snapshot-delta-retention needs"
        );
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
        let runs: Vec<(i64, i64, usize)> = chains("here", &segs, &[], &Default::default())
            .iter()
            .map(|c| (c.from_revision, c.to_revision, c.segments))
            .collect();
        assert_eq!(runs, vec![(11, 50, 4), (60, 70, 1)]);
        // A base a little past where the first segment starts (a full snapshot newer than the
        // revision recorded for it): the overlapping segment still continues the chain.
        let (c, reached) = chain_after(15, None, &segs, None, None);
        assert_eq!((c.first().map(|x| (x.from, x.to)), reached), (Some((11, 25)), 50));
        let (c, reached) = chain_after(50, None, &segs, None, None);
        assert_eq!((c.len(), reached), (0, 50), "nothing reaches past 50 without a gap");
    }

    #[test]
    fn chains_split_at_bases_and_count_what_a_restore_replays() {
        let s = |from, to, closed| SegmentName::new(from, to, "a", closed, false);
        // Base 1 at revision 10; its chain to 250; base 2 at 250 (rotation), its chain to 400.
        let segs = vec![s(11, 100, 101), s(101, 250, 102), s(251, 300, 104), s(301, 400, 105), s(500, 510, 200)];
        let base = |file: &str, revision, taken| Base { file: file.into(), revision, history: None, taken };
        let bases = vec![base("chain-base-a-100", 10, 100), base("chain-base-a-103", 250, 103)];
        let sizes = segs.iter().map(|x| (x.file.clone(), 7u64)).collect();
        let got: Vec<(i64, i64, usize, Option<String>, i64, u64)> = chains("here", &segs, &bases, &sizes)
            .into_iter()
            .map(|c| (c.from_revision, c.to_revision, c.segments, c.base, c.revisions, c.bytes))
            .collect();
        assert_eq!(
            got,
            vec![
                (11, 250, 2, Some("chain-base-a-100".into()), 240, 14),
                (251, 400, 2, Some("chain-base-a-103".into()), 150, 14),
                (500, 510, 1, None, 11, 7),
            ]
        );
        // A snapshot inside a segment (taken by another node, or zipped): the overlapping
        // segment counts in both chains.
        let mid = vec![base("b1", 10, 100), base("b2", 120, 103)];
        let got: Vec<(i64, i64, i64)> = chains("here", &segs[..4], &mid, &Default::default())
            .into_iter()
            .map(|c| (c.from_revision, c.to_revision, c.revisions))
            .collect();
        assert_eq!(got, vec![(11, 120, 110), (121, 400, 280)]);
    }

    /// The retention rule at its boundaries: for every time `T` of the window `now - R ..= now`,
    /// what is kept holds a snapshot named before `T` and every segment of its chain up to `T`.
    #[test]
    fn chain_retention_keeps_what_every_restore_inside_the_window_needs() {
        let keep = std::collections::HashSet::new();
        let snaps =
            |ts: &[i64]| -> Vec<(String, i64)> { ts.iter().map(|t| (format!("chain-base-n1-{t}"), *t)).collect() };
        let seg = |from, to, closed| SegmentName::new(from, to, "n1", closed, false);
        // Bases at 100, 200 and 300; their chains' segments close after them.
        let bases = snaps(&[100, 200, 300]);
        let segs = vec![seg(1, 10, 150), seg(11, 20, 199), seg(21, 30, 200), seg(31, 40, 250), seg(41, 50, 301)];
        let r = Some(100);
        // now 300: W = 200; the newest base before 200 is 100: everything stays (T = 200 needs
        // base 100: base 200 is named with T's own second).
        assert!(chain_expired(&bases, &segs, 300, r, &keep).is_empty());
        // now 301: W = 201; base 200 is before it: base 100 and what closed before 200 go.
        let p = chain_expired(&bases, &segs, 301, r, &keep);
        assert_eq!(p.bases, ["chain-base-n1-100"]);
        assert_eq!(p.segments, [seg(1, 10, 150).file, seg(11, 20, 199).file]);
        // The segment closed in base 200's own second stays (it may belong to its chain).
        // Far later: the newest base and its chain stay whatever their age.
        let p = chain_expired(&bases, &segs, 10_000, r, &keep);
        assert_eq!(p.bases, ["chain-base-n1-100", "chain-base-n1-200"]);
        assert_eq!(p.segments.len(), 4, "only base 300's segment stays: {p:?}");
        // Retention off: no base goes, segments before the oldest snapshot do (as before).
        let p = chain_expired(&bases[1..], &segs, 10_000, None, &keep);
        assert!(p.bases.is_empty());
        assert_eq!(p.segments, [seg(1, 10, 150).file, seg(11, 20, 199).file]);
        // Cron snapshots neither anchor the rule nor are removed by it.
        let mut mixed = bases.clone();
        mixed.push(("etcd-snapshot-n1-260".into(), 260));
        let p = chain_expired(&mixed, &segs, 361, r, &keep);
        assert_eq!(p.bases, ["chain-base-n1-100"], "W = 261: base 200 anchors the rule, not the cron snapshot at 260");
        assert!(!p.bases.iter().any(|b| b.starts_with("etcd-snapshot")));
        // What waits in the upload queue stays.
        let queued: std::collections::HashSet<String> = [seg(1, 10, 150).file, "chain-base-n1-100".into()].into();
        let p = chain_expired(&bases, &segs, 301, r, &queued);
        assert!(p.bases.is_empty() && p.segments == [seg(11, 20, 199).file], "{p:?}");

        // Exhaustively: for each `now` and each `T` in its window, the restore that
        // `--cluster-reset-restore-to-time T` makes (the newest snapshot named before T, then
        // `chain_after` up to T) finds the same chain in what is kept as in everything.
        let revs = [(100, 0), (200, 20), (300, 40)];
        for now in 300..700 {
            let p = chain_expired(&bases, &segs, now, r, &keep);
            let kept_bases: Vec<(i64, i64)> =
                revs.iter().copied().filter(|(t, _)| !p.bases.contains(&format!("chain-base-n1-{t}"))).collect();
            let kept_segs: Vec<SegmentName> = segs.iter().filter(|x| !p.segments.contains(&x.file)).cloned().collect();
            assert!(kept_bases.iter().any(|(t, _)| *t == 300), "the newest base stays");
            for t in (now - 100)..=now {
                let pick = |bs: &[(i64, i64)]| bs.iter().rev().find(|(ts, _)| *ts < t).copied();
                let (Some(all), Some(kept)) = (pick(&revs), pick(&kept_bases)) else {
                    panic!("now {now}: no base before {t} kept: {kept_bases:?}");
                };
                assert_eq!(all, kept, "now {now}, T {t}");
                let (_, want) = chain_after(all.1, None, &segs, None, Some(t));
                let (_, got) = chain_after(kept.1, None, &kept_segs, None, Some(t));
                assert_eq!(got, want, "now {now}, T {t}: the chain to T is whole");
            }
        }
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
        let runs: Vec<(i64, i64, Option<String>)> = chains("here", &segs, &[], &Default::default())
            .into_iter()
            .map(|c| (c.from_revision, c.to_revision, c.history))
            .collect();
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
