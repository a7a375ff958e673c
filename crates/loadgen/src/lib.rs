//! What the load generator writes and how a restored keyspace is checked against it.
//!
//! Every operation has a sequence number. A put writes key `<prefix><seq, 10 digits>` with
//! [`value`]`(seq)`, so a key is written once and its value is known from its name; a delete
//! removes the key of an earlier put that had come back. The op log keeps, per operation, its
//! revision and the wall time (unix nanoseconds) its response came back; an operation whose
//! response never came (in flight at a kill, or failed) is logged as issued, with revision 0: it
//! may or may not have happened, and either is accepted.
//!
//! [`check`] compares a restored keyspace with the log: what is there must have been written, with
//! its exact value and revision; what is there must be exactly the effect of every acknowledged
//! operation up to some revision `V` (a prefix of the history, deletes included); and every
//! operation acknowledged at least `window` before the loss must be inside that prefix. The RPO is
//! the time between the last acknowledgement before the loss and the acknowledgement of the
//! operation at `V`.

use std::collections::HashMap;
use std::fmt::Write as _;

/// The value of put `seq`: `len` printable bytes from a generator seeded with `seq`.
pub fn value(seq: u64, len: usize) -> Vec<u8> {
    let mut state = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5851_f42d_4c95_7f2d;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            b'!' + (state % 90) as u8
        })
        .collect()
}

/// The key of put `seq`.
pub fn key(prefix: &str, seq: u64) -> String {
    format!("{prefix}{seq:010}")
}

/// The sequence number in a key under `prefix`, if it is one of ours.
pub fn parse_key(prefix: &str, key: &str) -> Option<u64> {
    let digits = key.strip_prefix(prefix)?;
    (digits.len() == 10 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok())?
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Put,
    /// Deletes the key of put `target`.
    Delete {
        target: u64,
    },
}

/// One issued operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub seq: u64,
    pub kind: Kind,
    /// The revision of its response; 0 when none came back.
    pub rev: i64,
    pub send_ns: u64,
    /// Unix nanoseconds at which its response came back; 0 when none did.
    pub ack_ns: u64,
}

impl Op {
    pub fn acked(&self) -> bool {
        self.ack_ns != 0
    }
}

/// The op log's text: a header with the prefix and value size, then one line per operation:
/// `P <seq> <rev> <send_ns> <ack_ns>` or `D <seq> <target> <rev> <send_ns> <ack_ns>`.
pub fn format_log(prefix: &str, value_bytes: usize, ops: &[Op]) -> String {
    let mut s = format!("# loadgen op log prefix={prefix} value_bytes={value_bytes}\n");
    for op in ops {
        let _ = match op.kind {
            Kind::Put => writeln!(s, "P {} {} {} {}", op.seq, op.rev, op.send_ns, op.ack_ns),
            Kind::Delete { target } => {
                writeln!(s, "D {} {target} {} {} {}", op.seq, op.rev, op.send_ns, op.ack_ns)
            }
        };
    }
    s
}

/// A parsed op log: (prefix, value size, operations).
pub fn parse_log(text: &str) -> Result<(String, usize, Vec<Op>), String> {
    let mut lines = text.lines();
    let header = lines.next().ok_or("the op log is empty")?;
    let field = |name: &str| {
        header
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .map(String::from)
            .ok_or_else(|| format!("the op log's header has no {name}: {header:?}"))
    };
    let prefix = field("prefix")?;
    let value_bytes = field("value_bytes")?.parse::<usize>().map_err(|e| format!("value_bytes: {e}"))?;
    let mut ops = Vec::new();
    for (n, line) in lines.enumerate() {
        let bad = || format!("op log line {}: {line:?}", n + 2);
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).ok_or_else(bad);
        let op = match f.first() {
            Some(&"P") if f.len() == 5 => {
                Op { seq: num(1)?, kind: Kind::Put, rev: num(2)? as i64, send_ns: num(3)?, ack_ns: num(4)? }
            }
            Some(&"D") if f.len() == 6 => Op {
                seq: num(1)?,
                kind: Kind::Delete { target: num(2)? },
                rev: num(3)? as i64,
                send_ns: num(4)?,
                ack_ns: num(5)?,
            },
            _ => return Err(bad()),
        };
        ops.push(op);
    }
    Ok((prefix, value_bytes, ops))
}

/// A restored key of ours: its value and mod revision.
pub type Restored = HashMap<u64, (Vec<u8>, i64)>;

