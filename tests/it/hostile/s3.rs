//! Hostile S3 neighbours: an endpoint that answers at a trickle.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tests::support::bin::{self, Run};
use tests::support::etcd::{Etcd, EtcdVersion};
use tests::support::s3::{S3Server, TrickleProxy, ACCESS_KEY, SECRET_KEY};

#[test]
fn a_slow_s3_neither_slows_the_local_save_nor_holds_the_upload_past_its_deadline() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    etcd.load_mib("bulk/", 16);
    let s3 = S3Server::start();
    s3.create_bucket("slow");
    // 16 MiB at 256 KiB/s would take a minute: far beyond the 6 s deadline.
    let proxy = TrickleProxy::start(&s3, 256 << 10);
    let dir = tempfile::tempdir().unwrap();
    let snaps = dir.path().join("snapshots");
    let mut child = bin::cmd()
        .args(["etcd-snapshot", "save", "--name", "slow", "--node-name", "n1", "--etcd-endpoints", &etcd.endpoint])
        .arg("--dir")
        .arg(&snaps)
        .args(["--s3", "--s3-insecure", "--s3-endpoint", &proxy.endpoint, "--s3-bucket", "slow", "--s3-timeout", "6s"])
        .args(["--s3-access-key", ACCESS_KEY, "--s3-secret-key", SECRET_KEY])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The local snapshot takes its final name while the upload is still trickling: the save did
    // not wait for S3.
    let deadline = Instant::now() + Duration::from_secs(60);
    let saved = loop {
        let done: Vec<String> = std::fs::read_dir(&snaps)
            .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        if let Some(f) = done.into_iter().find(|f| f.starts_with("slow-n1-") && !f.contains(".part")) {
            break f;
        }
        assert!(child.try_wait().unwrap().is_none(), "save ended before its local snapshot appeared");
        assert!(Instant::now() < deadline, "no local snapshot within 60 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(child.try_wait().unwrap().is_none(), "the upload cannot have finished yet at 256 KiB/s");
    let status = tests::support::etcd::etcdutl_status(&snaps.join(&saved));
    assert!(status["totalKey"].as_u64().unwrap() > 0);
    // The upload gives up at its deadline, leaving no object behind, and keeps the local copy.
    let started = Instant::now();
    let out: Run = child.wait_with_output().unwrap().into();
    assert!(started.elapsed() < Duration::from_secs(45), "the upload outlived its deadline by far");
    out.assert_fails_with("did not finish within 6s");
    assert!(!out.stderr.contains(SECRET_KEY));
    assert!(snaps.join(&saved).is_file());
    assert!(!s3.root.join("slow").join(&saved).exists(), "a partial object was completed");
}

#[test]
fn an_odd_object_under_the_prefix_does_not_stop_s3_retention() {
    let s3 = S3Server::start();
    s3.create_bucket("odd");
    let folder = s3.root.join("odd/k3s");
    std::fs::create_dir_all(&folder).unwrap();
    // What s3s-fs serves as objects: files under the bucket dir. One name we would never write.
    for name in ["etcd-snapshot-x..y-1", "etcd-snapshot-n1-100", "etcd-snapshot-n1-200", "etcd-snapshot-n2-300"] {
        std::fs::write(folder.join(name), b"not a real snapshot, only its name matters here").unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let prune = || -> Run {
        bin::run(
            bin::cmd()
                .args(["etcd-snapshot", "prune", "--name", "etcd-snapshot", "--node-name", "n1", "--dir"])
                .arg(dir.path().join("snapshots"))
                .args(["--s3", "--s3-insecure", "--s3-endpoint", &s3.endpoint, "--s3-bucket", "odd"])
                .args(["--s3-folder", "k3s", "--s3-retention", "1"])
                .args(["--s3-access-key", ACCESS_KEY, "--s3-secret-key", SECRET_KEY]),
        )
    };
    let out = prune();
    out.assert_ok();
    assert!(out.stderr.contains("would not have written"), "{}", out.stderr);
    let mut left: Vec<String> =
        std::fs::read_dir(&folder).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, ["etcd-snapshot-n2-300", "etcd-snapshot-x..y-1"]);
    // And the next run is as healthy.
    prune().assert_ok();
}
