//! `etcd-snapshot` with `--s3` against a real S3 server (s3s-fs, SigV4 on) and real etcd.

use std::path::{Path, PathBuf};
use std::process::Command;

use k3s_snapshot_core::store::SnapshotStore;
use tests::support::bin::{self, run};
use tests::support::etcd::{etcdutl_status, Etcd, EtcdVersion};
use tests::support::k3s;
use tests::support::s3::{closed_endpoint, HangingEndpoint, S3Server, TlsProxy, ACCESS_KEY, SECRET_KEY};

/// `etcd-snapshot <args>` against etcd, with a local dir and S3 flags for `endpoint`.
fn snap_s3(etcd: &Etcd, dir: &Path, endpoint: &str, bucket: &str, node: &str, args: &[&str]) -> Command {
    snap_s3_secret(etcd, dir, endpoint, bucket, node, args, SECRET_KEY)
}

fn snap_s3_secret(
    etcd: &Etcd,
    dir: &Path,
    endpoint: &str,
    bucket: &str,
    node: &str,
    args: &[&str],
    secret: &str,
) -> Command {
    let mut c = bin::cmd();
    c.arg("etcd-snapshot")
        .args(args)
        .args(["--etcd-endpoints", &etcd.endpoint, "--node-name", node, "--dir"])
        .arg(dir)
        .args(["--s3", "--s3-endpoint", endpoint, "--s3-bucket", bucket, "--s3-folder", "backups/k3s"])
        .args(["--s3-access-key", ACCESS_KEY, "--s3-secret-key", secret]);
    c
}

fn insecure(c: &mut Command) -> &mut Command {
    c.arg("--s3-insecure")
}

fn local_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.unwrap().file_name().into_string().unwrap()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Objects of the test bucket as s3s-fs stores them (one file per object, under the bucket dir).
fn object_path(s3: &S3Server, bucket: &str, key: &str) -> PathBuf {
    s3.root.join(bucket).join(key)
}

fn assert_no_secret(out: &bin::Run) {
    assert!(
        !out.stdout.contains(SECRET_KEY) && !out.stderr.contains(SECRET_KEY),
        "the secret key leaked:\n{}\n{}",
        out.stdout,
        out.stderr
    );
}

#[test]
fn save_with_s3_uploads_the_same_bytes_with_metadata_and_keeps_the_local_copy() {
    for v in EtcdVersion::ALL {
        save_with_s3_round_trip(v);
    }
}

/// Above S3's single-PUT limit (5 GiB, lowered here to 16 MiB through the test knob, with 5 MiB
/// parts) the save goes up as a multipart upload whose parts stream from the file being written:
/// one pass, no resend, the object byte-identical, restorable with etcd's tool.
#[test]
fn a_snapshot_above_the_single_put_limit_goes_up_in_streamed_parts() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    etcd.load_mib("/registry/big/", 24);
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snapshots");
    let r = run(insecure(&mut snap_s3(&etcd, &dir, &s3.endpoint, "snaps", "n1", &["save"]))
        .env("K3S_SNAPSHOT_LOG", "debug")
        .env("K3S_SNAPSHOT_TEST_S3_STREAM_LIMITS", format!("{}:{}", 16 << 20, 5 << 20)));
    r.assert_ok();
    assert_no_secret(&r);
    assert!(r.stderr.contains("uploaded in streamed parts"), "{}", r.stderr);
    assert!(!r.stderr.contains("uploading the saved file"), "sent twice: {}", r.stderr);
    let names = local_files(&dir);
    assert_eq!(names.len(), 1);
    let local = std::fs::read(dir.join(&names[0])).unwrap();
    let parts = local.len().div_ceil(5 << 20);
    assert!(parts >= 5, "a {} byte snapshot makes {parts} parts", local.len());
    assert!(r.stderr.contains(&format!("parts={parts}")), "{parts} parts expected: {}", r.stderr);
    let object = object_path(&s3, "snaps", &format!("backups/k3s/{}", names[0]));
    let remote = std::fs::read(&object).unwrap();
    assert!(local == remote, "the object must be byte-identical to the local file");
    etcdutl_status(&object);
}

