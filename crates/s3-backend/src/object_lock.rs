//! S3 Object Lock (WORM): `--etcd-s3-object-lock-mode GOVERNANCE|COMPLIANCE` with
//! `--etcd-s3-object-lock-days N` puts a retention on every object written (snapshots, their
//! metadata, delta segments): `x-amz-object-lock-mode` and `x-amz-object-lock-retain-until-date`
//! on each PUT and multipart initiation. Without the flags a bucket's default retention applies,
//! which S3 only accepts with a checksum on the upload ([`crate::checksum`] sends one always).
//!
//! Reading it back: a HEAD reports `x-amz-object-lock-mode`, `-retain-until-date` and
//! `-legal-hold` (to a caller allowed `s3:GetObjectRetention`/`GetObjectLegalHold`), from which
//! [`hold_of`] tells retention whether an object may go yet.

use std::fmt;

use chrono::{DateTime, Utc};
use k3s_snapshot_core::store::Hold;

/// The longest retention the flag takes (S3 allows up to 100 years).
pub const MAX_LOCK_DAYS: u32 = 36_500;

/// `--etcd-s3-object-lock-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Users with `s3:BypassGovernanceRetention` may still delete or shorten it.
    Governance,
    /// Nobody, the account's root included, can delete the object before the date.
    Compliance,
}

impl fmt::Display for LockMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LockMode::Governance => "GOVERNANCE",
            LockMode::Compliance => "COMPLIANCE",
        })
    }
}

/// The retention put on every object written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectLock {
    pub mode: LockMode,
    pub days: u32,
}

impl ObjectLock {
    /// From `--etcd-s3-object-lock-mode` and `--etcd-s3-object-lock-days`: both or neither.
    pub fn from_flags(mode: Option<&str>, days: Option<u32>) -> Result<Option<ObjectLock>, String> {
        let mode = match mode.map(str::trim).filter(|m| !m.is_empty()) {
            None => None,
            Some(m) if m.eq_ignore_ascii_case("GOVERNANCE") => Some(LockMode::Governance),
            Some(m) if m.eq_ignore_ascii_case("COMPLIANCE") => Some(LockMode::Compliance),
            Some(m) => return Err(format!("--etcd-s3-object-lock-mode {m:?} is not GOVERNANCE or COMPLIANCE")),
        };
        match (mode, days) {
            (None, None) => Ok(None),
            (Some(_), None) => Err("--etcd-s3-object-lock-mode needs --etcd-s3-object-lock-days N (the retention in days); without both, the bucket's default retention applies".into()),
            (None, Some(_)) => Err("--etcd-s3-object-lock-days needs --etcd-s3-object-lock-mode GOVERNANCE or COMPLIANCE".into()),
            (Some(_), Some(d)) if d == 0 || d > MAX_LOCK_DAYS => {
                Err(format!("--etcd-s3-object-lock-days {d} is not between 1 and {MAX_LOCK_DAYS}"))
            }
            (Some(mode), Some(days)) => Ok(Some(ObjectLock { mode, days })),
        }
    }

    /// The headers of an object written at `now`.
    pub(crate) fn headers(&self, now: DateTime<Utc>) -> [(&'static str, String); 2] {
        let until = now + chrono::Duration::days(i64::from(self.days));
        [
            ("x-amz-object-lock-mode", self.mode.to_string()),
            ("x-amz-object-lock-retain-until-date", until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        ]
    }
}

/// What an object's HEAD says about its lock at `now`: a legal hold, or a retention date still
/// ahead; `None` when nothing keeps it (no lock, or a date that has passed).
pub(crate) fn hold_of(headers: &reqwest::header::HeaderMap, now: DateTime<Utc>) -> Option<Hold> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if header("x-amz-object-lock-legal-hold").is_some_and(|v| v.eq_ignore_ascii_case("ON")) {
        return Some(Hold { what: "an object lock legal hold".into(), until: None });
    }
    let until = DateTime::parse_from_rfc3339(header("x-amz-object-lock-retain-until-date")?).ok()?.with_timezone(&Utc);
    if until <= now {
        return None;
    }
    let mode = header("x-amz-object-lock-mode").filter(|m| !m.is_empty()).unwrap_or("retention");
    Some(Hold { what: format!("object lock ({mode})"), until: Some(until) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_go_together_and_name_what_is_wrong() {
        assert_eq!(ObjectLock::from_flags(None, None), Ok(None));
        assert_eq!(
            ObjectLock::from_flags(Some("compliance"), Some(30)),
            Ok(Some(ObjectLock { mode: LockMode::Compliance, days: 30 }))
        );
        for (mode, days, want) in [
            (Some("GOVERNANCE"), None, "--etcd-s3-object-lock-days"),
            (None, Some(3), "--etcd-s3-object-lock-mode"),
            (Some("WORM"), Some(3), "not GOVERNANCE or COMPLIANCE"),
            (Some("GOVERNANCE"), Some(0), "not between 1 and"),
            (Some("GOVERNANCE"), Some(MAX_LOCK_DAYS + 1), "not between 1 and"),
        ] {
            let e = ObjectLock::from_flags(mode, days).unwrap_err();
            assert!(e.contains(want), "{mode:?} {days:?}: {e}");
        }
    }

    #[test]
    fn retention_runs_from_the_write() {
        let now = DateTime::parse_from_rfc3339("2025-03-01T10:00:00Z").unwrap().with_timezone(&Utc);
        let h = ObjectLock { mode: LockMode::Governance, days: 2 }.headers(now);
        assert_eq!(h[0], ("x-amz-object-lock-mode", "GOVERNANCE".to_string()));
        assert_eq!(h[1], ("x-amz-object-lock-retain-until-date", "2025-03-03T10:00:00Z".to_string()));
    }

    #[test]
    fn holds_are_read_from_the_head() {
        let now = DateTime::parse_from_rfc3339("2025-03-01T10:00:00Z").unwrap().with_timezone(&Utc);
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(hold_of(&h, now), None);
        h.insert("x-amz-object-lock-mode", "COMPLIANCE".parse().unwrap());
        h.insert("x-amz-object-lock-retain-until-date", "2025-03-01T09:59:59Z".parse().unwrap());
        assert_eq!(hold_of(&h, now), None, "a date that has passed holds nothing");
        h.insert("x-amz-object-lock-retain-until-date", "2025-03-02T10:00:00.000Z".parse().unwrap());
        let hold = hold_of(&h, now).unwrap();
        assert_eq!(hold.to_string(), "object lock (COMPLIANCE) until 2025-03-02T10:00:00Z");
        h.insert("x-amz-object-lock-legal-hold", "ON".parse().unwrap());
        assert_eq!(hold_of(&h, now).unwrap().until, None);
    }
}
