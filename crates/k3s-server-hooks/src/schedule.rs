//! `--etcd-snapshot-schedule-cron`: standard 5-field cron (minute hour day-of-month month
//! day-of-week), the `@yearly`/`@monthly`/`@weekly`/`@daily`/`@hourly` macros, and `@every <d>`
//! with a Go-style duration (`30s`, `5m`, `1h30m`).
//!
//! The `cron` crate wants a seconds field and numbers days of the week 1-7 from Sunday, and it
//! ANDs day-of-month with day-of-week. Standard cron numbers them 0-7 (0 and 7 are Sunday) and,
//! when both day fields are restricted, fires on either. So the day-of-week field is expanded
//! here into explicit days, and a schedule restricting both day fields is two schedules whose
//! earliest next time wins.
//!
//! Cron fields are read in a time zone, as k3s's robfig/cron reads them: the machine's local zone
//! (`TZ`, else `/etc/localtime`), or the zone a `CRON_TZ=Zone ` (or `TZ=Zone `) prefix names.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::{Error, Result};

/// A parsed schedule.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// One or two `cron` schedules (two when both day fields are restricted: either matches),
    /// read in `tz` (`None`: the local zone).
    Cron { expr: String, schedules: Vec<cron::Schedule>, tz: Option<chrono_tz::Tz> },
    /// `@every <duration>`: fixed interval from the previous run.
    Every(Duration),
}

impl Schedule {
    pub fn parse(expr: &str) -> Result<Schedule> {
        let bad = |reason: String| Error::Cron { expr: expr.to_string(), reason };
        let mut trimmed = expr.trim();
        let mut tz = None;
        if let Some(rest) = trimmed.strip_prefix("CRON_TZ=").or_else(|| trimmed.strip_prefix("TZ=")) {
            let (zone, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            tz = Some(zone.parse::<chrono_tz::Tz>().map_err(|_| {
                bad(format!("unknown time zone {zone:?}; use an IANA name such as UTC or Europe/Berlin"))
            })?);
            trimmed = rest.trim();
        }
        if let Some(d) = trimmed.strip_prefix("@every") {
            let d = parse_go_duration(d.trim()).map_err(bad)?;
            if d < Duration::from_secs(1) {
                return Err(bad("@every needs at least 1s".into()));
            }
            return Ok(Schedule::Every(d));
        }
        let five = match trimmed {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            s if s.starts_with('@') => {
                return Err(bad(
                    "unknown macro; use @yearly, @monthly, @weekly, @daily, @hourly or @every <duration>".into()
                ))
            }
            s => s,
        };
        let fields: Vec<&str> = five.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(bad(format!(
                "expected 5 fields (minute hour day-of-month month day-of-week), got {}",
                fields.len()
            )));
        }
        let dow = expand_dow(fields[4]).map_err(bad)?;
        let dom_restricted = fields[2] != "*" && fields[2] != "?";
        let dow_restricted = dow.is_some();
        let dow_field = dow.unwrap_or_else(|| "*".to_string());
        let build = |dom: &str, dow: &str| {
            let six = format!("0 {} {} {} {} {}", fields[0], fields[1], dom, fields[3], dow);
            cron::Schedule::from_str(&six).map_err(|e| bad(e.to_string()))
        };
        let schedules = if dom_restricted && dow_restricted {
            vec![build(fields[2], "*")?, build("*", &dow_field)?]
        } else {
            vec![build(fields[2], &dow_field)?]
        };
        let s = Schedule::Cron { expr: expr.to_string(), schedules, tz };
        if s.next_after(Utc::now()).is_none() {
            return Err(bad("it never fires".into()));
        }
        Ok(s)
    }

    /// The first time strictly after `t` that the schedule fires.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every(d) => chrono::Duration::from_std(*d).ok().map(|d| t + d),
            Schedule::Cron { schedules, tz: Some(tz), .. } => schedules
                .iter()
                .filter_map(|s| s.after(&t.with_timezone(tz)).next())
                .map(|n| n.with_timezone(&Utc))
                .min(),
            Schedule::Cron { schedules, tz: None, .. } => schedules
                .iter()
                .filter_map(|s| s.after(&t.with_timezone(&chrono::Local)).next())
                .map(|n| n.with_timezone(&Utc))
                .min(),
        }
    }
}

impl Schedule {
    /// The longest time between two consecutive fires among the next `fires` after `from`: what
    /// the schedule may leave between two snapshots (`/metrics` exports it for alerts). `None`
    /// when it fires fewer than twice.
    pub fn longest_gap(&self, from: DateTime<Utc>, fires: usize) -> Option<Duration> {
        let mut t = self.next_after(from)?;
        let mut longest: Option<Duration> = None;
        for _ in 1..fires {
            let Some(n) = self.next_after(t) else { break };
            let gap = (n - t).to_std().unwrap_or_default();
            longest = longest.max(Some(gap));
            t = n;
        }
        longest
    }
}

