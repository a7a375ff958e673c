//! Snapshot names: `<name>-<node>-<unix seconds>`, optionally with `.zip`, then `.age` when
//! encrypted (`<name>-<node>-<unix seconds>[.zip].age`: zipped first, then encrypted).

use crate::{Error, Result};

/// Suffix of a compressed snapshot.
pub const ZIP_SUFFIX: &str = ".zip";
/// Suffix of an encrypted snapshot (age v1), after `.zip` when both apply.
pub const AGE_SUFFIX: &str = ".age";
/// Suffix of a file being written; never listed, never restored.
pub const PART_SUFFIX: &str = ".part";

/// Random alphanumerics in a scratch name, `<final name>.<random>.part`.
pub const SCRATCH_RANDOM_LEN: usize = 16;

/// The final name a `.part` file is written for: `<final>.part` (a save's reservation) or
/// `<final>.<16 alphanumerics>.part` (a scratch file). `None` when `file` has no `.part` suffix.
pub fn part_target(file: &str) -> Option<&str> {
    let base = file.strip_suffix(PART_SUFFIX)?;
    if let Some((target, random)) = base.rsplit_once('.') {
        if random.len() == SCRATCH_RANDOM_LEN && random.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Some(target);
        }
    }
    Some(base)
}

/// Whether a `.part` file has a name this program could have made: its target (see
/// [`part_target`]) is a snapshot name of ours, `<name>-<node>-<digits>[.zip][.age]`. Anything else
/// ending in `.part` belongs to someone else and is left alone.
pub fn is_our_part(file: &str) -> bool {
    part_target(file)
        .and_then(parse)
        .is_some_and(|p| p.stem.split_once('-').is_some_and(|(a, b)| !a.is_empty() && !b.is_empty()))
}

/// Builds the base file name of a snapshot.
pub fn snapshot_name(prefix: &str, node: &str, unix_seconds: i64) -> String {
    format!("{prefix}-{node}-{unix_seconds}")
}

/// Refuses a name that could escape the snapshot directory or is not a plain file name.
pub fn validate_file_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.contains('/') || name.contains('\\') {
        Some("it contains a path separator; give the snapshot's file name only")
    } else if name == "." || name == ".." || name.contains("..") {
        Some("it contains '..'; give the snapshot's file name only")
    } else if name.contains('\0') {
        Some("it contains a NUL byte")
    } else if name.starts_with('.') {
        Some("it starts with '.'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidName { name: name.to_string(), reason }),
        None => Ok(()),
    }
}

/// Refuses a `--name`/`--etcd-snapshot-name` prefix that cannot make a valid file name.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    validate_file_name(prefix)?;
    if prefix.ends_with(PART_SUFFIX) {
        return Err(Error::InvalidName { name: prefix.into(), reason: "it ends with .part" });
    }
    Ok(())
}

/// A file name that parsed as one of our snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedName<'a> {
    /// The file name as stored (with `.zip` when compressed, `.age` when encrypted).
    pub file: &'a str,
    /// `<name>-<node>` part, without the timestamp.
    pub stem: &'a str,
    /// Unix seconds from the name.
    pub timestamp: i64,
    pub compressed: bool,
    /// Encrypted with age (`.age`).
    pub encrypted: bool,
}

/// Parses `<stem>-<digits>[.zip][.age]`; anything else (including `.part` files) is not ours.
pub fn parse(file: &str) -> Option<ParsedName<'_>> {
    if file.starts_with('.') || file.ends_with(PART_SUFFIX) {
        return None;
    }
    let (base, encrypted) = match file.strip_suffix(AGE_SUFFIX) {
        Some(b) => (b, true),
        None => (file, false),
    };
    let (base, compressed) = match base.strip_suffix(ZIP_SUFFIX) {
        Some(b) => (b, true),
        None => (base, false),
    };
    let (stem, ts) = base.rsplit_once('-')?;
    if stem.is_empty() || ts.is_empty() || ts.len() > 12 || !ts.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(ParsedName { file, stem, timestamp: ts.parse().ok()?, compressed, encrypted })
}