fn save_with_s3_round_trip(v: EtcdVersion) {
    let etcd = Etcd::start(v);
    etcd.put_many("/registry/s3/", 30);
    etcd.load_mib("/registry/big/", 24); // larger than a part: one streamed request, from etcd's size
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snapshots");
    let r =
        run(insecure(&mut snap_s3(&etcd, &dir, &s3.endpoint, "snaps", "n1", &["save"]))
            .env("K3S_SNAPSHOT_LOG", "debug"));
    r.assert_ok();
    assert_no_secret(&r);
    // etcd's announced size was right (the upload went while saving, in one request).
    assert!(r.stderr.contains("uploaded in one streamed request"), "{v:?}: {}", r.stderr);
    assert!(!r.stderr.contains("uploading the saved file"), "{v:?}: {}", r.stderr);
    let names = local_files(&dir);
    assert_eq!(names.len(), 1);
    let local = std::fs::read(dir.join(&names[0])).unwrap();
    let remote = std::fs::read(object_path(&s3, "snaps", &format!("backups/k3s/{}", names[0]))).unwrap();
    assert!(local == remote, "the object must be byte-identical to the local file");
    etcdutl_status(&dir.join(&names[0]));
    // metadata document beside it, and user metadata on the object
    let meta = std::fs::read(object_path(&s3, "snaps", &format!("backups/k3s/.metadata/{}", names[0]))).unwrap();
    // What k3s reads into a map[string]string: a flat object of strings.
    let m: std::collections::BTreeMap<String, String> = serde_json::from_slice(&meta).expect("every value a string");
    assert_eq!(m["nodeName"], "n1");
    assert_eq!(m["size"], local.len().to_string());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let details = rt.block_on(async {
        let mut cfg = s3.config("snaps");
        cfg.folder = "backups/k3s".into();
        let store = s3_backend::S3Store::connect(&cfg).await.unwrap();
        store.head_details(&names[0]).await.unwrap().unwrap()
    });
    assert!(
        details.user_metadata.iter().any(|(k, v)| k.eq_ignore_ascii_case("k3s-node-name") && v == "n1"),
        "{:?}",
        details.user_metadata
    );
    assert_eq!(details.content_type.as_deref(), Some("application/octet-stream"));
}

#[test]
fn ls_delete_and_prune_act_on_s3_with_retention_across_nodes() {
    let etcd = Etcd::start(EtcdVersion::V3_4);
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let tmp = tempfile::tempdir().unwrap();
    let (d1, d2) = (tmp.path().join("n1/snapshots"), tmp.path().join("n2/snapshots"));
    for i in 0..3 {
        run(insecure(&mut snap_s3(&etcd, &d1, &s3.endpoint, "snaps", "n1", &["save"]))).assert_ok();
        run(insecure(&mut snap_s3(&etcd, &d2, &s3.endpoint, "snaps", "n2", &["save"]))).assert_ok();
        if i == 0 {
            run(insecure(&mut snap_s3(&etcd, &d1, &s3.endpoint, "snaps", "n1", &["save", "--name", "other"])))
                .assert_ok();
        }
    }
    // ls --s3 shows local rows and s3:// rows
    let ls = run(insecure(&mut snap_s3(&etcd, &d1, &s3.endpoint, "snaps", "n1", &["ls"])));
    ls.assert_ok();
    let s3_rows: Vec<&str> = ls.stdout.lines().filter(|l| l.contains("s3://snaps/backups/k3s/")).collect();
    assert_eq!(s3_rows.len(), 7, "{}", ls.stdout);
    let file_rows = ls.stdout.lines().filter(|l| l.contains("file://")).count();
    assert_eq!(file_rows, 4, "{}", ls.stdout);

    // prune --s3 keeps the 2 newest on-demand snapshots across both nodes in S3
    let mut all_on_demand: Vec<(i64, String)> = s3_rows
        .iter()
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .filter(|n| n.starts_with("on-demand-"))
        .map(|n| (n.rsplit('-').next().unwrap().parse().unwrap(), n))
        .collect();
    all_on_demand.sort();
    let r = run(insecure(&mut snap_s3(
        &etcd,
        &d1,
        &s3.endpoint,
        "snaps",
        "n1",
        &["prune", "--s3-retention", "2", "--snapshot-retention", "1"],
    )));
    r.assert_ok();
    let folder = s3.root.join("snaps/backups/k3s");
    let left = local_files(&folder);
    let on_demand_left: Vec<&String> = left.iter().filter(|n| n.starts_with("on-demand-")).collect();
    assert_eq!(on_demand_left.len(), 2, "{left:?}");
    let newest_ts = all_on_demand.iter().map(|(t, _)| *t).max().unwrap();
    assert!(on_demand_left.iter().any(|n| n.ends_with(&newest_ts.to_string())), "the newest is kept: {left:?}");
    assert!(left.iter().any(|n| n.starts_with("other-")), "other prefixes are untouched: {left:?}");
    // local retention applied to n1's dir only
    assert_eq!(local_files(&d1).iter().filter(|n| n.starts_with("on-demand-")).count(), 1);
    assert_eq!(local_files(&d2).len(), 3);

    // delete --s3 removes the object, its metadata and the local file
    let victim = on_demand_left[0].clone();
    let r = run(insecure(&mut snap_s3(&etcd, &d2, &s3.endpoint, "snaps", "n2", &["delete", &victim])));
    r.assert_ok();
    assert!(!folder.join(&victim).exists());
    assert!(!folder.join(".metadata").join(&victim).exists());
}