const DAY_NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

fn day_number(s: &str) -> std::result::Result<u32, String> {
    let l = s.to_ascii_lowercase();
    if let Some(i) = DAY_NAMES.iter().position(|d| *d == l) {
        return Ok(i as u32);
    }
    match s.parse::<u32>() {
        Ok(n) if n <= 7 => Ok(n % 7),
        _ => Err(format!("day of week {s:?} is not 0-7 or sun..sat")),
    }
}

/// Expands a standard day-of-week field into the `cron` crate's 1-7 numbering;
/// `None` when it allows every day.
fn expand_dow(field: &str) -> std::result::Result<Option<String>, String> {
    if field == "*" || field == "?" {
        return Ok(None);
    }
    let mut days = [false; 7];
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => (r, s.parse::<u32>().map_err(|_| format!("bad step in {item:?}"))?),
            None => (item, 1),
        };
        if step == 0 {
            return Err(format!("step 0 in {item:?}"));
        }
        let (lo, hi) = match range {
            "*" => (0, 6),
            r => match r.split_once('-') {
                Some((a, b)) => {
                    // 7 means Sunday, but as a range end it is the end of the week (`5-7`).
                    let lo = day_number(a)?;
                    let hi = if b == "7" { 7 } else { day_number(b)? };
                    (lo, hi)
                }
                None if item.contains('/') => (day_number(r)?, 6),
                None => {
                    let d = day_number(r)?;
                    (d, d)
                }
            },
        };
        if lo > hi {
            return Err(format!("range {range:?} goes backwards"));
        }
        let mut d = lo;
        while d <= hi {
            days[(d % 7) as usize] = true;
            d += step;
        }
    }
    if days.iter().all(|d| *d) {
        return Ok(None);
    }
    let list: Vec<String> = (0..7).filter(|d| days[*d]).map(|d| (d + 1).to_string()).collect();
    Ok(Some(list.join(",")))
}

