//! Counters of scheduled snapshots per store (`local`, `s3`), rendered in Prometheus text format
//! on the supervisor API's `/metrics`, with what an alert needs to judge them without knowing
//! the server's flags: when the server started and the longest gap its schedule leaves between
//! two snapshots. `deploy/grafana` and `deploy/prometheus` use these names; a test reads them
//! back from a running server. The delta follower's shipping has its own ([`DeltaMetrics`]).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// The store label of local snapshots.
pub const LOCAL: &str = "local";
/// The store label of S3 uploads.
pub const REMOTE: &str = "s3";

#[derive(Debug, Default, Clone, PartialEq)]
pub struct StoreStats {
    pub taken: u64,
    pub failed: u64,
    /// Unix seconds of the last success.
    pub last_success: Option<i64>,
    pub last_duration_secs: Option<f64>,
    pub last_size_bytes: Option<u64>,
    /// One line: why the last attempt failed (cleared by a success).
    pub last_error: Option<String>,
}

/// Snapshot counters, shared between the scheduler and the API.
#[derive(Debug, Default)]
pub struct SnapshotMetrics {
    stores: Mutex<BTreeMap<&'static str, StoreStats>>,
    /// Unix seconds the server started at.
    started: Option<i64>,
    /// The longest gap between two fires of the schedule; `None` without scheduled snapshots.
    schedule_gap_secs: Option<f64>,
}

impl SnapshotMetrics {
    /// Metrics of a server started now, with every store it uses at zero (so counters exist,
    /// and an alert can tell "S3 is on" from "S3 is off" before the first upload).
    pub fn new(stores: &[&'static str], schedule_gap: Option<std::time::Duration>) -> SnapshotMetrics {
        SnapshotMetrics {
            stores: Mutex::new(stores.iter().map(|s| (*s, StoreStats::default())).collect()),
            started: Some(chrono::Utc::now().timestamp()),
            schedule_gap_secs: schedule_gap.map(|d| d.as_secs_f64()),
        }
    }

    pub fn success(&self, store: &'static str, duration_secs: f64, size: u64) {
        let mut m = self.stores.lock().expect("metrics lock");
        let s = m.entry(store).or_default();
        s.taken += 1;
        s.last_success = Some(chrono::Utc::now().timestamp());
        s.last_duration_secs = Some(duration_secs);
        s.last_size_bytes = Some(size);
        s.last_error = None;
    }

    pub fn failure(&self, store: &'static str, error: String) {
        let mut m = self.stores.lock().expect("metrics lock");
        let s = m.entry(store).or_default();
        s.failed += 1;
        s.last_error = Some(error);
    }

    pub fn get(&self, store: &str) -> StoreStats {
        self.stores.lock().expect("metrics lock").get(store).cloned().unwrap_or_default()
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let m = self.stores.lock().expect("metrics lock").clone();
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, value: &dyn Fn(&StoreStats) -> Option<String>| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (store, s) in &m {
                if let Some(v) = value(s) {
                    let _ = writeln!(out, "{name}{{store=\"{store}\"}} {v}");
                }
            }
        };
        family("k3s_snapshot_scheduled_taken_total", "counter", "Scheduled snapshots stored successfully.", &|s| {
            Some(s.taken.to_string())
        });
        family("k3s_snapshot_scheduled_failed_total", "counter", "Scheduled snapshots that failed.", &|s| {
            Some(s.failed.to_string())
        });
        family(
            "k3s_snapshot_last_success_timestamp_seconds",
            "gauge",
            "Unix time of the last successful scheduled snapshot.",
            &|s| s.last_success.map(|v| v.to_string()),
        );
        family(
            "k3s_snapshot_last_duration_seconds",
            "gauge",
            "Duration of the last successful scheduled snapshot.",
            &|s| s.last_duration_secs.map(|v| format!("{v:.3}")),
        );
        family("k3s_snapshot_last_size_bytes", "gauge", "Size of the last successful scheduled snapshot.", &|s| {
            s.last_size_bytes.map(|v| v.to_string())
        });
        family("k3s_snapshot_last_failed", "gauge", "1 when the last scheduled snapshot attempt failed.", &|s| {
            Some(if s.last_error.is_some() { "1" } else { "0" }.to_string())
        });
        let mut single = |name: &str, help: &str, value: Option<String>| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            if let Some(v) = value {
                let _ = writeln!(out, "{name} {v}");
            }
        };
        single("k3s_snapshot_start_time_seconds", "Unix time the server started.", self.started.map(|v| v.to_string()));
        single(
            "k3s_snapshot_schedule_interval_seconds",
            "Longest gap between two scheduled snapshots in the schedule's next fires (absent when scheduled snapshots are off).",
            self.schedule_gap_secs.map(|v| format!("{v:.0}")),
        );
        out
    }
}