/// What [`check`] found.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome {
    /// The newest revision of the history that the restored keyspace shows.
    pub visible_rev: i64,
    /// Last acknowledgement at or before the loss.
    pub last_ack_before_loss_ns: u64,
    /// Acknowledgement of the operation at `visible_rev` (0 when none is visible).
    pub newest_visible_ack_ns: u64,
    /// `last_ack_before_loss_ns - newest_visible_ack_ns`, at least 0.
    pub rpo_ns: u64,
    pub acked: usize,
    /// Acknowledged at least `window` before the loss (each must be restored).
    pub required: usize,
    pub present_keys: usize,
    /// Keys present whose put never came back (in flight at the loss): allowed.
    pub unacked_present: usize,
    /// Acknowledged deletes inside the restored prefix (their keys are absent).
    pub deletes_applied: usize,
    /// Everything wrong, one line each.
    pub violations: Vec<String>,
}

/// Checks `restored` (our keys; `stray` are other keys under the prefix) against `ops`, for a loss
/// at `loss_ns` and a recovery point objective of `window_ns`.
pub fn check(
    ops: &[Op],
    restored: &Restored,
    stray: &[String],
    value_bytes: usize,
    loss_ns: u64,
    window_ns: u64,
) -> Outcome {
    let mut out = Outcome { present_keys: restored.len(), ..Outcome::default() };
    let mut v = Vec::new();
    let puts: HashMap<u64, &Op> = ops.iter().filter(|o| o.kind == Kind::Put).map(|o| (o.seq, o)).collect();
    let mut delete_of: HashMap<u64, &Op> = HashMap::new();
    for o in ops {
        if let Kind::Delete { target } = o.kind {
            if delete_of.insert(target, o).is_some() {
                v.push(format!("key of put {target} was deleted twice (a load generator bug)"));
            }
        }
    }
    for k in stray {
        v.push(format!("{k:?} is present but was never written"));
    }
    let mut seqs: Vec<&u64> = restored.keys().collect();
    seqs.sort();
    for seq in seqs {
        let (val, mod_rev) = &restored[seq];
        let Some(p) = puts.get(seq) else {
            v.push(format!("put {seq} is present but was never written"));
            continue;
        };
        if *val != value(*seq, value_bytes) {
            v.push(format!("put {seq} is present with a different value ({} bytes)", val.len()));
        }
        if p.acked() {
            if *mod_rev != p.rev {
                v.push(format!("put {seq} is present at mod revision {mod_rev}, written at {}", p.rev));
            }
        } else {
            out.unacked_present += 1;
        }
    }
    let present = |seq: u64| restored.contains_key(&seq);
    // The newest visible operation: a put that is there, or a delete whose key (put before the
    // newest put that is there) is gone.
    let v0 = ops.iter().filter(|o| o.acked() && o.kind == Kind::Put && present(o.seq)).map(|o| o.rev).max();
    let v0 = v0.unwrap_or(0);
    let visible = ops
        .iter()
        .filter(|o| o.acked())
        .filter(|o| match o.kind {
            Kind::Put => present(o.seq),
            Kind::Delete { target } => {
                !present(target) && puts.get(&target).is_some_and(|p| p.acked() && p.rev <= v0 && p.rev < o.rev)
            }
        })
        .max_by_key(|o| o.rev);
    out.visible_rev = visible.map_or(0, |o| o.rev);
    out.newest_visible_ack_ns = visible.map_or(0, |o| o.ack_ns);
    let vr = out.visible_rev;
    // Everything acknowledged up to `vr` is there, exactly.
    for o in ops.iter().filter(|o| o.acked()) {
        out.acked += 1;
        if o.rev > vr {
            continue;
        }
        match o.kind {
            Kind::Put => {
                let deleted = delete_of.get(&o.seq);
                let may_be_gone = deleted.is_some_and(|d| !d.acked() || d.rev <= vr);
                let must_be_gone = deleted.is_some_and(|d| d.acked() && d.rev <= vr);
                if !present(o.seq) && !may_be_gone {
                    v.push(format!("put {} (revision {}) is missing though revision {vr} is restored", o.seq, o.rev));
                }
                if present(o.seq) && must_be_gone {
                    v.push(format!("put {} is present though its delete (revision <= {vr}) is restored", o.seq));
                }
            }
            Kind::Delete { target } => {
                if present(target) {
                    v.push(format!(
                        "delete {} (revision {}) of put {target} is not applied though revision {vr} is restored",
                        o.seq, o.rev
                    ));
                } else {
                    out.deletes_applied += 1;
                }
            }
        }
    }
    // Everything acknowledged `window` before the loss is inside the prefix.
    let cutoff = loss_ns.saturating_sub(window_ns);
    let mut late: Vec<&Op> = Vec::new();
    for o in ops.iter().filter(|o| o.acked() && o.ack_ns <= cutoff) {
        out.required += 1;
        if o.rev > vr {
            late.push(o);
        }
    }
    if let Some(first) = late.iter().min_by_key(|o| o.rev) {
        v.push(format!(
            "{} operations acknowledged at least {:.3}s before the loss are not restored (the first: {} at revision {}, acknowledged {:.3}s before the loss; restored up to revision {vr})",
            late.len(),
            window_ns as f64 / 1e9,
            first.seq,
            first.rev,
            loss_ns.saturating_sub(first.ack_ns) as f64 / 1e9
        ));
    }
    out.last_ack_before_loss_ns =
        ops.iter().filter(|o| o.acked() && o.ack_ns <= loss_ns).map(|o| o.ack_ns).max().unwrap_or(0);
    let since = if out.newest_visible_ack_ns > 0 {
        out.newest_visible_ack_ns
    } else {
        ops.iter().map(|o| o.send_ns).min().unwrap_or(0)
    };
    out.rpo_ns = out.last_ack_before_loss_ns.saturating_sub(since);
    out.violations = v;
    out
}

