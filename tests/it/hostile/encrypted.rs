//! Hostile encrypted snapshots (issue 15): a restore of an `.age` snapshot without the identity,
//! with another key, cut short, with a byte changed, or with an identity file others can read, is
//! refused in one line before anything is swapped, and the data dir keeps its old database. The
//! same for encrypted delta segments after a plain snapshot (encryption turned on mid-chain): no
//! identity, another key, a segment altered in S3.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use sha2::Digest;
use tests::support::age::{self, AgeKey};
use tests::support::bin::Run;
use tests::support::etcd::EtcdVersion;
use tests::support::s3::S3Server;
use tests::support::server::{all_keys, assert_reset_done, files, kv, put, save, DataDir};

use crate::deltas::{
    identity_flag, recipients_flag, restore_flags, revision, segment_files, shipping_flags, strs, wait_following,
    wait_shipped,
};

tests::on_both_versions!(encrypted_delta_segments_without_the_right_key_or_altered_change_nothing);

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

fn encrypted_delta_segments_without_the_right_key_or_altered_change_nothing(v: EtcdVersion) {
    let keys = tempfile::tempdir().unwrap();
    let key = age::keygen(keys.path(), "ops");
    let other = age::keygen(keys.path(), "other");
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let dd = DataDir::new(v);
    // A chain's plain full snapshot, then (restarted with recipients) encrypted segments after it.
    let plain = shipping_flags(&s3);
    let s = dd.start(&strs(&plain));
    wait_following(&s);
    s.stop();
    let mut sealed = plain.clone();
    sealed.push(recipients_flag(&key));
    let s = dd.start(&strs(&sealed));
    wait_following(&s);
    put(&dd, &[("/registry/a", "1"), ("/registry/b", "2")]);
    put(&dd, &[("/registry/c", "3")]);
    let last = revision(&dd);
    wait_shipped(&s, last);
    let want = all_keys(&dd);
    s.stop();
    let bucket = s3.root.join("snaps");
    let segs = segment_files(&bucket);
    assert!(!segs.is_empty() && segs.iter().all(|f| f.ends_with(".seg.age")), "{segs:?}");
    let full: Vec<String> =
        files(&bucket).into_iter().filter(|f| !f.starts_with('.') && !f.starts_with("delta-")).collect();
    assert!(!full.is_empty() && full.iter().all(|f| !f.ends_with(".age")), "the chain's snapshot is plain: {full:?}");

    // The reset target is this node, with its data.
    let db_before = tree(&dd.db().join("etcd"));
    let snaps = files(&dd.snapshots());
    let token = dd.token();
    let reset = |extra: &[String]| {
        let mut f = restore_flags(&s3, &token, &["--cluster-reset-restore-deltas".into()]);
        f.extend_from_slice(extra);
        dd.run(&strs(&f))
    };

    let r = reset(&[]);
    refused(&dd, &key, &r, "--etcd-snapshot-encryption-identity-file", &db_before, &snaps);
    assert!(r.stderr.contains("delta segment delta-"), "{}", r.stderr);

    let r = reset(&[identity_flag(&other)]);
    refused(&dd, &key, &r, "none of the keys", &db_before, &snaps);

    // One byte of a segment's ciphertext changed in S3: age's chunk tag refuses it.
    let victim = bucket.join(&segs[0]);
    let good = std::fs::read(&victim).unwrap();
    let mut bad = good.clone();
    let at = bad.len() - 40;
    bad[at] ^= 0x01;
    std::fs::write(&victim, &bad).unwrap();
    let r = reset(&[identity_flag(&key)]);
    refused(&dd, &key, &r, "altered", &db_before, &snaps);
    // Cut short.
    std::fs::write(&victim, &good[..good.len() - 20]).unwrap();
    let r = reset(&[identity_flag(&key)]);
    refused(&dd, &key, &r, "truncated", &db_before, &snaps);

    // Whole again: the same reset replays every write.
    std::fs::write(&victim, &good).unwrap();
    let r = reset(&[identity_flag(&key)]);
    assert_reset_done(&r, &dd);
    assert!(r.stderr.contains("replayed the delta segments"), "{}", r.stderr);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    assert_eq!(all_keys(&dd), want);
    s.stop();
}