/// Restore drills of `--etcd-snapshot-verify-schedule` on this server (absent without it). In
/// an HA cluster one server drills per tick, so alerts take the newest success over the servers.
#[derive(Debug)]
pub struct DrillMetrics {
    stats: Mutex<DrillStats>,
    /// The longest gap between two drills of the schedule.
    schedule_gap_secs: Option<f64>,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct DrillStats {
    pub succeeded: u64,
    pub failed: u64,
    /// Ticks another server drilled (the election's losers count them).
    pub elsewhere: u64,
    pub last_success: Option<i64>,
    pub last_rto_secs: Option<f64>,
    pub last_content_compared: bool,
    /// One line: why the last drill failed (cleared by a success).
    pub last_error: Option<String>,
}

impl DrillMetrics {
    pub fn new(schedule_gap: Option<std::time::Duration>) -> DrillMetrics {
        DrillMetrics {
            stats: Mutex::new(DrillStats::default()),
            schedule_gap_secs: schedule_gap.map(|d| d.as_secs_f64()),
        }
    }

    pub fn success(&self, rto_secs: f64, content_compared: bool) {
        let mut s = self.stats.lock().expect("metrics lock");
        s.succeeded += 1;
        s.last_success = Some(chrono::Utc::now().timestamp());
        s.last_rto_secs = Some(rto_secs);
        s.last_content_compared = content_compared;
        s.last_error = None;
    }

    pub fn failure(&self, error: String) {
        let mut s = self.stats.lock().expect("metrics lock");
        s.failed += 1;
        s.last_error = Some(error);
    }

    pub fn elsewhere(&self) {
        self.stats.lock().expect("metrics lock").elsewhere += 1;
    }

    pub fn get(&self) -> DrillStats {
        self.stats.lock().expect("metrics lock").clone()
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let s = self.get();
        let mut out = String::new();
        let mut one = |name: &str, kind: &str, help: &str, value: Option<String>| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            if let Some(v) = value {
                let _ = writeln!(out, "{name} {v}");
            }
        };
        one(
            "k3s_snapshot_verify_succeeded_total",
            "counter",
            "Restore drills that proved a snapshot.",
            Some(s.succeeded.to_string()),
        );
        one("k3s_snapshot_verify_failed_total", "counter", "Restore drills that failed.", Some(s.failed.to_string()));
        one(
            "k3s_snapshot_verify_elsewhere_total",
            "counter",
            "Drill schedule ticks another server of the cluster took.",
            Some(s.elsewhere.to_string()),
        );
        one(
            "k3s_snapshot_verify_last_success_timestamp_seconds",
            "gauge",
            "Unix time of this server's last successful restore drill.",
            s.last_success.map(|v| v.to_string()),
        );
        one(
            "k3s_snapshot_verify_last_rto_seconds",
            "gauge",
            "Recovery time measured by the last successful restore drill, end to end.",
            s.last_rto_secs.map(|v| format!("{v:.3}")),
        );
        one(
            "k3s_snapshot_verify_last_content_compared",
            "gauge",
            "1 when the last successful drill compared the restored content with the cluster's hashkv.",
            s.last_success.map(|_| if s.last_content_compared { "1" } else { "0" }.to_string()),
        );
        one(
            "k3s_snapshot_verify_last_failed",
            "gauge",
            "1 when this server's last restore drill failed.",
            Some(if s.last_error.is_some() { "1" } else { "0" }.to_string()),
        );
        one(
            "k3s_snapshot_verify_schedule_interval_seconds",
            "gauge",
            "Longest gap between two restore drills in the drill schedule's next fires.",
            self.schedule_gap_secs.map(|v| format!("{v:.0}")),
        );
        out
    }
}

