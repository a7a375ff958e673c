//! The storage trait's conformance suite, run for `LocalStore` and `S3Store`, and the S3 store
//! against a real S3 server (`s3s-fs` with authentication, nginx for TLS): multipart and
//! streamed single-request uploads,
//! faults with clear messages, pagination and retention over thousands of objects.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use k3s_snapshot_core::metadata::SnapshotMetadata;
use k3s_snapshot_core::progress::NoProgress;
use k3s_snapshot_core::retention::{prune, RetentionPolicy};
use k3s_snapshot_core::store::{ByteStream, LocalStore, PutOptions, SnapshotStore};
use k3s_snapshot_core::Error;
use s3_backend::{download_snapshot, fetch_metadata, upload_file, S3Config, S3Store};
use tests::support::s3::{closed_endpoint, HangingEndpoint, S3Server, TlsProxy, SECRET_KEY};

const MIB: usize = 1 << 20;

/// Deterministic, incompressible test data.
fn pattern(len: usize, seed: u64) -> Bytes {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut v = vec![0u8; len];
    for chunk in v.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    Bytes::from(v)
}

/// `data` as a stream of `chunk`-byte pieces.
fn chunked(data: Bytes, chunk: usize) -> ByteStream {
    let pieces: Vec<std::io::Result<Bytes>> =
        (0..data.len()).step_by(chunk.max(1)).map(|i| Ok(data.slice(i..(i + chunk).min(data.len())))).collect();
    futures::stream::iter(pieces).boxed()
}

/// `data` in pieces, then an error: a source that fails mid-way.
fn failing_after(data: Bytes, chunk: usize) -> ByteStream {
    chunked(data, chunk)
        .chain(futures::stream::once(async { Err(std::io::Error::other("boom: the source failed")) }))
        .boxed()
}

async fn read_all(mut body: ByteStream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(c) = body.next().await {
        out.extend_from_slice(&c.unwrap());
    }
    out
}

async fn keys(store: &dyn SnapshotStore, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = store.list(prefix).map_ok(|o| o.key).try_collect().await.unwrap();
    v.sort();
    v
}

fn opts() -> PutOptions {
    PutOptions { content_type: "application/octet-stream".into(), ..PutOptions::default() }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[track_caller]
fn assert_no_secret(msg: &str) {
    eprintln!("message: {msg}");
    assert!(!msg.contains(SECRET_KEY), "the secret key leaked into: {msg}");
    assert!(!msg.contains('\n'), "not one line: {msg}");
}

/// What every [`SnapshotStore`] must do (the trait's documented guarantees).
async fn conformance(store: &dyn SnapshotStore) {
    // Round trip, byte-identical, through many small chunks.
    let data = pattern(300_000, 1);
    let n = store.put("s-n1-100", chunked(data.clone(), 7_000), opts()).await.unwrap();
    assert_eq!(n, data.len() as u64);
    let (info, body) = store.get("s-n1-100").await.unwrap();
    assert_eq!(info.size, data.len() as u64);
    assert_eq!(info.key, "s-n1-100");
    assert!(read_all(body).await == data, "get returned different bytes");
    let head = store.head("s-n1-100").await.unwrap().expect("head of a stored object");
    assert_eq!(head.size, data.len() as u64);

    // An empty object.
    assert_eq!(store.put("s-n1-101", futures::stream::empty().boxed(), opts()).await.unwrap(), 0);
    let (info, body) = store.get("s-n1-101").await.unwrap();
    assert_eq!(info.size, 0);
    assert!(read_all(body).await.is_empty());

    // A body that fails mid-way (after more than one S3 part) leaves nothing under a new key...
    let err = store.put("s-n1-102", failing_after(pattern(12 * MIB, 2), MIB), opts()).await.unwrap_err();
    assert!(err.to_string().contains("boom"), "the source's error is named: {err}");
    assert!(store.head("s-n1-102").await.unwrap().is_none(), "a failed put left an object");
    // ...and the earlier object under an existing key untouched.
    let err = store.put("s-n1-100", failing_after(pattern(12 * MIB, 3), MIB), opts()).await.unwrap_err();
    assert!(err.to_string().contains("boom"), "{err}");
    let (info, body) = store.get("s-n1-100").await.unwrap();
    assert_eq!(info.size, data.len() as u64);
    assert!(read_all(body).await == data, "a failed put changed the earlier object");

    // Listing by prefix, with and without the metadata prefix; nothing deeper than the prefix.
    for k in ["s-n1-103", "t-n1-100", ".metadata/s-n1-100"] {
        store.put(k, chunked(Bytes::from_static(b"{}"), 1), opts()).await.unwrap();
    }
    assert_eq!(keys(store, "s-").await, strings(&["s-n1-100", "s-n1-101", "s-n1-103"]));
    assert_eq!(keys(store, "").await, strings(&["s-n1-100", "s-n1-101", "s-n1-103", "t-n1-100"]));
    assert_eq!(keys(store, ".metadata/").await, strings(&[".metadata/s-n1-100"]));
    assert_eq!(keys(store, ".metadata/s-").await, strings(&[".metadata/s-n1-100"]));
    assert!(keys(store, ".metadata/t-").await.is_empty());
    assert!(keys(store, "nothing-").await.is_empty());
    let listed: Vec<_> = store.list("s-n1-100").try_collect().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].size, data.len() as u64);

    // A missing object.
    match store.get("s-n1-999").await {
        Err(Error::NotFound { name, .. }) => assert_eq!(name, "s-n1-999"),
        Err(e) => panic!("expected NotFound, got {e}"),
        Ok(_) => panic!("expected NotFound, got an object"),
    }
    assert!(store.head("s-n1-999").await.unwrap().is_none());

    // Deleting, including keys that are not there.
    store.delete(&strings(&["s-n1-100", ".metadata/s-n1-100", "s-n1-999", ".metadata/s-n1-999"])).await.unwrap();
    store.delete(&strings(&["s-n1-999"])).await.unwrap();
    store.delete(&[]).await.unwrap();
    assert!(store.head("s-n1-100").await.unwrap().is_none());
    assert_eq!(keys(store, "").await, strings(&["s-n1-101", "s-n1-103", "t-n1-100"]));
    assert!(keys(store, ".metadata/").await.is_empty());

    // Keys that could leave the store are refused.
    for bad in ["../x", "a/b", ".metadata/../x"] {
        assert!(store.put(bad, chunked(Bytes::from_static(b"x"), 1), opts()).await.is_err(), "{bad}");
    }
}

