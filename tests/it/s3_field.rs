//! S3 for the field (issue 29) against moto, which implements Object Lock, versioning and STS:
//! uploads into a bucket with Object Lock (which S3 and moto only accept with a checksum on
//! every PUT), retention on every object we write in both modes, retention (prune) that leaves
//! what is still locked and deletes it once the lock has passed, a versioned bucket's leftovers,
//! and SSE-C with the customer key on every request on an object's bytes, seen by nginx in front
//! of moto (moto takes the SSE-C headers and ignores them, so the headers are the proof).
//!
//! What moto 5.1.22 does not check (tried by hand, see the report of issue 29): it verifies no
//! checksum (a wrong trailer is stored), and plain deletes of locked objects succeed (a delete
//! marker; only a versioned delete of a locked version is refused). The trailing checksum is
//! proven against s3s-fs in `hostile::s3`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};

use k3s_snapshot_core::delta::SegmentName;
use k3s_snapshot_core::store::{PutOptions, SnapshotStore};
use s3_backend::S3Store;
use tests::support::bin::{self, run, Run};
use tests::support::etcd::EtcdVersion;
use tests::support::moto::MotoServer;
use tests::support::s3::TlsProxy;
use tests::support::server::{all_keys, assert_reset_done, block_on, files, kv, put, wait_until, DataDir};

/// Forces a streamed multipart upload of a snapshot above 6 MiB, in 5 MiB parts.
const STREAM_LIMITS: (&str, &str) = ("K3S_SNAPSHOT_TEST_S3_STREAM_LIMITS", "6291456:5242880");

/// `etcd-snapshot <args>` on `dd`'s etcd with `flags` (the S3 ones).
fn snapshot(dd: &DataDir, args: &[&str], flags: &[String]) -> Command {
    let mut c = bin::cmd();
    c.arg("etcd-snapshot")
        .args(args)
        .args(["--data-dir", &dd.path().display().to_string(), "--node-name", &dd.node])
        .args(flags);
    c
}

/// Writes 12 MiB of values, so that a snapshot is above the 8 MiB of a one-request upload.
fn grow(dd: &DataDir) {
    let value = "v".repeat(1 << 20);
    for i in 0..12 {
        put(dd, &[(&format!("/bulk/{i}"), value.as_str())]);
    }
}

/// The store `flags` name, opened as the binary would.
fn s3_objects(moto: &MotoServer, bucket: &str) -> Vec<String> {
    let store = S3Store::new(&moto.config(bucket)).unwrap();
    block_on(async {
        let all: Vec<_> = store.list("").try_collect().await.unwrap();
        let meta: Vec<_> = store.list(".metadata/").try_collect().await.unwrap();
        all.into_iter().chain(meta).map(|o| o.key).collect()
    })
}

fn lock_of(moto: &MotoServer, bucket: &str, key: &str) -> (String, Option<DateTime<Utc>>) {
    let h = moto.head(bucket, key);
    let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    let until = get("x-amz-object-lock-retain-until-date")
        .map(|d| DateTime::parse_from_rfc3339(&d).unwrap().with_timezone(&Utc));
    (get("x-amz-object-lock-mode").unwrap_or_default(), until)
}

fn names_in(r: &Run) -> Vec<String> {
    r.stdout.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect()
}

/// nginx recording every request in front of moto (plain http), and `server`/`etcd-snapshot`
/// flags for `bucket` through it.
fn recorded(moto: &MotoServer, bucket: &str) -> (TlsProxy, Vec<String>) {
    let recorder = TlsProxy::in_front_of(moto.port(), false);
    let mut flags = moto.flags(bucket);
    for f in &mut flags {
        if f.starts_with("--etcd-s3-endpoint=") {
            *f = format!("--etcd-s3-endpoint={}", recorder.endpoint);
        }
    }
    (recorder, flags)
}

/// Objects written as multipart uploads, whose lock moto does not carry over to the completed
/// object (its CompleteMultipartUpload drops it): their initiation is checked instead.
fn is_multipart(key: &str) -> bool {
    key.starts_with("parts-") || key.starts_with("unsized-")
}

