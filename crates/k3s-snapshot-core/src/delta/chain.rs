//! Chains: the contiguous segments after a base snapshot, within one history, as a restore replays
//! them ([`chain_after`], [`chains`]), and chain retention ([`prune_chains`]).

use crate::store::SnapshotStore;
use crate::Result;

use super::{SegmentName, PREFIX};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