/// What `/metrics` shows of the shipping.
#[derive(Debug, Default)]
pub struct DeltaMetrics {
    /// `--etcd-snapshot-delta-interval`, so that an alert can scale its lag threshold.
    pub interval: Duration,
    pub shipped_revision: AtomicI64,
    /// The end of the last segment closed on disk: a restarted watch follows from here, so a
    /// compaction up to it breaks no chain (the health loop's compaction cap).
    pub closed_revision: AtomicI64,
    pub etcd_revision: AtomicI64,
    /// Unix milliseconds at which the first event of the open segment arrived; 0 when none is open.
    pub pending_since_ms: AtomicI64,
    /// The same for the oldest closed segment waiting in the upload queue; 0 when none waits.
    pub queued_since_ms: AtomicI64,
    pub segments: AtomicU64,
    pub bytes: AtomicU64,
    pub chain_breaks: AtomicU64,
    pub upload_failures: AtomicU64,
    /// The revision of the current chain's base (0 until a chain starts).
    pub chain_base_revision: AtomicI64,
    /// Unix seconds of the current chain's base (from its name).
    pub chain_base_time: AtomicI64,
    /// Bytes of the current chain's shipped segments.
    pub chain_bytes: AtomicU64,
    /// New chains started because the current one reached a bound.
    pub chain_rotations: AtomicU64,
    /// `--etcd-snapshot-delta-max-revisions` (0: none).
    pub max_revisions: u64,
    /// `--etcd-snapshot-delta-max-age` (`None`: none).
    pub max_age: Option<Duration>,
}

impl DeltaMetrics {
    pub fn new(interval: Duration, max_revisions: u64, max_age: Option<Duration>) -> DeltaMetrics {
        DeltaMetrics { interval, max_revisions, max_age, ..DeltaMetrics::default() }
    }