/// Without any lock flag, a bucket whose default retention is COMPLIANCE takes every kind of
/// upload we make: a small snapshot and its metadata (one buffered PUT each), a large one (one
/// streamed PUT with a trailing checksum), one in streamed parts, and a body of unknown size
/// (buffered parts). moto refuses a PUT into such a bucket without Content-MD5 or
/// `x-amz-sdk-checksum-algorithm`, as S3 does (rancher #39986).
#[test]
fn a_bucket_with_object_lock_and_a_default_retention_takes_every_kind_of_upload() {
    let moto = MotoServer::start();
    moto.create_lock_bucket("locked", Some(("COMPLIANCE", 1)));
    let (recorder, flags) = recorded(&moto, "locked");
    let dd = DataDir::new(EtcdVersion::V3_5);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    put(&dd, &[("/registry/a", "1")]);
    run(&mut snapshot(&dd, &["save", "--name", "small"], &flags)).assert_ok();
    grow(&dd);
    run(&mut snapshot(&dd, &["save", "--name", "streamed"], &flags)).assert_ok();
    run(snapshot(&dd, &["save", "--name", "parts"], &flags).env(STREAM_LIMITS.0, STREAM_LIMITS.1)).assert_ok();
    s.stop();

    let cfg = s3_backend::S3Config { endpoint: recorder.endpoint.clone(), ..moto.config("locked") };
    let store = S3Store::new(&cfg).unwrap();
    let body: Vec<u8> = (0..(12u32 << 20)).map(|i| (i % 251) as u8).collect();
    block_on(async {
        let chunks: Vec<std::io::Result<Bytes>> = body.chunks(1 << 20).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        store.put("unsized-n1-100", futures::stream::iter(chunks).boxed(), PutOptions::default()).await.unwrap();
        let (_, got) = store.get("unsized-n1-100").await.unwrap();
        let got: Vec<Bytes> = got.try_collect().await.unwrap();
        assert!(got.concat() == body, "the unsized upload came back different");
    });

    let objects = s3_objects(&moto, "locked");
    for prefix in ["small-", "streamed-", "parts-", "unsized-", ".metadata/small-", ".metadata/parts-"] {
        let key = objects.iter().find(|k| k.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix}: {objects:?}"));
        if is_multipart(key) {
            continue;
        }
        let (mode, until) = lock_of(&moto, "locked", key);
        assert_eq!(mode, "COMPLIANCE", "{key}");
        assert!(until.is_some_and(|u| u > Utc::now() + chrono::Duration::hours(23)), "{key}: {until:?}");
    }
    // Every PUT and part named its checksum; a multipart upload declared it at its initiation.
    let requests = recorder.requests();
    let puts: Vec<&String> = requests.iter().filter(|l| l.starts_with("PUT /locked/")).collect();
    assert!(puts.len() >= 8, "{requests:#?}");
    assert!(puts.iter().all(|l| l.contains("sdk_checksum=CRC32C ")), "a PUT without a checksum: {puts:#?}");
    assert!(puts.iter().any(|l| l.contains("partNumber=")), "{puts:#?}");
}