fn assert_fault(etcd: &Etcd, endpoint: &str, bucket: &str, extra: &[&str], needle: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snapshots");
    let mut c = snap_s3(etcd, &dir, endpoint, bucket, "n1", &["save"]);
    c.args(extra);
    let r = run(&mut c);
    r.assert_fails_with(needle);
    assert_eq!(r.code, Some(1));
    assert_no_secret(&r);
    assert!(r.stderr.contains("saved locally"), "says the local copy is kept: {}", r.stderr);
    let names = local_files(&dir);
    assert_eq!(names.len(), 1, "the local snapshot is kept: {names:?}");
    etcdutl_status(&dir.join(&names[0]));
}

#[test]
fn s3_faults_are_clear_errors_and_the_local_snapshot_is_kept() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    assert_fault(&etcd, &s3.endpoint, "no-such-bucket", &["--s3-insecure"], "no-such-bucket");
    let wrong = tempfile::tempdir().unwrap();
    let mut c =
        snap_s3_secret(&etcd, &wrong.path().join("s"), &s3.endpoint, "snaps", "n1", &["save"], "wrong-secret-key-123");
    c.arg("--s3-insecure");
    let r = run(&mut c);
    r.assert_fails_with("saved locally");
    assert!(
        r.stderr.to_lowercase().contains("access") || r.stderr.to_lowercase().contains("signature"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("wrong-secret-key-123"), "{}", r.stderr);
    assert_fault(&etcd, &closed_endpoint(), "snaps", &["--s3-insecure"], "saved locally");
    let hang = HangingEndpoint::start();
    assert_fault(&etcd, &hang.endpoint, "snaps", &["--s3-insecure", "--s3-timeout", "2s"], "saved locally");
    let tls = TlsProxy::start(&s3);
    assert_fault(&etcd, &tls.endpoint, "snaps", &[], "certificate");
}

#[test]
fn s3_over_tls_with_the_endpoint_ca_or_skip_verify_works() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let tls = TlsProxy::start(&s3);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snapshots");
    let mut c = snap_s3(&etcd, &dir, &tls.endpoint, "snaps", "n1", &["save"]);
    c.arg("--s3-endpoint-ca").arg(&tls.ca_file);
    run(&mut c).assert_ok();
    let mut c = snap_s3(&etcd, &dir, &tls.endpoint, "snaps", "n1", &["save", "--s3-skip-ssl-verify"]);
    run(&mut c).assert_ok();
    let objects: Vec<String> =
        local_files(&s3.root.join("snaps/backups/k3s")).into_iter().filter(|f| !f.starts_with('.')).collect();
    assert_eq!(objects.len(), 2, "{objects:?}");
}

