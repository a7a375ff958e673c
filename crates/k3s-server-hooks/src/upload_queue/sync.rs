//! The comparison of the snapshot dir with S3 that finds what to upload after a start (or after
//! S3 came back): what is kept locally, missing in S3, and would survive S3 retention.

use futures::StreamExt;
use k3s_snapshot_core::delta::SegmentName;
use k3s_snapshot_core::name;
use k3s_snapshot_core::retention::expired;
use k3s_snapshot_core::store::SnapshotStore;

use super::*;

impl UploadQueue {
    /// Compares the snapshot dir with S3 and queues what is local, missing in S3 (by name and
    /// size) and would survive S3 retention. The error is one line.
    pub(super) async fn sync(&self) -> std::result::Result<(), String> {
        let local = list_all(&self.s.local).await.map_err(|e| format!("listing the snapshot dir: {e}"))?;
        let remote = list_all(self.s.remote.as_ref())
            .await
            .map_err(|e| format!("listing {} to find what to upload: {e}", self.s.remote.describe()))?;
        let chain_retention = self.s.chain_retention.map(|r| r.as_secs().min(i64::MAX as u64) as i64);
        let plan = plan_uploads(
            &local,
            &remote,
            &self.s.scheduled_prefix,
            self.s.remote_retention,
            chain_retention,
            chrono::Utc::now().timestamp(),
        );
        let (mut snaps, mut segs) = (0, 0);
        {
            let mut st = self.state();
            for (file, ts, size) in plan.snapshots {
                if let std::collections::btree_map::Entry::Vacant(v) = st.snapshots.entry((ts, file)) {
                    v.insert(Entry::new(ts.saturating_mul(1000), size));
                    snaps += 1;
                }
            }
            for (seg, size) in plan.segments {
                let key = (seg.from, seg.to, seg.file.clone());
                if let std::collections::btree_map::Entry::Vacant(v) = st.segments.entry(key) {
                    v.insert(Entry::new(seg.closed.saturating_mul(1000), size));
                    segs += 1;
                }
            }
            st.synced = true;
            self.publish_segment_lag(&st);
        }
        if snaps + segs > 0 {
            tracing::info!(
                snapshots = snaps,
                segments = segs,
                store = %self.s.remote.describe(),
                "upload queue: found snapshots and delta segments kept locally but missing in s3; uploading them, oldest first"
            );
        }
        self.poke();
        Ok(())
    }
}

/// Every object of a store: (key, size).
async fn list_all(store: &dyn SnapshotStore) -> k3s_snapshot_core::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    let mut listing = store.list("");
    while let Some(obj) = listing.next().await {
        let obj = obj?;
        out.push((obj.key, obj.size));
    }
    Ok(out)
}

/// What a comparison found to upload: snapshots (file, timestamp, size) and segments, each in
/// upload order.
#[derive(Debug, Default, PartialEq)]
struct Plan {
    snapshots: Vec<(String, i64, u64)>,
    segments: Vec<(SegmentName, u64)>,
}