/// `--etcd-s3-object-lock-mode` with `-days` puts that retention on every object written, in
/// both modes (over the bucket's default, when it has one).
#[test]
fn the_lock_flags_put_their_retention_on_every_object_in_both_modes() {
    let moto = MotoServer::start();
    let dd = DataDir::new(EtcdVersion::V3_5);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    grow(&dd);
    for (mode, bucket) in [("GOVERNANCE", "gov"), ("COMPLIANCE", "comp")] {
        moto.create_lock_bucket(bucket, Some(("GOVERNANCE", 30)));
        let (recorder, mut flags) = recorded(&moto, bucket);
        flags.extend([format!("--etcd-s3-object-lock-mode={mode}"), "--etcd-s3-object-lock-days=2".into()]);
        run(&mut snapshot(&dd, &["save"], &flags)).assert_ok();
        run(snapshot(&dd, &["save", "--name", "parts"], &flags).env(STREAM_LIMITS.0, STREAM_LIMITS.1)).assert_ok();
        let objects = s3_objects(&moto, bucket);
        assert_eq!(objects.len(), 4, "{objects:?}");
        for key in &objects {
            if is_multipart(key) {
                let requests = recorder.requests();
                let start = format!("POST /{bucket}/{key}?uploads");
                let init = requests.iter().find(|l| l.starts_with(&start)).unwrap_or_else(|| panic!("{requests:#?}"));
                assert!(init.contains(&format!("lock={mode} ")), "{init}");
                continue;
            }
            let (got, until) = lock_of(&moto, bucket, key);
            assert_eq!(got, mode, "{key}");
            let until = until.unwrap();
            let want = Utc::now() + chrono::Duration::days(2);
            assert!((until - want).num_minutes().abs() < 10, "{key}: {until} is not 2 days from now");
        }
    }
    s.stop();
}

/// Retention with snapshots under lock: the prune exits 0 and says in one line until when they
/// are kept; once their retention has passed (shortened here, which moto allows) the next prune
/// deletes them. The bucket is versioned (Object Lock needs it): a delete leaves a delete marker
/// and the old version, which `ls` and a download do not see.
#[test]
fn prune_keeps_what_is_under_retention_and_deletes_it_once_that_passed() {
    let moto = MotoServer::start();
    moto.create_lock_bucket("locked", None);
    let dd = DataDir::new(EtcdVersion::V3_5);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    let flags = |mode: &str| {
        let mut f = moto.flags("locked");
        f.extend([format!("--etcd-s3-object-lock-mode={mode}"), "--etcd-s3-object-lock-days=1".into()]);
        f
    };
    let mut saved = Vec::new();
    for (i, mode) in ["GOVERNANCE", "COMPLIANCE", "COMPLIANCE"].iter().enumerate() {
        put(&dd, &[("/registry/n", &i.to_string())]);
        let before = files(&dd.snapshots());
        run(&mut snapshot(&dd, &["save"], &flags(mode))).assert_ok();
        saved.push(files(&dd.snapshots()).into_iter().find(|f| !before.contains(f)).unwrap());
        // Names carry whole seconds.
        let t = Utc::now().timestamp();
        wait_until("the next second", Duration::from_secs(2), || Utc::now().timestamp() > t);
    }
    s.stop();
    let prune = || run(&mut snapshot(&dd, &["prune", "--s3-retention", "1"], &moto.flags("locked")));
    let r = prune();
    r.assert_ok();
    let kept: Vec<&str> = r.stderr.lines().filter(|l| l.contains("past retention")).collect();
    assert_eq!(kept.len(), 1, "{}", r.stderr);
    assert!(
        kept[0].contains("kept 2 snapshots past retention")
            && kept[0].contains(&format!("{} is under object lock (GOVERNANCE) until ", saved[0])),
        "{}",
        kept[0]
    );
    assert!(!r.stderr.contains("ERROR") && !r.stderr.contains("WARN"), "{}", r.stderr);
    let objects = s3_objects(&moto, "locked");
    assert!(saved.iter().all(|n| objects.contains(n)), "a locked snapshot went: {objects:?}");

    // Their retention passes.
    let until = Utc::now() + chrono::Duration::seconds(2);
    moto.set_retention("locked", &saved[0], "GOVERNANCE", until);
    moto.set_retention("locked", &saved[1], "COMPLIANCE", until);
    wait_until("the retention to pass", Duration::from_secs(10), || Utc::now() > until + chrono::Duration::seconds(1));
    let r = prune();
    r.assert_ok();
    assert!(!r.stderr.contains("past retention"), "{}", r.stderr);
    let objects = s3_objects(&moto, "locked");
    assert!(!objects.contains(&saved[0]) && !objects.contains(&saved[1]), "{objects:?}");
    assert!(objects.contains(&saved[2]) && objects.contains(&format!(".metadata/{}", saved[2])), "{objects:?}");

    // What the deletes left: a delete marker over each old version; nothing of it is seen.
    for gone in &saved[..2] {
        assert_eq!(moto.versions("locked", gone), (1, 1), "{gone}");
    }
    let ls = run(&mut snapshot(&dd, &["ls"], &moto.flags("locked")));
    ls.assert_ok();
    let s3_rows: Vec<String> = ls
        .stdout
        .lines()
        .filter(|l| l.contains("s3://locked/"))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    assert_eq!(s3_rows, vec![saved[2].clone()], "{}", ls.stdout);
    let store = S3Store::new(&moto.config("locked")).unwrap();
    block_on(async {
        assert!(store.head(&saved[0]).await.unwrap().is_none());
        let e = store.get(&saved[1]).await.err().unwrap().to_string();
        assert!(e.contains("not found") || e.contains("does not exist"), "{e}");
    });
}