/// The timestamp of `file` when it is one of our snapshots whose name starts with `<prefix>-`,
/// whatever node name follows (a renamed host's snapshots still count, k3s #8099).
pub fn matches_prefix(file: &str, prefix: &str) -> Option<i64> {
    let parsed = parse(file)?;
    let node = parsed.stem.strip_prefix(prefix)?.strip_prefix('-')?;
    (!node.is_empty()).then_some(parsed.timestamp)
}

/// First 12 hex digits of the SHA-256 of the cluster token, stored in metadata so that a restore
/// can warn when the token differs without ever storing the token.
pub fn token_hash(token: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(token.as_bytes());
    hex::encode(digest)[..12].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let n = snapshot_name("on-demand", "node-a", 1_700_000_000);
        assert_eq!(n, "on-demand-node-a-1700000000");
        let p = parse(&n).unwrap();
        assert_eq!((p.stem, p.timestamp, p.compressed), ("on-demand-node-a", 1_700_000_000, false));
        let z = format!("{n}.zip");
        assert!(parse(&z).unwrap().compressed);
        let p = parse("on-demand-node-a-17.zip.age").unwrap();
        assert_eq!((p.stem, p.timestamp, p.compressed, p.encrypted), ("on-demand-node-a", 17, true, true));
        let p = parse("on-demand-node-a-17.age").unwrap();
        assert_eq!((p.stem, p.timestamp, p.compressed, p.encrypted), ("on-demand-node-a", 17, false, true));
        // One suffix of each, in that order.
        for bad in ["a-b-17.age.zip", "a-b-17.age.age", "a-b-17.zip.zip", "a-b-17.age.part"] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn part_files_and_foreign_files_are_not_ours() {
        for f in ["x-1.part", "on-demand-node-abc", "notes.txt", ".metadata", "on-demand-node-1.zip.part", "-1"] {
            assert!(parse(f).is_none(), "{f}");
        }
    }

    #[test]
    fn only_part_names_we_make_are_ours() {
        for ours in [
            "etcd-snapshot-node-123.part",
            "on-demand-n1-5.zip.part",
            "on-demand-n1-5.AbCdEfGh01234567.part",
            "on-demand-n1-5.zip.0123456789abcdef.part",
            "on-demand-n1-5.zip.age.part",
            "on-demand-n1-5.age.0123456789abcdef.part",
        ] {
            assert!(is_our_part(ours), "{ours}");
        }
        for foreign in [
            "something.part",
            "backup-2024.part",
            "notes.txt",
            "on-demand-n1-5",
            "x.0123456789abcdef.part",
            "a-b-1.part.txt",
        ] {
            assert!(!is_our_part(foreign), "{foreign}");
        }
        assert_eq!(part_target("a-b-1.zip.0123456789abcdef.part"), Some("a-b-1.zip"));
    }

    #[test]
    fn prefix_matching_respects_the_dash_and_takes_any_node() {
        assert_eq!(matches_prefix("on-demand-n1-5", "on-demand"), Some(5));
        assert_eq!(matches_prefix("on-demand-renamed-host-6.zip", "on-demand"), Some(6));
        assert_eq!(matches_prefix("on-demand-n1-7.zip.age", "on-demand"), Some(7));
        assert_eq!(matches_prefix("on-demandx-n1-5", "on-demand"), None);
        assert_eq!(matches_prefix("on-demand-5", "on-demand"), None);
        assert_eq!(matches_prefix("on-demand-n1-notanumber", "on-demand"), None);
    }

    #[test]
    fn path_like_names_are_refused() {
        for bad in ["../x", "a/b", "..", "", "a\0b", ".metadata"] {
            assert!(validate_file_name(bad).is_err(), "{bad:?}");
        }
        validate_file_name("on-demand-n1-5.zip").unwrap();
    }

    #[test]
    fn token_hash_is_short_and_stable() {
        assert_eq!(token_hash("secret").len(), 12);
        assert_eq!(token_hash("secret"), token_hash("secret"));
        assert_ne!(token_hash("secret"), token_hash("other"));
    }
}
