//! Hostile encrypted snapshots (issue 15): a restore of an `.age` snapshot without the identity,
//! with another key, cut short, with a byte changed, or with an identity file others can read, is
//! refused in one line before anything is swapped, and the data dir keeps its old database.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use sha2::Digest;
use tests::support::age::{self, AgeKey};
use tests::support::bin::Run;
use tests::support::etcd::EtcdVersion;
use tests::support::server::{all_keys, files, kv, put, save, DataDir};

/// Every file under `dir` with the SHA-256 of its bytes, sorted by path.
fn tree(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, hex::encode(sha2::Sha256::digest(std::fs::read(&p).unwrap()))));
            }
        }
    }
    out.sort();
    out
}

/// A refused reset: exit 1, one `error:` line holding `needle` and never the private key, and
/// `db/` exactly as before (the old etcd data byte for byte, no scratch dir, no `etcd-old`, no
/// `reset-flag`), the snapshot dir as before (no decrypted copy).
#[track_caller]
fn refused(dd: &DataDir, key: &AgeKey, r: &Run, needle: &str, db_before: &[(String, String)], snaps: &[String]) {
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "expected exactly one error line:\n{}", r.stderr);
    assert!(lines[0].contains(needle), "{needle:?} not in {:?}", lines[0]);
    assert!(!r.stderr.contains(&key.secret()), "the private key leaked:\n{}", r.stderr);
    assert_eq!(tree(&dd.db().join("etcd")), db_before, "the etcd data changed");
    let db = files(&dd.db());
    assert!(!db.iter().any(|f| f.starts_with("etcd-restore") || f.starts_with("etcd-old")), "{db:?}");
    assert!(!dd.db().join("reset-flag").exists());
    assert_eq!(files(&dd.snapshots()), snaps, "left in the snapshot dir");
}

#[test]
fn encrypted_restore_without_the_right_key_or_with_a_damaged_file_changes_nothing() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let keys = tempfile::tempdir().unwrap();
    let key = age::keygen(keys.path(), "ops");
    let other = age::keygen(keys.path(), "other");
    let s = dd.start(&["--etcd-disable-snapshots"]);
    put(&dd, &[("/registry/snapshot-time", "old")]);
    let rec = format!("--etcd-snapshot-encryption-recipients-file={}", key.recipients.display());
    let snap = save(&dd, &[rec.as_str()]);
    put(&dd, &[("/registry/after", "kept")]);
    s.stop();
    let db_before = tree(&dd.db().join("etcd"));
    let snaps = files(&dd.snapshots());
    let restore = format!("--cluster-reset-restore-path={}", snap.display());
    let with = |id: &Path| format!("--etcd-snapshot-encryption-identity-file={}", id.display());
    let reset = |extra: &[&str]| {
        let mut args = vec!["--cluster-reset"];
        args.extend(extra);
        dd.run(&args)
    };

    // No identity.
    let r = reset(&[restore.as_str()]);
    refused(&dd, &key, &r, "--etcd-snapshot-encryption-identity-file", &db_before, &snaps);

    // Another key.
    let r = reset(&[restore.as_str(), with(&other.identity).as_str()]);
    refused(&dd, &key, &r, "none of the keys", &db_before, &snaps);

    // An identity file that group or others can read.
    let loose = keys.path().join("loose.key");
    std::fs::copy(&key.identity, &loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o640)).unwrap();
    let r = reset(&[restore.as_str(), with(&loose).as_str()]);
    refused(&dd, &key, &r, "chmod 600", &db_before, &snaps);

    // The right key, the file damaged (copies outside the snapshot dir).
    let bytes = std::fs::read(&snap).unwrap();
    let bad = tempfile::tempdir().unwrap();
    let truncated = bad.path().join("truncated.age");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).unwrap();
    let tampered = bad.path().join("tampered.age");
    let mut t = bytes.clone();
    let at = t.len() / 2;
    t[at] ^= 0x40;
    std::fs::write(&tampered, &t).unwrap();
    let header = bad.path().join("header.age");
    let mut h = bytes.clone();
    // The last stanza body line before the MAC: altering it fails the header's authentication.
    let mac = h.windows(5).position(|w| w == b"\n--- ").unwrap();
    h[mac - 1] = if h[mac - 1] == b'A' { b'B' } else { b'A' };
    std::fs::write(&header, &h).unwrap();
    for (file, needle) in [(&truncated, "truncated"), (&tampered, "altered"), (&header, "cannot be decrypted")] {
        let r = reset(&[&format!("--cluster-reset-restore-path={}", file.display()), with(&key.identity).as_str()]);
        refused(&dd, &key, &r, needle, &db_before, &snaps);
    }

    // After all of that, the old database is there and serves.
    let s = dd.start(&["--etcd-disable-snapshots"]);
    assert_eq!(all_keys(&dd), kv(&[("/registry/after", "kept"), ("/registry/snapshot-time", "old")]));
    s.stop();
}