#[test]
fn s3_killed_during_a_save_leaves_no_object_and_keeps_the_local_snapshot() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    etcd.load_mib("/big/", 200);
    let mut s3 = S3Server::start();
    s3.create_bucket("snaps");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snapshots");
    let mut c = snap_s3(&etcd, &dir, &s3.endpoint, "snaps", "n1", &["save", "--s3-insecure"]);
    let mut child = c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // Kill S3 once the local .part is growing: the multipart upload is under way.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !local_files(&dir)
        .iter()
        .any(|f| f.ends_with(".part") && std::fs::metadata(dir.join(f)).map(|m| m.len() > 16 << 20).unwrap_or(false))
    {
        assert!(std::time::Instant::now() < deadline, "the save never started");
        if child.try_wait().unwrap().is_some() {
            let r: bin::Run = child.wait_with_output().unwrap().into();
            panic!("the save ended before S3 could be killed: {}", r.stderr);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    s3.kill();
    let r: bin::Run = child.wait_with_output().unwrap().into();
    r.assert_fails_with("saved locally");
    assert_no_secret(&r);
    let names = local_files(&dir);
    assert_eq!(names.len(), 1, "{names:?}");
    etcdutl_status(&dir.join(&names[0]));
    s3.restart();
    assert!(!object_path(&s3, "snaps", &names[0]).exists(), "no complete object under the name");
}

/// `etcd-snapshot <args> --s3 ...` for a bucket `snaps` under folder `backups/k3s`, plain http.
fn snap_k3s_bucket(etcd: &Etcd, dir: &Path, s3: &S3Server, args: &[&str]) -> bin::Run {
    run(insecure(&mut snap_s3(etcd, dir, &s3.endpoint, "snaps", "n1", args)))
}

#[test]
fn a_bucket_k3s_wrote_lists_like_k3s_and_its_snapshots_check_out() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    etcd.put_many("/registry/k3s/", 10);
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n1/snapshots");
    // Two snapshots k3s uploaded from node k3s-a: one with its extra metadata, one without (k3s
    // writes none when its extra-metadata ConfigMap is empty).
    let now = chrono::Utc::now().timestamp();
    let (with_md, bare) = (format!("etcd-snapshot-k3s-a-{}", now - 120), format!("etcd-snapshot-k3s-a-{}", now - 60));
    let k3s_dir = tmp.path().join("k3s-a/snapshots");
    for (name, md) in [(&with_md, Some(k3s::EXTRA_METADATA)), (&bare, None)] {
        let f = k3s::snapshot(&etcd, &k3s_dir, name);
        k3s::upload(&s3, "snaps", "backups/k3s", &f, "k3s-a", md);
    }
    snap_k3s_bucket(&etcd, &dir, &s3, &["save"]).assert_ok();
    let ours = local_files(&dir).remove(0);

    let table = snap_k3s_bucket(&etcd, &dir, &s3, &["ls"]);
    table.assert_ok();
    for n in [&with_md, &bare, &ours] {
        let row = format!("s3://snaps/backups/k3s/{n}");
        assert_eq!(
            table.stdout.lines().filter(|l| l.split_whitespace().nth(1) == Some(row.as_str())).count(),
            1,
            "{}",
            table.stdout
        );
    }

    let r = snap_k3s_bucket(&etcd, &dir, &s3, &["ls", "-o", "json"]);
    r.assert_ok();
    assert_no_secret(&r);
    assert!(!r.stderr.contains("unreadable"), "{}", r.stderr);
    let list: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let s3_item = |n: &str| {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["spec"]["snapshotName"] == n && i["spec"].get("s3").is_some())
            .cloned()
            .unwrap()
    };
    let it = s3_item(&with_md);
    assert_eq!(it["metadata"]["name"], format!("s3-{with_md}"));
    assert_eq!(it["metadata"]["labels"]["etcd.k3s.cattle.io/snapshot-storage-node"], "s3");
    assert_eq!(it["metadata"]["annotations"]["etcd.k3s.cattle.io/snapshot-token-hash"], k3s::TOKEN_HASH);
    assert_eq!(it["spec"]["nodeName"], "k3s-a", "from the object's K3s-Node-Name");
    assert_eq!(it["spec"]["location"], format!("s3://snaps/backups/k3s/{with_md}"));
    assert_eq!(it["spec"]["metadata"], serde_json::from_slice::<serde_json::Value>(k3s::EXTRA_METADATA).unwrap());
    assert_eq!(
        it["spec"]["s3"],
        serde_json::json!({"endpoint": s3.endpoint, "bucket": "snaps", "region": "us-east-1", "prefix": "backups/k3s", "insecure": true})
    );
    assert!(s3_item(&bare)["spec"].get("metadata").is_none(), "{}", s3_item(&bare));
    let mine = s3_item(&ours);
    assert_eq!(mine["spec"]["nodeName"], "n1");
    assert_eq!(mine["spec"]["metadata"]["sha256"].as_str().map(str::len), Some(64));

    // No sha256 is known for k3s's objects: `status --s3` downloads them and the trailer decides.
    for n in [&with_md, &bare] {
        let r = snap_k3s_bucket(&etcd, &dir, &s3, &["status", n]);
        r.assert_ok();
        assert!(r.stdout.contains("verified"), "{n}: {}", r.stdout);
    }
    // ... so a damaged k3s object is caught by it.
    let obj = object_path(&s3, "snaps", &format!("backups/k3s/{bare}"));
    let mut b = std::fs::read(&obj).unwrap();
    b[4096] ^= 0xff;
    std::fs::write(&obj, &b).unwrap();
    snap_k3s_bucket(&etcd, &dir, &s3, &["status", &bare]).assert_fails_with("failed its sha256 integrity check");
}