#[tokio::test]
async fn local_store_conforms() {
    let tmp = tempfile::tempdir().unwrap();
    let store = LocalStore::new(tmp.path().join("db/snapshots"));
    conformance(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_conforms() {
    let server = S3Server::start();
    server.create_bucket("snaps");
    let store = S3Store::connect(&S3Config { folder: "/k3s/etcd/".into(), ..server.config("snaps") }).await.unwrap();
    assert_eq!(store.describe(), "s3://snaps/k3s/etcd");
    assert_eq!(store.location("s-n1-1"), "s3://snaps/k3s/etcd/s-n1-1");
    conformance(&store).await;
    // Keys live under the folder; nothing else was written in the bucket.
    let mut files: Vec<String> = std::fs::read_dir(server.root.join("snaps/k3s/etcd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, strings(&[".metadata", "s-n1-101", "s-n1-103", "t-n1-100"]));

    // The same in the bucket's root, next to another folder whose objects must not show up.
    let root = S3Store::connect(&server.config("snaps")).await.unwrap();
    assert_eq!(root.describe(), "s3://snaps");
    assert_eq!(root.location("s-n1-1"), "s3://snaps/s-n1-1");
    conformance(&root).await;
}

/// 40 MiB: 20 MiB, then a pause until the returned sender fires (or is dropped), then 20 MiB more;
/// with a count of the bytes taken from it so far.
fn paused_body(
    seed: u64,
) -> (ByteStream, tokio::sync::oneshot::Sender<()>, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let (resume_tx, resume_rx) = tokio::sync::oneshot::channel::<()>();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = sent.clone();
    let first = chunked(pattern(20 * MIB, seed), MIB).inspect(move |c| {
        if let Ok(c) = c {
            counter.fetch_add(c.len(), std::sync::atomic::Ordering::SeqCst);
        }
    });
    let rest = futures::stream::once(async move {
        let _ = resume_rx.await;
        futures::stream::iter(vec![Ok(pattern(20 * MIB, seed + 1))])
    })
    .flatten();
    (first.chain(rest).boxed(), resume_tx, sent)
}

fn sized(len: usize) -> PutOptions {
    PutOptions {
        content_type: "application/octet-stream".into(),
        user_metadata: vec![("k3s-node-name".into(), "n1".into())],
        size_hint: Some(len as u64),
        ranges: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_upload_of_known_size_round_trips_with_metadata() {
    let server = S3Server::start();
    server.create_bucket("snaps");
    let store = S3Store::connect(&S3Config { folder: "f".into(), ..server.config("snaps") }).await.unwrap();
    // Larger than a part, so that without the size it would be a multipart upload.
    let data = pattern(24 * MIB + 12345, 21);
    let n = store.put("s-n1-1700000000", chunked(data.clone(), 64 * 1024), sized(data.len())).await.unwrap();
    assert_eq!(n, data.len() as u64);
    let details = store.head_details("s-n1-1700000000").await.unwrap().unwrap();
    assert_eq!(details.info.size, data.len() as u64);
    assert_eq!(details.content_type.as_deref(), Some("application/octet-stream"));
    assert_eq!(details.user_metadata, vec![("k3s-node-name".to_string(), "n1".to_string())]);
    let (_, body) = store.get("s-n1-1700000000").await.unwrap();
    assert!(read_all(body).await == data[..], "the object differs from what was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_streamed_upload_that_fails_short_or_long_leaves_the_previous_object() {
    let server = S3Server::start();
    server.create_bucket("snaps");
    let store = S3Store::connect(&server.config("snaps")).await.unwrap();
    let old = pattern(MIB, 30);
    store.put("s-n1-1700000000", chunked(old.clone(), MIB), opts()).await.unwrap();
    let len = 20 * MIB;
    let cases: Vec<(&str, ByteStream, &str)> = vec![
        ("source error", failing_after(pattern(12 * MIB, 31), MIB), "boom: the source failed"),
        ("short", chunked(pattern(12 * MIB, 32), MIB), "ended after"),
        ("long", chunked(pattern(len + 1, 33), MIB), "longer"),
        // The whole length arrives, and only then the source fails: still nothing stored.
        ("error after the last byte", failing_after(pattern(len, 34), MIB), "boom: the source failed"),
    ];
    for (what, body, needle) in cases {
        let err = store.put("s-n1-1700000000", body, sized(len)).await.unwrap_err().to_string();
        assert!(err.contains("cannot upload s-n1-1700000000") && err.contains(needle), "{what}: {err}");
        assert_no_secret(&err);
        let (info, body) = store.get("s-n1-1700000000").await.unwrap();
        assert_eq!(info.size, old.len() as u64, "{what}: the object changed");
        assert!(read_all(body).await == old[..], "{what}: the object changed");
    }
    assert_eq!(keys(&store, "").await, strings(&["s-n1-1700000000"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_server_killed_mid_streamed_upload_leaves_no_object() {
    let mut server = S3Server::start();
    server.create_bucket("snaps");
    let store =
        S3Store::connect(&S3Config { timeout: Duration::from_secs(10), ..server.config("snaps") }).await.unwrap();
    // 20 MiB, then wait for the test to kill the server, then 20 MiB more.
    let (body, resume_tx, sent) = paused_body(40);
    let uploader = store.clone();
    let put = tokio::spawn(async move { uploader.put("s-n1-1700000000", body, sized(40 * MIB)).await });
    let deadline = Instant::now() + Duration::from_secs(30);
    while sent.load(std::sync::atomic::Ordering::SeqCst) < 20 * MIB {
        assert!(Instant::now() < deadline, "the upload never took the first 20 MiB:\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill();
    // The request may already have failed on the closed connection and dropped the body.
    let _ = resume_tx.send(());
    let msg = put.await.unwrap().unwrap_err().to_string();
    assert!(msg.contains("s3://snaps: cannot upload s-n1-1700000000") && msg.contains("s3 endpoint"), "{msg}");
    assert_no_secret(&msg);
    server.restart();
    let store = S3Store::connect(&server.config("snaps")).await.unwrap();
    assert!(store.head("s-n1-1700000000").await.unwrap().is_none(), "a half upload became an object");
    assert!(keys(&store, "").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_multipart_upload_of_40_mib_round_trips_with_metadata() {
    let server = S3Server::start();
    server.create_bucket("snaps");
    let store = S3Store::connect(&S3Config { folder: "f".into(), ..server.config("snaps") }).await.unwrap();
    let data = pattern(40 * MIB, 4);
    let put_opts = PutOptions {
        content_type: "application/zip".into(),
        user_metadata: vec![("k3s-node-name".into(), "n1".into()), ("k3s-token-hash".into(), "0123456789ab".into())],
        size_hint: None,
        ranges: None,
    };
    let started = Instant::now();
    let n = store.put("on-demand-n1-1700000000.zip", chunked(data.clone(), 64 * 1024), put_opts).await.unwrap();
    let put_secs = started.elapsed().as_secs_f64();
    assert_eq!(n, data.len() as u64);

    let details = store.head_details("on-demand-n1-1700000000.zip").await.unwrap().unwrap();
    assert_eq!(details.info.size, data.len() as u64);
    assert_eq!(details.content_type.as_deref(), Some("application/zip"));
    assert_eq!(
        details.user_metadata,
        vec![
            ("k3s-node-name".to_string(), "n1".to_string()),
            ("k3s-token-hash".to_string(), "0123456789ab".to_string())
        ]
    );

    let started = Instant::now();
    let (info, mut body) = store.get("on-demand-n1-1700000000.zip").await.unwrap();
    assert_eq!(info.size, data.len() as u64);
    let mut sha = Sha256::new();
    let mut got = 0usize;
    while let Some(c) = body.next().await {
        let c = c.unwrap();
        got += c.len();
        sha.update(&c);
    }
    let get_secs = started.elapsed().as_secs_f64();
    assert_eq!(got, data.len());
    assert_eq!(sha.finalize()[..], Sha256::digest(&data)[..], "the object differs from what was sent");
    eprintln!(
        "s3s-fs 40 MiB: put {:.0} MiB/s ({put_secs:.2}s, multipart, 64 KiB chunks), get {:.0} MiB/s ({get_secs:.2}s)",
        40.0 / put_secs,
        40.0 / get_secs
    );
    // The server holds the object whole, and no upload is left over.
    let on_disk = std::fs::metadata(server.root.join("snaps/f/on-demand-n1-1700000000.zip")).unwrap();
    assert_eq!(on_disk.len(), data.len() as u64);
    let leftovers: Vec<_> = std::fs::read_dir(&server.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".upload"))
        .collect();
    assert!(leftovers.is_empty(), "upload state left on the server: {leftovers:?}");
}

#[tokio::test]
async fn s3_missing_bucket_is_a_clear_error() {
    let server = S3Server::start();
    let err = S3Store::connect(&server.config("no-such-bucket")).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("bucket no-such-bucket does not exist at endpoint http://{}", server.endpoint))
            && msg.contains("create it or fix --etcd-s3-bucket"),
        "{msg}"
    );
    assert!(!err.is_retryable());
    assert_no_secret(&msg);
}

#[tokio::test]
async fn s3_wrong_secret_key_is_a_clear_error_without_the_secret() {
    let server = S3Server::start();
    server.create_bucket("snaps");
    let wrong = "wr0ng-Secret-Value-Q1w2e3";
    let cfg = S3Config { secret_key: wrong.into(), ..server.config("snaps") };
    let err = S3Store::connect(&cfg).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("access denied") && msg.contains("--etcd-s3-secret-key"), "{msg}");
    assert!(!msg.contains(wrong), "the secret key leaked: {msg}");
    assert!(!err.is_retryable());
    assert_no_secret(&msg);
    // Nor in Debug output of the configuration.
    let dbg = format!("{cfg:?}");
    assert!(!dbg.contains(wrong), "{dbg}");

    // A store whose secret is right never shows it either.
    let store = S3Store::connect(&server.config("snaps")).await.unwrap();
    assert_no_secret(&format!("{store:?}"));
    assert_no_secret(&format!("{:?}", server.config("snaps")));
}

#[tokio::test]
async fn s3_endpoint_down_is_a_clear_error() {
    let endpoint = closed_endpoint();
    let cfg = S3Config {
        endpoint: endpoint.clone(),
        insecure: true,
        bucket: "snaps".into(),
        access_key: "a".into(),
        secret_key: SECRET_KEY.into(),
        timeout: Duration::from_secs(20),
        ..S3Config::default()
    };
    let started = Instant::now();
    let err = S3Store::connect(&cfg).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("cannot connect to s3 endpoint http://{endpoint}"))
            && msg.to_lowercase().contains("connection refused")
            && msg.contains("--etcd-s3-endpoint"),
        "{msg}"
    );
    assert!(err.is_retryable(), "a refused connection is worth retrying later");
    assert!(started.elapsed() < Duration::from_secs(10), "retries are bounded: {:?}", started.elapsed());
    assert_no_secret(&msg);
}

#[tokio::test]
async fn s3_endpoint_that_never_answers_hits_the_timeout() {
    let hang = HangingEndpoint::start();
    let cfg = S3Config {
        endpoint: hang.endpoint.clone(),
        insecure: true,
        bucket: "snaps".into(),
        access_key: "a".into(),
        secret_key: SECRET_KEY.into(),
        timeout: Duration::from_secs(2),
        ..S3Config::default()
    };
    let started = Instant::now();
    let err = S3Store::connect(&cfg).await.unwrap_err();
    let took = started.elapsed();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("s3 endpoint http://{} did not answer within 2s (--etcd-s3-timeout)", hang.endpoint)),
        "{msg}"
    );
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(5), "took {took:?}");
    assert_no_secret(&msg);
}

#[tokio::test]
async fn s3_over_tls_with_the_test_ca_works() {
    let server = S3Server::start();
    server.create_bucket("snaps");
    let tls = TlsProxy::start(&server);
    let cfg = S3Config { endpoint_ca: Some(tls.ca_file.clone()), ..tls.config("snaps") };
    let store = S3Store::connect(&cfg).await.unwrap_or_else(|e| panic!("{e}\nnginx:\n{}", tls.log()));
    // Multipart through the proxy too (bodies are streamed, not buffered, by nginx).
    let data = pattern(12 * MIB, 5);
    store.put("s-n1-1", chunked(data.clone(), 256 * 1024), opts()).await.unwrap();
    let (_, body) = store.get("s-n1-1").await.unwrap();
    assert!(read_all(body).await == data);
    assert_eq!(keys(&store, "s-").await, strings(&["s-n1-1"]));
    store.delete(&strings(&["s-n1-1"])).await.unwrap();
    assert!(keys(&store, "").await.is_empty());
}

#[tokio::test]
async fn endpoint_ca_takes_several_files_or_base64_pem_as_k3s_does() {
    use base64::Engine;
    let server = S3Server::start();
    server.create_bucket("snaps");
    let tls = TlsProxy::start(&server);
    // Another, unrelated CA first: the bundle must hold both, and the right one must count.
    let (other_ca, _, _) = tests::support::s3::make_certs();
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, other_ca).unwrap();
    let two_files = format!("{} {}", other.display(), tls.ca_file.display());
    let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&tls.ca_file).unwrap());
    for spec in [two_files, b64] {
        let cfg = S3Config { endpoint_ca: Some(spec.clone().into()), ..tls.config("snaps") };
        let store = S3Store::connect(&cfg).await.unwrap_or_else(|e| panic!("{spec}: {e}\nnginx:\n{}", tls.log()));
        // Both clients use it: the streamed single PUT (known size) and minio's.
        let data = pattern(6 * MIB, 3);
        let o = PutOptions { size_hint: Some(data.len() as u64), ..opts() };
        store.put("ca-n1-1", chunked(data.clone(), 256 * 1024), o).await.unwrap();
        assert_eq!(keys(&store, "ca-").await, strings(&["ca-n1-1"]));
        store.delete(&strings(&["ca-n1-1"])).await.unwrap();
    }
    // Only the unrelated CA (same name, other key): refused.
    let cfg = S3Config { endpoint_ca: Some(other.clone()), ..tls.config("snaps") };
    let err = S3Store::connect(&cfg).await.unwrap_err().to_string();
    assert!(err.contains("invalid peer certificate"), "{err}");
}

#[tokio::test]
async fn s3_over_tls_without_the_ca_names_the_certificate_problem() {
    let server = S3Server::start();
    server.create_bucket("snaps");
    let tls = TlsProxy::start(&server);
    let err = S3Store::connect(&tls.config("snaps")).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("invalid peer certificate: UnknownIssuer")
            && msg.contains("--etcd-s3-endpoint-ca")
            && msg.contains("--etcd-s3-skip-ssl-verify"),
        "{msg}"
    );
    assert!(!err.is_retryable(), "a certificate problem does not go away by retrying");
    assert_no_secret(&msg);

    // A file that is not a CA is refused up front.
    let not_pem = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(not_pem.path(), b"not a certificate").unwrap();
    let err = S3Store::connect(&S3Config { endpoint_ca: Some(not_pem.path().into()), ..tls.config("snaps") })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--etcd-s3-endpoint-ca"), "{err}");
}

#[tokio::test]
async fn s3_over_tls_with_skip_ssl_verify_works() {
    let server = S3Server::start();
    server.create_bucket("snaps");
    let tls = TlsProxy::start(&server);
    let store = S3Store::connect(&S3Config { skip_ssl_verify: true, ..tls.config("snaps") }).await.unwrap();
    store.put("s-n1-1", chunked(Bytes::from_static(b"hello"), 2), opts()).await.unwrap();
    let (_, body) = store.get("s-n1-1").await.unwrap();
    assert_eq!(read_all(body).await, b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_server_killed_mid_multipart_upload_leaves_no_object() {
    let mut server = S3Server::start();
    server.create_bucket("snaps");
    let store =
        S3Store::connect(&S3Config { timeout: Duration::from_secs(10), ..server.config("snaps") }).await.unwrap();

    // 20 MiB, then wait for the test to kill the server, then 20 MiB more.
    let (body, resume_tx, _) = paused_body(6);
    let uploader = store.clone();
    let put = tokio::spawn(async move { uploader.put("s-n1-1700000000", body, opts()).await });

    // Wait until the server holds at least one part of the upload, then kill it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let has_part = std::fs::read_dir(&server.root)
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().contains(".part-1"));
        if has_part {
            break;
        }
        assert!(Instant::now() < deadline, "no part reached the server:\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill();
    let _ = resume_tx.send(()); // the upload may already have failed and dropped its body

    let err = put.await.unwrap().unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("s3://snaps: cannot upload s-n1-1700000000") && msg.contains("s3 endpoint"), "{msg}");
    assert_no_secret(&msg);

    server.restart();
    let store = S3Store::connect(&server.config("snaps")).await.unwrap();
    assert!(store.head("s-n1-1700000000").await.unwrap().is_none(), "a half upload became an object");
    assert!(keys(&store, "").await.is_empty());
    assert!(matches!(store.get("s-n1-1700000000").await, Err(Error::NotFound { .. })));
    assert_eq!(std::fs::read_dir(server.root.join("snaps")).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_listing_of_2500_objects_pages_and_prune_keeps_the_newest() {
    let server = S3Server::start();
    server.create_bucket("snaps");
    let store = S3Store::connect(&S3Config { folder: "etcd".into(), ..server.config("snaps") }).await.unwrap();
    const N: i64 = 2500;
    const BASE: i64 = 1_700_000_000;
    // Snapshots of three nodes, interleaved in time; metadata for the 5 oldest and 5 newest.
    let mut all: Vec<(String, i64)> =
        (0..N).map(|i| (format!("on-demand-n{}-{}", i % 3 + 1, BASE + i), BASE + i)).collect();
    let mut puts: Vec<String> = all.iter().map(|(k, _)| k.clone()).collect();
    for (k, _) in all.iter().take(5).chain(all.iter().skip(N as usize - 5)) {
        puts.push(SnapshotMetadata::key_for(k));
    }
    // Not ours, or not this prefix: never touched.
    let foreign = ["on-demand-notes.txt", "other-n1-1700000001"];
    puts.extend(foreign.iter().map(|s| s.to_string()));
    let started = Instant::now();
    futures::stream::iter(puts.clone())
        .map(|k| {
            let store = store.clone();
            async move { store.put(&k, chunked(Bytes::from_static(b"x"), 1), opts()).await.map(|_| ()) }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await
        .unwrap();
    eprintln!("s3s-fs: {} small puts in {:.1}s", puts.len(), started.elapsed().as_secs_f64());

    // Every object exactly once, across pages of 1000.
    let listed: Vec<String> = store.list("").map_ok(|o| o.key).try_collect().await.unwrap();
    assert_eq!(listed.len(), N as usize + foreign.len());
    let unique: BTreeSet<&String> = listed.iter().collect();
    assert_eq!(unique.len(), listed.len(), "the listing repeated keys");
    let expected: BTreeSet<String> =
        all.iter().map(|(k, _)| k.clone()).chain(foreign.iter().map(|s| s.to_string())).collect();
    assert_eq!(listed.iter().cloned().collect::<BTreeSet<_>>(), expected);
    assert_eq!(keys(&store, ".metadata/").await.len(), 10);

    // Retention over all nodes keeps the 7 newest by the timestamp in the name.
    let deleted = prune(&store, &RetentionPolicy { prefix: "on-demand", keep: 7 }).await.unwrap();
    all.sort_by_key(|e| std::cmp::Reverse(e.1));
    let kept: BTreeSet<String> = all.iter().take(7).map(|(k, _)| k.clone()).collect();
    let doomed: BTreeSet<String> = all.iter().skip(7).map(|(k, _)| k.clone()).collect();
    assert_eq!(deleted.iter().cloned().collect::<BTreeSet<_>>(), doomed);
    let left: BTreeSet<String> = keys(&store, "").await.into_iter().collect();
    let expected_left: BTreeSet<String> = kept.iter().cloned().chain(foreign.iter().map(|s| s.to_string())).collect();
    assert_eq!(left, expected_left);
    let meta_left = keys(&store, ".metadata/").await;
    assert_eq!(meta_left.len(), 5, "{meta_left:?}");
    assert!(meta_left.iter().all(|m| kept.contains(m.trim_start_matches(".metadata/"))), "{meta_left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_download_snapshot_checks_size_and_sha256_before_renaming() {
    let server = S3Server::start();
    server.create_bucket("snaps");
    let store = S3Store::connect(&server.config("snaps")).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let file = "on-demand-n1-1700000000";
    let data = pattern(9 * MIB + 123, 8);
    let src = tmp.path().join(file);
    std::fs::write(&src, &data).unwrap();
    let n = upload_file(&store, file, &src, opts(), &NoProgress).await.unwrap();
    assert_eq!(n, data.len() as u64);
    let meta = metadata_of(file, &data);
    store.put(&SnapshotMetadata::key_for(file), chunked(Bytes::from(meta.to_json()), 64), opts()).await.unwrap();
    let fetched = fetch_metadata(&store, file).await.unwrap().expect("metadata was stored");
    let fetched = fetched.ours().expect("our own document").clone();
    assert_eq!(fetched, meta);

    let dest = tmp.path().join("restore");
    let path = download_snapshot(&store, file, &dest, Some(&fetched)).await.unwrap();
    assert_eq!(path, dest.join(file));
    assert!(std::fs::read(&path).unwrap() == data);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);

    // Metadata that does not match: refused, and nothing new is left in the directory.
    let other = tmp.path().join("other");
    let bad = SnapshotMetadata { sha256: "00".repeat(32), ..meta.clone() };
    let err = download_snapshot(&store, file, &other, Some(&bad)).await.unwrap_err();
    assert!(matches!(err, Error::Checksum { .. }), "{err}");
    assert_eq!(dir_len(&other), 0);
    let short = SnapshotMetadata { size: meta.size - 1, ..meta };
    let err = download_snapshot(&store, file, &other, Some(&short)).await.unwrap_err();
    assert!(matches!(err, Error::Truncated { .. }), "{err}");
    assert_eq!(dir_len(&other), 0);
    assert!(fetch_metadata(&store, "on-demand-n1-1").await.unwrap().is_none());
}

fn dir_len(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|rd| rd.count()).unwrap_or(0)
}

fn chrono_now() -> chrono::DateTime<chrono::Utc> {
    // Whole seconds, as they survive a JSON round trip unchanged either way.
    chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp(), 0).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_download_resumes_where_it_broke_when_the_server_restarts() {
    let mut server = S3Server::start();
    server.create_bucket("snaps");
    let store = S3Store::connect(&server.config("snaps")).await.unwrap();
    let data = pattern(64 * MIB, 9);
    store.put("s-n1-1", chunked(data.clone(), MIB), opts()).await.unwrap();

    let (info, mut body) = store.get("s-n1-1").await.unwrap();
    assert_eq!(info.size, data.len() as u64);
    let mut got = Vec::with_capacity(data.len());
    got.extend_from_slice(&body.next().await.unwrap().unwrap());
    // The connection the download reads from dies; the server is back a moment later.
    server.restart();
    while let Some(c) = body.next().await {
        got.extend_from_slice(&c.unwrap_or_else(|e| panic!("the download did not resume: {e}\n{}", server.log())));
    }
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the resumed download differs");
}

/// Snapshot metadata of ours for `data`, as a save writes it.
fn metadata_of(file: &str, data: &[u8]) -> SnapshotMetadata {
    SnapshotMetadata {
        name: file.into(),
        node_name: "n1".into(),
        size: data.len() as u64,
        created_at: chrono_now(),
        compressed: false,
        sha256: hex::encode(Sha256::digest(data)),
        etcd_revision: Some(42),
        etcd_version: Some("3.5.1".into()),
        total_key: None,
        token_hash: None,
        encrypted: false,
        recipients: Vec::new(),
        cluster_id: None,
        live_hash: None,
        verified: None,
        extra: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_download_of_a_large_snapshot_fetches_parts_at_once_and_checks_the_sha256() {
    let server = S3Server::start();
    server.create_bucket("snaps");
    let store = S3Store::connect(&server.config("snaps")).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let file = "on-demand-n1-1700000001";
    // Above the ranged download's threshold and not a whole number of its ranges.
    let len = k3s_snapshot_core::transfer::PARALLEL_MIN as usize + 37 * MIB + 4321;
    let data = pattern(len, 21);
    store.put(file, chunked(data.clone(), MIB), sized(len)).await.unwrap();
    let meta = metadata_of(file, &data);

    // The store hands out consecutive parts of the version it saw, each exactly its bytes (the
    // first one cut from the whole object's GET).
    let (info, parts) = store.get_parts(file, 3, MIB as u64, 0).await.unwrap().expect("S3 serves parts");
    assert_eq!(info.size, len as u64);
    assert_eq!(parts.len(), 3);
    let mut at = 0u64;
    for p in parts {
        assert_eq!(p.offset, at, "parts are consecutive");
        let got = read_all(p.body).await;
        assert_eq!(got.len() as u64, p.len);
        assert!(got == data[p.offset as usize..(p.offset + p.len) as usize], "part at {} differs", p.offset);
        at += p.len;
    }
    assert_eq!(at, len as u64, "the parts cover the object");
    // Under the size that is worth parts: one part, the whole object.
    let (_, one) = store.get_parts(file, 3, MIB as u64, len as u64 + 1).await.unwrap().unwrap();
    assert_eq!(one.len(), 1);
    assert!(read_all(one.into_iter().next().unwrap().body).await == data);

    let dest = tmp.path().join("restore");
    let path = download_snapshot(&store, file, &dest, Some(&meta)).await.unwrap();
    assert!(std::fs::read(&path).unwrap() == data, "the ranged download differs from the object");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);

    // A digest that does not match is refused, and nothing is left behind.
    let other = tmp.path().join("other");
    let bad = SnapshotMetadata { sha256: "00".repeat(32), ..meta.clone() };
    let err = download_snapshot(&store, file, &other, Some(&bad)).await.unwrap_err();
    assert!(matches!(err, Error::Checksum { .. }), "{err}");
    assert_eq!(dir_len(&other), 0);
}

/// The parts' bytes are hashed once, as they land: the download knows whether the file ends in
/// the SHA-256 of what precedes it (an etcd snapshot's trailer), so that a restore checks the
/// structure without hashing the file again; a file whose trailer does not match is not vouched
/// for (the restore's own check then hashes it and refuses it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_download_in_parts_checks_the_snapshot_trailer_as_the_bytes_land() {
    let server = S3Server::start();
    server.create_bucket("snaps");
    let store = S3Store::connect(&server.config("snaps")).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // An image of whole 512-byte pages, above the parts threshold, and its SHA-256 after it.
    let image = pattern(k3s_snapshot_core::transfer::PARALLEL_MIN as usize + 3 * MIB + 512 * 7, 23);
    let trailer: [u8; 32] = Sha256::digest(&image).into();
    let mut good = image.to_vec();
    good.extend_from_slice(&trailer);
    let mut bad = good.clone();
    bad[image.len() / 2 + 12_345] ^= 0x10;
    for (file, data, want) in [("good-n1-1700000001", &good, Some(trailer)), ("bad-n1-1700000002", &bad, None)] {
        store.put(file, chunked(Bytes::from(data.clone()), MIB), sized(data.len())).await.unwrap();
        for copy in [false, true] {
            let dir = tmp.path().join(format!("{file}-{copy}"));
            let mut scratch =
                s3_backend::download_to_scratch(&store, file, &dir, None, &NoProgress, copy).await.unwrap();
            assert!(std::fs::read(scratch.path()).unwrap() == *data, "{file}: the download differs from the object");
            assert_eq!(scratch.verified_trailer(), want, "{file}");
            // The image copy is handed out only when its bytes hashed to the trailer.
            match scratch.take_image_copy() {
                Some(c) => {
                    assert!(copy && want.is_some(), "{file}: a copy without a verified trailer");
                    assert!(std::fs::read(c.path()).unwrap() == data[..data.len() - 32], "{file}: the copy differs");
                }
                None => assert!(!copy || want.is_none(), "{file}: no image copy"),
            }
            drop(scratch);
            assert_eq!(dir_len(&dir), 0, "{file}: scratch files are removed with their owner");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_download_part_resumes_where_it_broke_when_the_server_restarts() {
    let mut server = S3Server::start();
    server.create_bucket("snaps");
    let store = S3Store::connect(&server.config("snaps")).await.unwrap();
    let data = pattern(80 * MIB, 22);
    store.put("s-n1-2", chunked(data.clone(), MIB), opts()).await.unwrap();
    let (_, parts) = store.get_parts("s-n1-2", 2, MIB as u64, 0).await.unwrap().unwrap();
    let part = parts.into_iter().nth(1).unwrap();
    let (off, n) = (part.offset as usize, part.len as usize);
    let mut body = part.body;
    let mut got = Vec::with_capacity(n);
    got.extend_from_slice(&body.next().await.unwrap().unwrap());
    server.restart();
    while let Some(c) = body.next().await {
        got.extend_from_slice(&c.unwrap_or_else(|e| panic!("the part did not resume: {e}\n{}", server.log())));
    }
    assert_eq!(got.len(), n);
    assert!(got == data[off..off + n], "the resumed part differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_download_parts_of_a_replaced_object_fail_rather_than_mix_versions() {
    let server = S3Server::start();
    server.create_bucket("snaps");
    let store = S3Store::connect(&server.config("snaps")).await.unwrap();
    store.put("s-n1-3", chunked(pattern(2 * MIB, 23), MIB), opts()).await.unwrap();
    let (_, parts) = store.get_parts("s-n1-3", 2, MIB as u64, 0).await.unwrap().unwrap();
    // Another writer replaces the object after the first part's response, before the second's.
    store.put("s-n1-3", chunked(pattern(2 * MIB, 24), MIB), opts()).await.unwrap();
    let mut body = parts.into_iter().nth(1).unwrap().body;
    let mut failed = None;
    while let Some(c) = body.next().await {
        if let Err(e) = c {
            failed = Some(e.to_string());
            break;
        }
    }
    let msg = failed.expect("a part of the replaced object was served");
    assert!(msg.contains("s-n1-3"), "{msg}");
    assert_no_secret(&msg);
}
