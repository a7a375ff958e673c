//! Counters of scheduled snapshots per store (`local`, `s3`), rendered in Prometheus text format
//! on the supervisor API's `/metrics`.

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
}

impl SnapshotMetrics {
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
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
