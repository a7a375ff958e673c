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
//!
//! Here: names and events; the parts: `segment` (writing, verifying and reading a segment file)
//! and `chain` (chains of segments after a base, and their retention).

mod chain;
mod segment;

use prost::Message;

use crate::name::AGE_SUFFIX;

pub use chain::{
    chain_after, chain_expired, chains, chains_in, list_segments, prune_chains, Base, Chain, ChainPrune, BASE_PREFIX,
};
pub use segment::{read_events, read_events_while, verify, SegmentWriter, MAX_FRAME};

/// Suffix of a segment (an encrypted one adds `.age`).
pub const SUFFIX: &str = ".seg";
/// Name prefix of a segment.
pub const PREFIX: &str = "delta-";

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
