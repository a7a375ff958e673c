//! Counters of scheduled snapshots per store (`local`, `s3`), rendered in Prometheus text format
//! on the supervisor API's `/metrics`, with what an alert needs to judge them without knowing
//! the server's flags: when the server started and the longest gap its schedule leaves between
//! two snapshots. `deploy/grafana` and `deploy/prometheus` use these names; a test reads them
//! back from a running server.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

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