#[test]
fn our_typed_metadata_of_earlier_versions_still_guards_s3_downloads() {
    let etcd = Etcd::start(EtcdVersion::V3_4);
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snapshots");
    snap_k3s_bucket(&etcd, &dir, &s3, &["save"]).assert_ok();
    let name = local_files(&dir).remove(0);
    let bytes = std::fs::read(dir.join(&name)).unwrap();
    let typed = |sha256: String| {
        serde_json::json!({
            "name": name, "nodeName": "n1", "size": bytes.len(), "createdAt": "2024-05-01T10:00:00Z",
            "compressed": false, "sha256": sha256, "etcdRevision": 9,
        })
    };
    let put_doc = |doc: serde_json::Value| {
        tests::support::server::block_on(async {
            let mut cfg = s3.config("snaps");
            cfg.folder = "backups/k3s".into();
            let store = s3_backend::S3Store::connect(&cfg).await.unwrap();
            let body = bytes::Bytes::from(serde_json::to_vec(&doc).unwrap());
            let stream = futures::StreamExt::boxed(futures::stream::once(async move { Ok(body) }));
            store.put(&format!(".metadata/{name}"), stream, Default::default()).await.unwrap();
        })
    };
    use sha2::Digest;
    put_doc(typed(hex::encode(sha2::Sha256::digest(&bytes))));
    let r = snap_k3s_bucket(&etcd, &dir, &s3, &["status", &name]);
    r.assert_ok();
    // A typed document whose sha256 does not match: the download is refused, so it was read.
    put_doc(typed("00".repeat(32)));
    let r = snap_k3s_bucket(&etcd, &dir, &s3, &["status", &name]);
    r.assert_fails_with("00000000");
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
}

#[test]
fn s3_proxy_none_turns_off_the_proxies_of_the_environment() {
    let etcd = Etcd::start(EtcdVersion::V3_5);
    etcd.put("/registry/p", "v");
    let s3 = S3Server::start();
    s3.create_bucket("proxied");
    let tmp = tempfile::tempdir().unwrap();
    let dead_proxy = format!("http://{}", closed_endpoint());
    let save = |extra: &[&str]| {
        let mut c = snap_s3(&etcd, &tmp.path().join("snapshots"), &s3.endpoint, "proxied", "n1", &["save"]);
        insecure(&mut c).args(extra).args(["--s3-timeout", "10s"]);
        for k in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"] {
            c.env(k, &dead_proxy);
        }
        c.env_remove("NO_PROXY").env_remove("no_proxy");
        run(&mut c)
    };
    // The environment's proxy is used by default (and here it is dead)...
    let r = save(&[]);
    assert!(!r.ok(), "the environment's proxy was not used: {}", r.stderr);
    assert!(r.stderr.contains("not uploaded") && !r.stderr.contains("bucket name"), "{}", r.stderr);
    // ...and `none` turns it off.
    save(&["--s3-proxy", "none"]).assert_ok();
}