/// A server's scheduled snapshots and delta segments go into a bucket with Object Lock, each
/// with the retention of the flags.
#[test]
fn scheduled_snapshots_and_delta_segments_are_locked_too() {
    let moto = MotoServer::start();
    moto.create_lock_bucket("locked", Some(("COMPLIANCE", 1)));
    let dd = DataDir::new(EtcdVersion::V3_5);
    let mut flags = moto.flags("locked");
    flags.extend([
        "--etcd-s3-object-lock-mode=GOVERNANCE".into(),
        "--etcd-s3-object-lock-days=3".into(),
        "--etcd-snapshot-schedule-cron=@every 2s".into(),
        "--etcd-snapshot-delta-interval=1s".into(),
    ]);
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let s = dd.start(&args);
    let mut i = 0;
    wait_until("a scheduled snapshot and a segment in s3", Duration::from_secs(60), || {
        i += 1;
        put(&dd, &[(&format!("/registry/k{i}"), "v")]);
        let objects = s3_objects(&moto, "locked");
        objects.iter().any(|o| o.starts_with("etcd-snapshot-"))
            && objects.iter().any(|o| SegmentName::parse(o).is_some())
    });
    let log = s.log_text();
    s.stop();
    assert!(!log.contains("MissingUploadObjectWithObjectLockHeaders"), "{log}");
    for key in s3_objects(&moto, "locked") {
        assert_eq!(lock_of(&moto, "locked", &key).0, "GOVERNANCE", "{key}");
    }
}

/// A 32-byte customer key in a private file.
fn customer_key(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("sse-c.key");
    let key: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37).wrapping_add(11)).collect();
    std::fs::write(&path, key).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// SSE-C: save (one-request, streamed and in streamed parts), `ls -o json` and a restore send
