//! Hostile S3 neighbours: an endpoint that answers at a trickle, a link that damages an upload.

use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use k3s_snapshot_core::store::{PutOptions, SnapshotStore};
use tests::support::bin::{self, Run};
use tests::support::etcd::{Etcd, EtcdVersion};
use tests::support::flip::FlipProxy;
use tests::support::s3::{S3Server, TrickleProxy, ACCESS_KEY, SECRET_KEY};
use tests::support::server::block_on;

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

/// A link that flips one bit of a streamed upload: the upload carries its CRC32C as an
/// `aws-chunked` trailer, and S3 (s3s-fs here, which checks trailers and SigV4; moto 5.1.22
/// checks neither checksums nor signatures) refuses the body. The same upload through the same
/// relay without the damage is taken, so it is the checksum that refused it. (s3s-fs moves the
/// object into place before it compares the checksum, so it keeps the damaged object; S3 keeps
/// nothing. What is checked here is the refusal.)
#[test]
fn a_streamed_upload_with_a_bit_flipped_in_transit_is_refused_by_its_checksum() {
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let body: Vec<u8> = (0..(9u32 << 20)).map(|i| (i % 251) as u8).collect();
    let put = |endpoint: &str, key: &str| {
        let cfg = s3_backend::S3Config { endpoint: endpoint.to_string(), ..s3.config("snaps") };
        let store = s3_backend::S3Store::new(&cfg).unwrap();
        let chunks: Vec<std::io::Result<Bytes>> = body.chunks(1 << 20).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        let opts = PutOptions { size_hint: Some(body.len() as u64), ..PutOptions::default() };
        block_on(store.put(key, futures::stream::iter(chunks).boxed(), opts))
    };
    // Byte 100,000 of the body: payload of the second 64 KiB chunk, past its size line.
    let flip = FlipProxy::start(s3.port, "/snaps/damaged-n1-1", 100_000);
    let e = put(&flip.endpoint, "damaged-n1-1").unwrap_err().to_string();
    assert_eq!(flip.flipped(), 1, "the relay did not damage the upload");
    assert!(e.contains("BadDigest") && e.contains("crc32c"), "{e}");
    assert!(!e.contains(SECRET_KEY));

    let clean = FlipProxy::start(s3.port, "/snaps/no-such-key", 100_000);
    put(&clean.endpoint, "clean-n1-1").unwrap();
    assert_eq!(clean.flipped(), 0);
    assert_eq!(std::fs::read(s3.root.join("snaps/clean-n1-1")).unwrap(), body);
}

/// An object whose SHA-256 trailer matches but whose pages do not (zeroed behind the meta pages,
/// then a fresh trailer: what a broken writer or a disk fault before the hash would leave). The
/// download hashes the bytes as they land and vouches for the trailer, so the reset's check reads
/// only the structure: it must still refuse the snapshot. Nothing changes, and neither the
/// download nor the image copy it wrote for the restore stays in the snapshot dir.
#[test]
fn an_s3_snapshot_with_a_matching_trailer_but_broken_pages_is_refused_and_leaves_no_scratch() {
    use sha2::Digest;
    use tests::support::server::{all_keys, files, kv, put, DataDir};
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let plain = Etcd::start(EtcdVersion::V3_5);
    for i in 0..300 {
        plain.put(&format!("/registry/k{i}"), "v");
    }
    let tmp = tempfile::tempdir().unwrap();
    let name = format!("etcd-snapshot-n1-{}", chrono::Utc::now().timestamp());
    let file = tests::support::k3s::snapshot(&plain, &tmp.path().join("snapshots"), &name);
    drop(plain);
    let bytes = std::fs::read(&file).unwrap();
    let mut img = bytes[..bytes.len() - 32].to_vec();
    assert!(img.len() > 4 * 4096, "the snapshot is too small to damage");
    for b in &mut img[2 * 4096..] {
        *b = 0;
    }
    let trailer = sha2::Sha256::digest(&img);
    img.extend_from_slice(&trailer);
    std::fs::write(&file, &img).unwrap();
    tests::support::k3s::upload(&s3, "snaps", "", &file, "n1", None);

    let dd = DataDir::new(EtcdVersion::V3_5);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    put(&dd, &[("keep", "me")]);
    s.stop();
    let restore = format!("--cluster-reset-restore-path={name}");
    let flags = s3.server_flags("snaps");
    let mut args = vec!["--cluster-reset", restore.as_str()];
    args.extend(flags.iter().map(String::as_str));
    let r = dd.run(&args);
    r.assert_fails_with("refusing to restore");
    assert!(!r.stderr.contains(SECRET_KEY));
    assert!(!dd.db().join("etcd-old").exists() && !dd.db().join("reset-flag").exists(), "nothing changes");
    let left = files(&dd.db().join("snapshots"));
    assert!(left.is_empty(), "the download or its image copy was left behind: {left:?}");
    let s = dd.start(&["--etcd-disable-snapshots"]);
    assert_eq!(all_keys(&dd), kv(&[("keep", "me")]));
    s.stop();
}