/// For a point-in-time restore to `at_ns`: every operation sent after that time that the restored
/// keyspace shows (a put whose key is there, or an acknowledged delete inside the restored prefix
/// `visible_rev`), one line each. Such an operation cannot have been applied at `at_ns`.
pub fn sent_after(ops: &[Op], restored: &Restored, visible_rev: i64, at_ns: u64) -> Vec<String> {
    let mut v = Vec::new();
    for o in ops.iter().filter(|o| o.send_ns > at_ns) {
        let shown = match o.kind {
            Kind::Put => restored.contains_key(&o.seq),
            Kind::Delete { .. } => o.acked() && o.rev <= visible_rev,
        };
        if shown {
            v.push(format!(
                "operation {} (revision {}) was sent {:.3}s after the point in time and is restored",
                o.seq,
                o.rev,
                (o.send_ns - at_ns) as f64 / 1e9
            ));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn put(seq: u64, rev: i64, ack_s: u64) -> Op {
        Op { seq, kind: Kind::Put, rev, send_ns: ack_s * S - 1, ack_ns: if rev == 0 { 0 } else { ack_s * S } }
    }

    fn del(seq: u64, target: u64, rev: i64, ack_s: u64) -> Op {
        Op {
            seq,
            kind: Kind::Delete { target },
            rev,
            send_ns: ack_s * S - 1,
            ack_ns: if rev == 0 { 0 } else { ack_s * S },
        }
    }

    /// The keyspace after every acknowledged op up to `upto`.
    fn state_at(ops: &[Op], upto: i64) -> Restored {
        let mut sorted: Vec<&Op> = ops.iter().filter(|o| o.acked() && o.rev <= upto).collect();
        sorted.sort_by_key(|o| o.rev);
        let mut m = Restored::new();
        for o in sorted {
            match o.kind {
                Kind::Put => {
                    m.insert(o.seq, (value(o.seq, 8), o.rev));
                }
                Kind::Delete { target } => {
                    m.remove(&target);
                }
            }
        }
        m
    }

    /// Puts 0..=9 at revisions 10..=19 acknowledged at seconds 10..=19, delete of put 2 at
    /// revision 20 (second 20), put 11 at 21 (second 21), put 12 never acknowledged.
    fn history() -> Vec<Op> {
        let mut ops: Vec<Op> = (0..10).map(|i| put(i, 10 + i as i64, 10 + i)).collect();
        ops.push(del(10, 2, 20, 20));
        ops.push(put(11, 21, 21));
        ops.push(put(12, 0, 22));
        ops
    }

    #[test]
    fn a_complete_restore_has_no_rpo() {
        let ops = history();
        let out = check(&ops, &state_at(&ops, 21), &[], 8, 22 * S, 4 * S);
        assert_eq!(out.violations, Vec::<String>::new());
        assert_eq!((out.visible_rev, out.rpo_ns, out.deletes_applied), (21, 0, 1));
        assert_eq!(out.required, 9, "acknowledged by second 18");
    }

    #[test]
    fn a_prefix_gives_the_time_since_its_last_ack() {
        let ops = history();
        let out = check(&ops, &state_at(&ops, 17), &[], 8, 22 * S, 5 * S);
        assert_eq!(out.violations, Vec::<String>::new());
        assert_eq!(out.visible_rev, 17);
        assert_eq!(out.rpo_ns, 21 * S - 17 * S);
    }

    #[test]
    fn a_visible_delete_counts_as_the_newest_write() {
        let ops = history();
        let out = check(&ops, &state_at(&ops, 20), &[], 8, 22 * S, 4 * S);
        assert_eq!(out.violations, Vec::<String>::new());
        assert_eq!((out.visible_rev, out.rpo_ns), (20, S));
    }

    #[test]
    fn a_point_in_time_restore_shows_nothing_sent_after_the_time() {
        let ops = history();
        // Each sent just before its acknowledgement: up to revision 17, all sent by second 17.
        assert_eq!(sent_after(&ops, &state_at(&ops, 17), 17, 17 * S), Vec::<String>::new());
        let late = sent_after(&ops, &state_at(&ops, 20), 20, 17 * S);
        // Puts 8 and 9 (sent just before seconds 18 and 19) and the delete (before 20).
        assert_eq!(late.len(), 3, "{late:?}");
        assert!(late[0].contains("operation 8 (revision 18) was sent"), "{late:?}");
    }

    #[test]
    fn too_old_a_restore_is_reported() {
        let ops = history();
        let out = check(&ops, &state_at(&ops, 12), &[], 8, 22 * S, 4 * S);
        assert_eq!(out.violations.len(), 1, "{:?}", out.violations);
        assert!(out.violations[0].contains("acknowledged at least 4.000s before the loss are not restored"));
    }

    #[test]
    fn a_hole_in_the_prefix_is_reported() {
        let ops = history();
        let mut r = state_at(&ops, 21);
        r.remove(&5);
        let out = check(&ops, &r, &[], 8, 22 * S, 4 * S);
        assert!(out.violations.iter().any(|v| v.contains("put 5 (revision 15) is missing")), "{:?}", out.violations);
    }

    #[test]
    fn an_undone_delete_is_reported() {
        let ops = history();
        let mut r = state_at(&ops, 21);
        r.insert(2, (value(2, 8), 12));
        let out = check(&ops, &r, &[], 8, 22 * S, 4 * S);
        assert!(out.violations.iter().any(|v| v.contains("delete 10")), "{:?}", out.violations);
    }

    #[test]
    fn wrong_values_unknown_keys_and_moved_revisions_are_reported() {
        let ops = history();
        let mut r = state_at(&ops, 21);
        r.insert(3, (b"tampered".to_vec(), 13));
        r.insert(4, (value(4, 8), 99));
        r.insert(77, (value(77, 8), 30));
        let out = check(&ops, &r, &["/rpo/junk".to_string()], 8, 22 * S, 4 * S);
        let all = out.violations.join("\n");
        for want in [
            "put 3 is present with a different value",
            "mod revision 99",
            "put 77 is present but was never written",
            "\"/rpo/junk\"",
        ] {
            assert!(all.contains(want), "{want} not in {all}");
        }
    }

    #[test]
    fn an_unacknowledged_put_may_be_there_or_not() {
        let ops = history();
        let mut r = state_at(&ops, 21);
        r.insert(12, (value(12, 8), 22));
        let out = check(&ops, &r, &[], 8, 23 * S, 4 * S);
        assert_eq!(out.violations, Vec::<String>::new());
        assert_eq!(out.unacked_present, 1);
    }

    #[test]
    fn the_log_round_trips() {
        let ops = history();
        let text = format_log("/rpo/", 1024, &ops);
        assert_eq!(parse_log(&text).unwrap(), ("/rpo/".to_string(), 1024, ops));
        assert!(parse_log("# loadgen op log prefix=/x/ value_bytes=4\nP 1 2\n").is_err());
        assert_eq!(parse_key("/rpo/", &key("/rpo/", 42)), Some(42));
        assert_eq!(parse_key("/rpo/", "/rpo/42"), None);
        assert_ne!(value(1, 64), value(2, 64));
    }
}
