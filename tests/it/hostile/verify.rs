//! Restore drills that must fail (issue 28), on etcd 3.5.1 and 3.4.23 with real S3: each names
//! its cause on one line, exits non-zero, records nothing in the snapshot's metadata and leaves
//! no scratch dir and no etcd behind. A wrong or missing identity; an object that cannot be read
//! back as it was written; a segment missing in the middle of a chain; a snapshot of another
//! cluster under this one's name and metadata; Ctrl-C while the drill's etcd runs.

use std::process::Stdio;
use std::time::Duration;

use tests::support::age;
use tests::support::bin;
use tests::support::etcd::EtcdVersion;
use tests::support::s3::S3Server;
use tests::support::server::{files, put, save, wait_until, DataDir};

use crate::deltas::{metric, revision, shipping_flags, strs, wait_following, wait_shipped};
use crate::verify::{assert_no_scratch, local_metadata, object, verify};

tests::on_both_versions!(
    verify_without_the_identity_or_with_another_key_names_the_identity_file,
    an_object_that_reads_back_altered_fails_verify_naming_it,
    a_segment_missing_in_the_middle_of_a_chain_fails_verify_naming_the_hole,
    a_snapshot_of_another_cluster_under_this_ones_name_fails_the_content_check,
    ctrl_c_while_the_drills_etcd_runs_leaves_no_scratch_and_no_etcd,
);

/// Whether any process runs with `needle` in its command line (a zombie's is empty).
fn processes_with(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        if String::from_utf8_lossy(&cmd).contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// A failed drill: non-zero, the cause on stderr, no `verified*` keys written.
#[track_caller]
fn assert_refused(r: &bin::Run, needle: &str, md: Option<&serde_json::Map<String, serde_json::Value>>) {
    r.assert_fails_with(needle);
    let last = r.stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: ") && last.contains("did not verify"), "one line naming it: {last}");
    if let Some(md) = md {
        assert!(!md.contains_key("verifiedAt"), "a failed drill records nothing: {md:?}");
    }
}

fn verify_without_the_identity_or_with_another_key_names_the_identity_file(v: EtcdVersion) {
    let dd = DataDir::new(v);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    put(&dd, &[("/registry/secret", "s")]);
    let key = age::keygen(dd.tmp.path(), "right");
    let other = age::keygen(dd.tmp.path(), "other");
    let recipients = key.recipients.display().to_string();
    let snap = save(&dd, &["--snapshot-encryption-recipients-file", &recipients]);
    s.stop();
    let name = snap.file_name().unwrap().to_string_lossy().into_owned();
    let before = std::fs::read(&snap).unwrap();

    let r = verify(&dd, &[&name]);
    assert_refused(&r, "--etcd-snapshot-encryption-identity-file", Some(&local_metadata(&snap)));
    assert!(r.stdout.contains("FAILED  restore"), "{}", r.stdout);
    let wrong = other.identity.display().to_string();
    let r = verify(&dd, &[&name, "--snapshot-encryption-identity-file", &wrong]);
    assert_refused(&r, "decrypt", Some(&local_metadata(&snap)));
    assert!(!r.stderr.contains(&other.secret()), "no key material in errors");
    assert_eq!(std::fs::read(&snap).unwrap(), before);
    assert_no_scratch(&dd);
}

fn an_object_that_reads_back_altered_fails_verify_naming_it(v: EtcdVersion) {
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let dd = DataDir::new(v);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    put(&dd, &[("/registry/a", "1")]);
    let flags = s3.server_flags("snaps");
    let snap = save(&dd, &strs(&flags));
    s.stop();
    let name = snap.file_name().unwrap().to_string_lossy().into_owned();
    // The bucket hands back other bytes than were written (same size: a bit flipped at rest).
    let obj = object(&s3, &name);
    let mut bytes = std::fs::read(&obj).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&obj, &bytes).unwrap();
    let md_before = std::fs::read(object(&s3, &format!(".metadata/{name}"))).unwrap();
    let mut args = strs(&flags);
    args.push(&name);
    let r = verify(&dd, &args);
    assert_refused(&r, &name, None);
    assert!(r.stderr.contains("sha256"), "the cause: {}", r.stderr);
    assert_eq!(std::fs::read(object(&s3, &format!(".metadata/{name}"))).unwrap(), md_before, "nothing recorded");
    // An object that is gone while its name is still asked for: named too.
    std::fs::remove_file(&obj).unwrap();
    let r = verify(&dd, &args);
    assert_refused(&r, &name, None);
    assert_no_scratch(&dd);
}