    /// A segment reached its destination (S3 with `--etcd-s3`, else the snapshot dir).
    pub fn segment_shipped(&self, to: i64, bytes: u64) {
        self.segments.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.shipped_revision.fetch_max(to, Ordering::Relaxed);
        // A segment that reaches past the base belongs to its chain (one still shipping from
        // the previous chain ends at or before it).
        if to > self.chain_base_revision.load(Ordering::Relaxed) {
            self.chain_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Prometheus text of the shipping.
    pub fn render(&self) -> String {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let (open, queued) =
            (self.pending_since_ms.load(Ordering::Relaxed), self.queued_since_ms.load(Ordering::Relaxed));
        let pending = [open, queued].into_iter().filter(|v| *v > 0).min().unwrap_or(0);
        let lag_secs = if pending == 0 { 0.0 } else { (now_ms - pending).max(0) as f64 / 1000.0 };
        let shipped = self.shipped_revision.load(Ordering::Relaxed);
        let etcd = self.etcd_revision.load(Ordering::Relaxed);
        let base = self.chain_base_revision.load(Ordering::Relaxed);
        let chain_revisions = if base > 0 { (shipped - base).max(0) } else { 0 };
        let rows: [(&str, &str, &str, String); 14] = [
            (
                "k3s_snapshot_delta_interval_seconds",
                "gauge",
                "The interval at which delta segments are closed and shipped (--etcd-snapshot-delta-interval).",
                self.interval.as_secs_f64().to_string(),
            ),
            (
                "k3s_snapshot_delta_shipped_revision",
                "gauge",
                "Last etcd revision shipped in a delta segment.",
                shipped.to_string(),
            ),
            (
                "k3s_snapshot_delta_lag_revisions",
                "gauge",
                "Revisions etcd is ahead of the last shipped one.",
                (etcd - shipped).max(0).to_string(),
            ),
            (
                "k3s_snapshot_delta_lag_seconds",
                "gauge",
                "Age of the oldest change not shipped yet.",
                format!("{lag_secs:.3}"),
            ),
            (
                "k3s_snapshot_delta_segments_total",
                "counter",
                "Delta segments shipped.",
                self.segments.load(Ordering::Relaxed).to_string(),
            ),
            (
                "k3s_snapshot_delta_bytes_total",
                "counter",
                "Bytes of delta segments shipped.",
                self.bytes.load(Ordering::Relaxed).to_string(),
            ),
            (
                "k3s_snapshot_delta_chain_breaks_total",
                "counter",
                "Chains broken by a compaction or downtime (a full snapshot started a new one).",
                self.chain_breaks.load(Ordering::Relaxed).to_string(),
            ),
            (
                "k3s_snapshot_delta_upload_failures_total",
                "counter",
                "Delta segment upload attempts that failed (each retried before any later segment).",
                self.upload_failures.load(Ordering::Relaxed).to_string(),
            ),
            (
                "k3s_snapshot_delta_chain_revisions",
                "gauge",
                "Revisions a restore from the newest chain's base replays to reach the last shipped one (shipped revision minus the base's).",
                chain_revisions.to_string(),
            ),
            (
                "k3s_snapshot_delta_chain_bytes",
                "gauge",
                "Bytes of the newest chain's shipped delta segments (what a restore from its base downloads and replays).",
                self.chain_bytes.load(Ordering::Relaxed).to_string(),
            ),
            (
                "k3s_snapshot_delta_chain_base_timestamp_seconds",
                "gauge",
                "Unix time of the newest chain's base snapshot (0 before the first chain).",
                self.chain_base_time.load(Ordering::Relaxed).to_string(),
            ),
            (
                "k3s_snapshot_delta_chain_max_revisions",
                "gauge",
                "Revisions after which a new chain starts (--etcd-snapshot-delta-max-revisions; 0: no limit).",
                self.max_revisions.to_string(),
            ),
            (
                "k3s_snapshot_delta_chain_max_age_seconds",
                "gauge",
                "Age of a chain's base after which a new chain starts (--etcd-snapshot-delta-max-age; 0: no limit).",
                self.max_age.map_or(0.0, |d| d.as_secs_f64()).to_string(),
            ),
            (
                "k3s_snapshot_delta_chain_rotations_total",
                "counter",
                "New chains started because the current one reached --etcd-snapshot-delta-max-revisions or -max-age.",
                self.chain_rotations.load(Ordering::Relaxed).to_string(),
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, v) in rows {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drills_export_successes_failures_and_the_last_rto() {
        let m = DrillMetrics::new(Some(std::time::Duration::from_secs(86400)));
        let text = m.render();
        assert!(text.contains("\nk3s_snapshot_verify_succeeded_total 0\n"), "{text}");
        assert!(!text.contains("\nk3s_snapshot_verify_last_rto_seconds "), "no drill yet: {text}");
        assert!(text.contains("\nk3s_snapshot_verify_schedule_interval_seconds 86400\n"), "{text}");
        m.failure("content differs".into());
        assert!(m.render().contains("\nk3s_snapshot_verify_last_failed 1\n"));
        m.success(12.5, true);
        let text = m.render();
        for line in [
            "k3s_snapshot_verify_succeeded_total 1",
            "k3s_snapshot_verify_failed_total 1",
            "k3s_snapshot_verify_last_rto_seconds 12.500",
            "k3s_snapshot_verify_last_content_compared 1",
            "k3s_snapshot_verify_last_failed 0",
        ] {
            assert!(text.contains(&format!("\n{line}\n")), "{line}: {text}");
        }
    }

    #[test]
    fn renders_per_store_labels() {
        let m = SnapshotMetrics::default();
        m.success("local", 0.5, 1234);
        m.failure("s3", "connection refused".into());
        let text = m.render();
        assert!(text.contains("k3s_snapshot_scheduled_taken_total{store=\"local\"} 1"), "{text}");
        assert!(text.contains("k3s_snapshot_scheduled_failed_total{store=\"s3\"} 1"), "{text}");
        assert!(text.contains("k3s_snapshot_last_size_bytes{store=\"local\"} 1234"), "{text}");
        assert!(text.contains("k3s_snapshot_last_failed{store=\"s3\"} 1"), "{text}");
        assert!(!text.contains("last_success_timestamp_seconds{store=\"s3\"}"), "{text}");
        assert!(!text.contains("\nk3s_snapshot_schedule_interval_seconds "), "no schedule, no value: {text}");
    }

    #[test]
    fn a_new_server_exports_its_stores_at_zero_its_start_and_its_schedule_gap() {
        let m = SnapshotMetrics::new(&["local", "s3"], Some(std::time::Duration::from_secs(43200)));
        let text = m.render();
        for store in ["local", "s3"] {
            assert!(text.contains(&format!("k3s_snapshot_scheduled_taken_total{{store=\"{store}\"}} 0")), "{text}");
            assert!(text.contains(&format!("k3s_snapshot_last_failed{{store=\"{store}\"}} 0")), "{text}");
        }
        assert!(text.contains("\nk3s_snapshot_schedule_interval_seconds 43200\n"), "{text}");
        let started = text.lines().find_map(|l| l.strip_prefix("k3s_snapshot_start_time_seconds ")).unwrap();
        assert!((started.parse::<i64>().unwrap() - chrono::Utc::now().timestamp()).abs() < 5, "{text}");
    }
}