/// The longest duration any flag or schedule takes: a year. Longer is surely a typo, and bounding
/// it keeps every later addition to a time from overflowing.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// A Go-style duration (`30s`, `5m`, `1h30m`, `1.5s`, `250ms`), as k3s's flags and robfig/cron's
/// `@every` take them; at most [`MAX_DURATION`]. Never panics: absurd numbers are errors.
pub fn parse_go_duration(s: &str) -> std::result::Result<Duration, String> {
    if s.is_empty() {
        return Err("empty duration: write it like 30s, 5m or 1h".into());
    }
    let too_long = || format!("duration {s:?} is too long: at most {}h", MAX_DURATION.as_secs() / 3600);
    let mut total_ms: f64 = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_end == 0 {
            return Err(format!("duration {s:?}: expected a number; write it like 30s, 5m or 1h"));
        }
        if num_end > 24 {
            return Err(too_long());
        }
        let n: f64 = rest[..num_end].parse().map_err(|_| format!("duration {s:?}: bad number"))?;
        rest = &rest[num_end..];
        let unit_end = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let ms = match &rest[..unit_end] {
            "h" => 3_600_000.0,
            "m" => 60_000.0,
            "s" => 1000.0,
            "ms" => 1.0,
            "" => return Err(format!("duration {s:?}: missing unit (h, m, s or ms)")),
            u => return Err(format!("duration {s:?}: unknown unit {u:?}; use h, m, s or ms")),
        };
        rest = &rest[unit_end..];
        total_ms += n * ms;
        if !total_ms.is_finite() || total_ms > MAX_DURATION.as_millis() as f64 {
            return Err(too_long());
        }
    }
    Ok(Duration::from_secs_f64(total_ms / 1000.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, TimeZone, Timelike};

    /// A cron schedule read in UTC, so that the expected times do not depend on the machine's zone.
    fn utc(expr: &str) -> Schedule {
        Schedule::parse(&format!("CRON_TZ=UTC {expr}")).unwrap()
    }

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    #[test]
    fn k3s_default_fires_every_twelve_hours() {
        let s = utc("0 */12 * * *");
        assert_eq!(s.next_after(at(2024, 1, 1, 0, 0)).unwrap(), at(2024, 1, 1, 12, 0));
        assert_eq!(s.next_after(at(2024, 1, 1, 12, 0)).unwrap(), at(2024, 1, 2, 0, 0));
    }

    #[test]
    fn longest_gap_is_the_widest_space_between_fires() {
        assert_eq!(utc("0 */12 * * *").longest_gap(at(2024, 1, 1, 0, 0), 64), Some(Duration::from_secs(12 * 3600)));
        // Weekdays at 02:00: Friday to Monday is the widest, three days.
        let weekdays = utc("0 2 * * 1-5").longest_gap(at(2024, 1, 1, 0, 0), 64);
        assert_eq!(weekdays, Some(Duration::from_secs(3 * 86400)));
        let every = Schedule::parse("@every 30m").unwrap();
        assert_eq!(every.longest_gap(Utc::now(), 64), Some(Duration::from_secs(1800)));
    }

    #[test]
    fn cron_tz_prefix_reads_the_fields_in_that_zone() {
        // 03:00 in Tokyo (UTC+9, no DST) is 18:00 UTC the day before.
        let s = Schedule::parse("CRON_TZ=Asia/Tokyo 0 3 * * *").unwrap();
        assert_eq!(s.next_after(at(2024, 1, 1, 0, 0)).unwrap(), at(2024, 1, 1, 18, 0));
        let s = Schedule::parse("TZ=America/New_York 0 3 * * *").unwrap();
        // EST in January (UTC-5), EDT in July (UTC-4).
        assert_eq!(s.next_after(at(2024, 1, 1, 0, 0)).unwrap(), at(2024, 1, 1, 8, 0));
        assert_eq!(s.next_after(at(2024, 7, 1, 0, 0)).unwrap(), at(2024, 7, 1, 7, 0));
        let err = Schedule::parse("CRON_TZ=Mars/Olympus 0 3 * * *").unwrap_err().to_string();
        assert!(err.contains("CRON_TZ=Mars/Olympus 0 3 * * *") && err.contains("unknown time zone"), "{err}");
    }

    #[test]
    fn macros_and_every() {
        let s = utc("@hourly");
        assert_eq!(s.next_after(at(2024, 1, 1, 0, 10)).unwrap(), at(2024, 1, 1, 1, 0));
        let s = Schedule::parse("@every 2s").unwrap();
        let t = at(2024, 1, 1, 0, 0);
        assert_eq!(s.next_after(t).unwrap(), t + chrono::Duration::seconds(2));
        assert_eq!(parse_go_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_go_duration("1.5s").unwrap(), Duration::from_millis(1500));
    }

    #[test]
    fn absurd_durations_are_errors_not_panics() {
        for s in [
            "10000000000000s",
            &"9".repeat(400),
            &format!("{}s", "9".repeat(400)),
            "18446744073709551615s",
            "8785h",
            "1e400s",
        ] {
            let err = parse_go_duration(s).unwrap_err();
            assert!(err.contains("too long") || err.contains("bad number") || err.contains("unit"), "{s}: {err}");
        }
        assert!(parse_go_duration("8784h").is_ok());
        let err = Schedule::parse("@every 10000000000000s").unwrap_err().to_string();
        assert!(err.contains("@every 10000000000000s") && err.contains("too long"), "{err}");
    }

    #[test]
    fn sunday_is_zero_or_seven() {
        // 2024-01-07 is a Sunday.
        for expr in ["0 3 * * 0", "0 3 * * 7", "0 3 * * sun"] {
            let s = utc(expr);
            let n = s.next_after(at(2024, 1, 3, 0, 0)).unwrap();
            assert_eq!((n.day(), n.hour()), (7, 3), "{expr}");
        }
        let s = utc("0 0 * * 1-5");
        assert_eq!(s.next_after(at(2024, 1, 6, 0, 0)).unwrap(), at(2024, 1, 8, 0, 0));
        let s = utc("0 0 * * 5-7");
        assert_eq!(s.next_after(at(2024, 1, 1, 0, 0)).unwrap(), at(2024, 1, 5, 0, 0));
    }

    #[test]
    fn both_day_fields_restricted_fire_on_either() {
        // The 15th (a Monday in Jan 2024), or any Sunday.
        let s = utc("0 0 15 * 0");
        assert_eq!(s.next_after(at(2024, 1, 1, 0, 0)).unwrap(), at(2024, 1, 7, 0, 0));
        assert_eq!(s.next_after(at(2024, 1, 14, 0, 0)).unwrap(), at(2024, 1, 15, 0, 0));
    }

    #[test]
    fn invalid_expressions_are_refused_and_quoted() {
        for bad in [
            "",
            "* * *",
            "61 * * * *",
            "0 0 * * 8",
            "@sometimes",
            "@every",
            "@every 5x",
            "not cron at all x",
            "0 0 31 2 *",
        ] {
            let err = Schedule::parse(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
    }
}