/// Local objects missing in S3 (or there with another size), less what S3 retention would
/// delete right after: snapshots of `prefix` beyond the `keep` newest of S3's and the planned
/// ones together, and the chain bases and segments that chain retention (`chain_retention`
/// seconds at `now`, see `delta::chain_expired`) removes from what S3 then holds.
fn plan_uploads(
    local: &[(String, u64)],
    remote: &[(String, u64)],
    prefix: &str,
    keep: i64,
    chain_retention: Option<i64>,
    now: i64,
) -> Plan {
    let in_remote: std::collections::HashMap<&str, u64> = remote.iter().map(|(k, s)| (k.as_str(), *s)).collect();
    let missing = |k: &str, size: u64| in_remote.get(k) != Some(&size);
    let mut snapshots: Vec<(String, i64, u64)> = local
        .iter()
        .filter(|(k, s)| missing(k, *s) && name::validate_file_name(k).is_ok())
        .filter_map(|(k, s)| name::parse(k).map(|p| (k.clone(), p.timestamp, *s)))
        .collect();
    // Retention of the scheduled prefix over S3's snapshots and the planned ones together.
    let mut candidates: Vec<(String, i64)> =
        remote.iter().filter_map(|(k, _)| name::matches_prefix(k, prefix).map(|ts| (k.clone(), ts))).collect();
    candidates
        .extend(snapshots.iter().filter_map(|(k, ts, _)| name::matches_prefix(k, prefix).map(|_| (k.clone(), *ts))));
    candidates.sort();
    candidates.dedup();
    let doomed: std::collections::HashSet<String> = expired(candidates, keep).into_iter().collect();
    snapshots.retain(|(k, _, _)| !doomed.contains(k));
    snapshots.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    let mut segments: Vec<(SegmentName, u64)> = local
        .iter()
        .filter(|(k, s)| missing(k, *s))
        .filter_map(|(k, s)| SegmentName::parse(k).map(|n| (n, *s)))
        .collect();
    // Chain retention over what S3 then holds: its snapshots and segments and the planned ones.
    let mut held: Vec<(String, i64)> = remote
        .iter()
        .filter(|(k, _)| !doomed.contains(k) && name::validate_file_name(k).is_ok())
        .filter_map(|(k, _)| name::parse(k).map(|p| (k.clone(), p.timestamp)))
        .chain(snapshots.iter().map(|(k, ts, _)| (k.clone(), *ts)))
        .collect();
    held.sort();
    held.dedup();
    let held_segments: Vec<SegmentName> = remote
        .iter()
        .filter_map(|(k, _)| SegmentName::parse(k))
        .chain(segments.iter().map(|(n, _)| n.clone()))
        .collect();
    let pruned = k3s_snapshot_core::delta::chain_expired(
        &held,
        &held_segments,
        now,
        chain_retention,
        &std::collections::HashSet::new(),
    );
    snapshots.retain(|(k, _, _)| !pruned.bases.contains(k));
    segments.retain(|(n, _)| !pruned.segments.contains(&n.file));
    segments.sort_by(|a, b| (a.0.from, a.0.to, &a.0.file).cmp(&(b.0.from, b.0.to, &b.0.file)));
    Plan { snapshots, segments }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(from: i64, to: i64, closed: i64) -> String {
        SegmentName::new(from, to, "n1", closed, false).file
    }

    #[test]
    fn plans_what_is_missing_oldest_first_and_skips_what_retention_would_delete() {
        let local = vec![
            ("etcd-snapshot-n1-300".to_string(), 10),
            ("etcd-snapshot-n1-100".to_string(), 10),
            ("etcd-snapshot-n1-200".to_string(), 10),
            ("on-demand-n1-150".to_string(), 10),
            (seg(1, 5, 120), 7),
            (seg(6, 9, 250), 7),
            (seg(10, 12, 310), 7),
            ("etcd-snapshot-n1-50.zip".to_string(), 10),
            ("not-ours".to_string(), 1),
        ];
        // S3 holds the newest already, and an older one of another node, and a segment.
        let remote = vec![
            ("etcd-snapshot-n1-300".to_string(), 10),
            ("etcd-snapshot-n2-190".to_string(), 10),
            (seg(10, 12, 310), 7),
        ];
        let plan = plan_uploads(&local, &remote, "etcd-snapshot", 3, None, 1000);
        let names: Vec<&str> = plan.snapshots.iter().map(|(k, _, _)| k.as_str()).collect();
        // Keep 3 of {300, 200, 190 (n2), 100, 50}: 300, 200, 190; 100 and 50 would be pruned.
        assert_eq!(names, ["on-demand-n1-150", "etcd-snapshot-n1-200"]);
        // S3 then holds 150, 190, 200, 300: segments closed before 150 are pruned there.
        let segs: Vec<(i64, i64)> = plan.segments.iter().map(|(s, _)| (s.from, s.to)).collect();
        assert_eq!(segs, [(6, 9)]);
    }

    #[test]
    fn a_different_size_in_s3_is_uploaded_again_and_keep_0_keeps_all() {
        let local = vec![
            ("etcd-snapshot-n1-100".to_string(), 10),
            ("etcd-snapshot-n1-200".to_string(), 10),
            (seg(1, 2, 50), 3),
        ];
        let remote = vec![("etcd-snapshot-n1-200".to_string(), 4)];
        let plan = plan_uploads(&local, &remote, "etcd-snapshot", 0, None, 1000);
        let names: Vec<&str> = plan.snapshots.iter().map(|(k, _, _)| k.as_str()).collect();
        assert_eq!(names, ["etcd-snapshot-n1-100", "etcd-snapshot-n1-200"]);
        assert!(plan.segments.is_empty(), "closed before the oldest snapshot S3 will hold");
        let plan = plan_uploads(&[(seg(1, 2, 50), 3)], &[], "etcd-snapshot", 0, None, 1000);
        assert_eq!(plan.segments.len(), 1, "no snapshot anywhere: S3 prunes no segment");
    }

    #[test]
    fn chain_bases_left_local_are_planned_unless_chain_retention_removes_them() {
        let local = vec![
            ("chain-base-n1-100".to_string(), 10),
            ("chain-base-n1-200".to_string(), 10),
            ("chain-base-n1-300".to_string(), 10),
            (seg(1, 5, 150), 7),
            (seg(6, 9, 250), 7),
            (seg(10, 12, 310), 7),
        ];
        // Keep 1 of the scheduled prefix: chain bases are not of it.
        let plan = plan_uploads(&local, &[], "etcd-snapshot", 1, None, 1000);
        assert_eq!(plan.snapshots.len(), 3);
        assert_eq!(plan.segments.len(), 3);
        // Chain retention of 50 s at 301: base 200 is taken before 251, base 100 and the segment
        // closed before 200 would go at once.
        let plan = plan_uploads(&local, &[], "etcd-snapshot", 1, Some(50), 301);
        let names: Vec<&str> = plan.snapshots.iter().map(|(k, _, _)| k.as_str()).collect();
        assert_eq!(names, ["chain-base-n1-200", "chain-base-n1-300"]);
        let segs: Vec<(i64, i64)> = plan.segments.iter().map(|(s, _)| (s.from, s.to)).collect();
        assert_eq!(segs, [(6, 9), (10, 12)]);
    }
}