/// the customer key on every request on an object's bytes (PUT, initiation, part, completion,
/// GET, HEAD), as nginx in front of moto records; the key itself is in no output. Without the
/// key, the restore fails in one line that says to pass it, and changes nothing.
#[test]
fn sse_c_sends_the_customer_key_on_every_object_request_and_a_restore_without_it_says_so() {
    let moto = MotoServer::start();
    moto.create_bucket("ssec");
    let tls = TlsProxy::in_front_of(moto.port(), true);
    let tmp = tempfile::tempdir().unwrap();
    let key_file = customer_key(tmp.path());
    let md5 = s3_backend::CustomerKey::from_file(&key_file).unwrap().md5().to_string();
    let key_b64 = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(&key_file).unwrap())
    };
    let base = vec![
        "--etcd-s3".to_string(),
        format!("--etcd-s3-endpoint={}", tls.endpoint),
        format!("--etcd-s3-endpoint-ca={}", tls.ca_file.display()),
        "--etcd-s3-access-key=moto".into(),
        "--etcd-s3-secret-key=moto-secret".into(),
        "--etcd-s3-bucket=ssec".into(),
    ];
    let mut flags = base.clone();
    flags.push(format!("--etcd-s3-sse-customer-key-file={}", key_file.display()));
    let no_secret = |r: &Run| assert!(!r.stdout.contains(&key_b64) && !r.stderr.contains(&key_b64), "the key leaked");

    let dd = DataDir::new(EtcdVersion::V3_5);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    put(&dd, &[("from-s3", "1")]);
    let r = run(&mut snapshot(&dd, &["save", "--name", "small"], &flags));
    r.assert_ok();
    no_secret(&r);
    grow(&dd);
    run(&mut snapshot(&dd, &["save", "--name", "streamed"], &flags)).assert_ok();
    run(snapshot(&dd, &["save", "--name", "parts"], &flags).env(STREAM_LIMITS.0, STREAM_LIMITS.1)).assert_ok();
    s.stop();
    let ls = run(&mut snapshot(&dd, &["ls", "-o", "json"], &flags));
    ls.assert_ok();
    no_secret(&ls);
    let name =
        names_in(&run(&mut snapshot(&dd, &["ls"], &flags))).into_iter().find(|n| n.starts_with("small-")).unwrap();
    for f in files(&dd.snapshots()) {
        std::fs::remove_file(dd.snapshots().join(f)).unwrap();
    }

    // Without the key: one line, nothing moved.
    let mut reset = base.clone();
    reset.extend(["--cluster-reset".to_string(), format!("--cluster-reset-restore-path={name}")]);
    let r = dd.run(&reset.iter().map(String::as_str).collect::<Vec<_>>());
    r.assert_fails_with(
        "encrypted with a customer key (SSE-C) and none was given; pass --etcd-s3-sse-customer-key-file",
    );
    assert_eq!(r.stderr.lines().filter(|l| l.starts_with("error:")).count(), 1, "{}", r.stderr);
    assert!(!dd.db().join("reset-flag").exists());

    let mut reset = flags.clone();
    reset.extend(["--cluster-reset".to_string(), format!("--cluster-reset-restore-path={name}")]);
    let r = dd.run(&reset.iter().map(String::as_str).collect::<Vec<_>>());
    assert_reset_done(&r, &dd);
    no_secret(&r);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    assert_eq!(all_keys(&dd), kv(&[("from-s3", "1")]));
    s.stop();

    // Every request on an object's bytes carried the key, in the keyed run.
    let lines = tls.requests();
    let object_request = |l: &&String| {
        let mut parts = l.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let key = path.strip_prefix("/ssec/").unwrap_or("");
        ["PUT", "POST", "GET", "HEAD"].contains(&method) && !key.is_empty() && !key.starts_with('?')
    };
    let keyed: Vec<&String> = lines.iter().filter(object_request).collect();
    let without_key: Vec<&&String> =
        keyed.iter().filter(|l| !(l.contains("ssec=AES256 ") && l.contains(&format!("ssec_md5={md5} ")))).collect();
    // The keyless restore's requests are the only ones allowed to miss it.
    assert!(
        without_key.iter().all(|l| l.starts_with("GET /ssec/.metadata/small-")),
        "requests without the customer key: {without_key:#?}"
    );
    let has = |what: &str, f: &dyn Fn(&str) -> bool| {
        assert!(keyed.iter().any(|l| f(l) && l.contains("ssec=AES256 ")), "no {what} with the key in {lines:#?}");
    };
    has("one-request PUT", &|l| l.starts_with("PUT /ssec/streamed-"));
    has("buffered PUT", &|l| l.starts_with("PUT /ssec/.metadata/small-"));
    has("multipart initiation", &|l| l.starts_with("POST /ssec/parts-") && l.contains("?uploads"));
    has("streamed part", &|l| l.starts_with("PUT /ssec/parts-") && l.contains("partNumber="));
    has("completion", &|l| l.starts_with("POST /ssec/parts-") && l.contains("uploadId="));
    has("GET", &|l| l.starts_with("GET /ssec/small-"));
    has("HEAD", &|l| l.starts_with("HEAD /ssec/"));
}