fn a_segment_missing_in_the_middle_of_a_chain_fails_verify_naming_the_hole(v: EtcdVersion) {
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let dd = DataDir::new(v);
    let s = dd.start(&strs(&shipping_flags(&s3)));
    wait_following(&s);
    // Three bursts, each shipped (a 1 s interval closes a segment per burst at least).
    for burst in 0..3 {
        for i in 0..10 {
            put(&dd, &[(&format!("/registry/b{burst}/k{i}"), "x")]);
        }
        wait_shipped(&s, revision(&dd));
    }
    assert_eq!(metric(&s, "k3s_snapshot_delta_upload_failures_total "), 0.0);
    s.stop();
    let segments: Vec<String> = files(&s3.root.join("snaps")).into_iter().filter(|f| f.starts_with("delta-")).collect();
    assert!(segments.len() >= 3, "{segments:?}");
    let missing = &segments[segments.len() / 2];
    std::fs::remove_file(object(&s3, missing)).unwrap();
    let flags = s3.server_flags("snaps");
    let mut args = strs(&flags);
    args.extend(["latest", "--deltas"]);
    let fresh = DataDir::new(v);
    let r = verify(&fresh, &args);
    assert_refused(&r, "hole", None);
    let from: i64 = missing.strip_prefix("delta-").unwrap().split('-').next().unwrap().parse().unwrap();
    assert!(r.stderr.contains(&format!("revisions {from}..=")), "names the missing revisions: {}", r.stderr);
    assert!(r.stdout.contains("FAILED  chain"), "{}", r.stdout);
    assert_no_scratch(&fresh);
}

fn a_snapshot_of_another_cluster_under_this_ones_name_fails_the_content_check(v: EtcdVersion) {
    // Two clusters with the same number of writes (so the same revisions), other values.
    let (ours, theirs) = (DataDir::new(v), DataDir::new(v));
    let mut snaps = Vec::new();
    for (dd, value) in [(&ours, "ours"), (&theirs, "theirs")] {
        let s = dd.start(&["--etcd-disable-snapshots"]);
        for i in 0..5 {
            put(dd, &[(&format!("/registry/k{i}"), value)]);
        }
        snaps.push(save(dd, &[]));
        s.stop();
    }
    let md = local_metadata(&snaps[0]);
    assert_eq!(md["etcdRevision"], local_metadata(&snaps[1])["etcdRevision"], "same revision in both");
    // Theirs, given our snapshot's name (our metadata stays beside it).
    std::fs::copy(&snaps[1], &snaps[0]).unwrap();
    let name = snaps[0].file_name().unwrap().to_string_lossy().into_owned();
    let r = verify(&ours, &[&name]);
    assert_refused(&r, "not the data the cluster held", Some(&local_metadata(&snaps[0])));
    assert!(r.stdout.contains("ok      etcd") && r.stdout.contains("FAILED  content"), "{}", r.stdout);
    assert_no_scratch(&ours);
}

fn ctrl_c_while_the_drills_etcd_runs_leaves_no_scratch_and_no_etcd(v: EtcdVersion) {
    let dd = DataDir::new(v);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    put(&dd, &[("/registry/a", "1")]);
    let snap = save(&dd, &[]);
    s.stop();
    let name = snap.file_name().unwrap().to_string_lossy().into_owned();
    let data_dir = dd.path().display().to_string();
    let bins = v.bin_dir().display().to_string();
    let log = dd.tmp.path().join("verify.log");
    let mut c = bin::cmd();
    c.args(["etcd-snapshot", "verify", &name, "--data-dir", &data_dir, "--etcd-bin-dir", &bins])
        .env("K3S_SNAPSHOT_TEST_VERIFY_PAUSE", "etcd-ready")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut child = c.spawn().unwrap();
    let scratch = dd.path().join("server/verify");
    wait_until("the drill's etcd to answer", Duration::from_secs(60), || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("paused here until interrupted")
    });
    let needle = scratch.display().to_string();
    assert!(!processes_with(&needle).is_empty(), "the drill's etcd runs in its scratch dir");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "an interrupted drill fails");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("interrupted"), "{text}");
    wait_until("the drill's etcd to be gone", Duration::from_secs(10), || processes_with(&needle).is_empty());
    assert_no_scratch(&dd);
    assert!(!local_metadata(&snap).contains_key("verifiedAt"));
}
