//! Continuous backup on etcd 3.5.1 and 3.4.23: a server ships delta segments to S3; a fresh node
//! with only the S3 settings restores `latest` with every write, or exactly the keyspace of a
//! chosen revision; a gap (the server down while etcd compacted) starts a new chain. With
//! `--etcd-snapshot-encryption-recipients-file` segments exist only as age files (`.seg.age`) that
//! the stock `age` CLI opens, and a restore needs the identity; `ls`, local and through
//! `--etcd-server`, shows the chains.

use std::time::Duration;

use std::path::Path;

use tests::support::age::{self, AgeKey};
use tests::support::bin;
use tests::support::etcd::EtcdVersion;
use tests::support::s3::S3Server;
use tests::support::server::{
    all_keys, assert_reset_done, block_on, connect, delete, files, put, wait_until, DataDir, Server,
};

tests::on_both_versions!(
    a_fresh_node_restores_every_shipped_write_from_s3,
    a_compaction_while_the_server_was_down_starts_a_new_chain,
    encrypted_segments_ship_only_as_age_files_and_restore_with_the_identity,
);

pub(crate) fn metric(s: &Server, name: &str) -> f64 {
    let text =
        block_on(async { s.http().get(format!("{}/metrics", s.api())).send().await.unwrap().text().await.unwrap() });
    text.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse::<f64>().unwrap())).unwrap_or(0.0)
}

pub(crate) fn revision(dd: &DataDir) -> i64 {
    block_on(async { connect(dd).await.client.get("x", None).await.unwrap().header().unwrap().revision() })
}

/// Every key and value at revision `rev` (what `etcdctl get --rev` shows).
fn keys_at(dd: &DataDir, rev: i64) -> Vec<(String, String)> {
    block_on(async {
        let mut c = connect(dd).await;
        let opts = etcd_client::GetOptions::new().with_all_keys().with_revision(rev);
        let r = c.client.get("", Some(opts)).await.unwrap();
        r.kvs().iter().map(|kv| (kv.key_str().unwrap().to_string(), kv.value_str().unwrap().to_string())).collect()
    })
}

pub(crate) fn wait_shipped(s: &Server, rev: i64) {
    wait_until(&format!("revision {rev} to be shipped"), Duration::from_secs(60), || {
        metric(s, "k3s_snapshot_delta_shipped_revision ") >= rev as f64
            && metric(s, "k3s_snapshot_delta_upload_failures_total ") == 0.0
    });
}

/// Waits until the server follows etcd after its chain's full snapshot, so that later writes
/// travel in delta segments.
pub(crate) fn wait_following(s: &Server) {
    wait_until("the chain's snapshot", Duration::from_secs(60), || {
        metric(s, "k3s_snapshot_delta_shipped_revision ") >= 1.0
    });
}

pub(crate) fn shipping_flags(s3: &S3Server) -> Vec<String> {
    let mut f = s3.server_flags("snaps");
    f.extend(["--etcd-disable-snapshots".into(), "--etcd-snapshot-delta-interval=1s".into()]);
    f
}

/// A fresh node's reset from S3: the S3 flags, the token, `latest`, then `extra`.
pub(crate) fn restore_flags(s3: &S3Server, token: &str, extra: &[String]) -> Vec<String> {
    let mut f = s3.server_flags("snaps");
    f.extend([format!("--token={token}"), "--cluster-reset".into(), "--cluster-reset-restore-path=latest".into()]);
    f.extend_from_slice(extra);
    f
}

pub(crate) fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// S3 with a bucket, and a server shipping deltas to it (with `extra` flags) that already
/// follows etcd.
fn start_shipping(v: EtcdVersion, extra: &[String]) -> (S3Server, DataDir, Vec<String>, Server) {
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let dd = DataDir::new(v);
    let mut flags = shipping_flags(&s3);
    flags.extend_from_slice(extra);
    let s = dd.start(&strs(&flags));
    wait_following(&s);
    (s3, dd, flags, s)
}

fn a_fresh_node_restores_every_shipped_write_from_s3(v: EtcdVersion) {
    let (s3, dd, _, s) = start_shipping(v, &[]);
    for i in 0..30 {
        put(&dd, &[(&format!("/registry/k{i:02}"), &i.to_string())]);
    }
    let mid = revision(&dd);
    let at_mid = keys_at(&dd, mid);
    delete(&dd, "/registry/k03");
    put(&dd, &[("/registry/k04", "changed")]);
    // A key on a lease granted after the chain's snapshot.
    let lease = block_on(async {
        let mut c = connect(&dd).await.client;
        let l = c.lease_grant(600, None).await.unwrap().id();
        c.put("/registry/leased", "l", Some(etcd_client::PutOptions::new().with_lease(l))).await.unwrap();
        l
    });
    let last = revision(&dd);
    let want = all_keys(&dd);
    wait_shipped(&s, last);
    assert!(metric(&s, "k3s_snapshot_delta_segments_total ") >= 1.0);
    s.stop();

    // Everything on the node is lost; a new node knows only S3 and the token's secret (its CA
    // is new: the old cluster's CA went with the node).
    let token = dd.token().split_once("::server:").map(|(_, s)| s.to_string()).unwrap();
    let fresh = DataDir::new(v);
    let r = fresh.run(&strs(&restore_flags(&s3, &token, &["--cluster-reset-restore-deltas".into()])));
    assert_reset_done(&r, &fresh);
    assert!(r.stderr.contains("replayed the delta segments"), "{}", r.stderr);
    let s2 = fresh.start(&["--etcd-disable-snapshots", &format!("--token={token}")]);
    assert_eq!(all_keys(&fresh), want, "every write up to the loss, deletes included");
    assert!(revision(&fresh) >= last + 1_000_000_000, "the replayed revision is bumped");
    let ttl = block_on(async { connect(&fresh).await.client.lease_time_to_live(lease, None).await.unwrap().ttl() });
    assert!(ttl > 0 && ttl <= 60, "a lease granted after the snapshot is granted again with a short TTL: {ttl}");
    s2.stop();

    // Exactly the keyspace of revision `mid`, and its revision (no bump asked).
    let exact = DataDir::new(v);
    let flags = restore_flags(
        &s3,
        &token,
        &[format!("--cluster-reset-restore-to-revision={mid}"), "--cluster-reset-restore-bump-revision=0".into()],
    );
    assert_reset_done(&exact.run(&strs(&flags)), &exact);
    let s3_ = exact.start(&["--etcd-disable-snapshots", &format!("--token={token}")]);
    assert_eq!(all_keys(&exact), at_mid);
    assert_eq!(revision(&exact), mid);
    s3_.stop();

    // A revision beyond what was shipped is refused, with nothing changed.
    let beyond = DataDir::new(v);
    let flags = restore_flags(&s3, &token, &[format!("--cluster-reset-restore-to-revision={}", last + 100)]);
    beyond.run(&strs(&flags)).assert_fails_with("reach only revision");
    assert!(!beyond.db().join("etcd/member").exists());
}

fn a_compaction_while_the_server_was_down_starts_a_new_chain(v: EtcdVersion) {
    let (s3, dd, flags, s) = start_shipping(v, &[]);
    put(&dd, &[("/a", "1"), ("/b", "2")]);
    wait_shipped(&s, revision(&dd));
    s.stop();

    // Down: etcd (started alone, as the server would) moves on and compacts.
    let s = dd.start(&["--etcd-disable-snapshots"]);
    put(&dd, &[("/c", "3"), ("/d", "4")]);
    let now = revision(&dd);
    block_on(async { connect(&dd).await.client.compact(now, None).await.unwrap() });
    s.stop();

    let s = dd.start(&strs(&flags));
    wait_until("a chain break", Duration::from_secs(60), || {
        metric(&s, "k3s_snapshot_delta_chain_breaks_total ") >= 1.0
    });
    // The break's new base is taken after the break is counted: a write before it is in that
    // base, and leaves the new chain nothing to ship (this raced once in a full run).
    wait_until("the new chain's base", Duration::from_secs(60), || {
        files(&dd.snapshots())
            .iter()
            .filter(|f| f.starts_with("chain-base-") && k3s_snapshot_core::name::parse(f).is_some())
            .count()
            >= 2
    });
    put(&dd, &[("/e", "5")]);
    let last = revision(&dd);
    wait_shipped(&s, last);
    let want = all_keys(&dd);
    let log = s.log_text();
    s.stop();

    let mut c = bin::cmd();
    c.args(["etcd-snapshot", "ls"]).arg(format!("--data-dir={}", dd.path().display()));
    for f in s3.server_flags("snaps") {
        c.arg(f);
    }
    let ls = bin::run(&mut c);
    ls.assert_ok();
    let chains = ls.stdout.lines().filter(|l| l.starts_with("Delta chain in s3")).count();
    assert_eq!(chains, 2, "the gap splits the chain in two:\n{}\nserver log:\n{log}", ls.stdout);

    let fresh = DataDir::new(v);
    let mut restore = s3.server_flags("snaps");
    restore.extend([
        "--cluster-reset".into(),
        "--cluster-reset-restore-path=latest".into(),
        "--cluster-reset-restore-deltas".into(),
    ]);
    assert_reset_done(&fresh.run(&strs(&restore)), &fresh);
    let s = fresh.start(&["--etcd-disable-snapshots"]);
    assert_eq!(all_keys(&fresh), want, "the new chain's snapshot plus its deltas");
    s.stop();
}

/// The delta segments among `dir`'s files.
pub(crate) fn segment_files(dir: &Path) -> Vec<String> {
    files(dir).into_iter().filter(|f| f.starts_with("delta-")).collect()
}

pub(crate) fn recipients_flag(key: &AgeKey) -> String {
    format!("--etcd-snapshot-encryption-recipients-file={}", key.recipients.display())
}

pub(crate) fn identity_flag(key: &AgeKey) -> String {
    format!("--etcd-snapshot-encryption-identity-file={}", key.identity.display())
}

fn encrypted_segments_ship_only_as_age_files_and_restore_with_the_identity(v: EtcdVersion) {
    let keys = tempfile::tempdir().unwrap();
    let key = age::keygen(keys.path(), "ops");
    let (s3, dd, _, s) = start_shipping(v, &[recipients_flag(&key)]);
    const MARK: &str = "plaintext-that-must-not-reach-a-disk";
    for i in 0..20 {
        put(&dd, &[(&format!("/registry/secrets/s{i:02}"), &format!("{MARK}-{i}"))]);
    }
    delete(&dd, "/registry/secrets/s05");
    let last = revision(&dd);
    let want = all_keys(&dd);
    wait_shipped(&s, last);

    // Locally and in S3: `.seg.age` files only, no plaintext of a value anywhere, nothing open.
    let bucket = s3.root.join("snaps");
    for dir in [dd.snapshots(), bucket.clone()] {
        let segs = segment_files(&dir);
        assert!(!segs.is_empty(), "no segment in {}: {:?}", dir.display(), files(&dir));
        assert!(segs.iter().all(|f| f.ends_with(".seg.age")), "{}: {segs:?}", dir.display());
        for f in files(&dir) {
            assert!(!f.ends_with(".part"), "{f} left in {}", dir.display());
            let p = dir.join(&f);
            if p.is_file() {
                let bytes = std::fs::read(&p).unwrap();
                assert!(!bytes.windows(MARK.len()).any(|w| w == MARK.as_bytes()), "plaintext in {}", p.display());
            }
        }
    }
    // The stock age CLI opens a shipped segment (as S3 holds it) into the plain segment format.
    let seg = bucket.join(&segment_files(&bucket)[0]);
    let out = keys.path().join("segment");
    age::decrypt(&key, &seg, &out);
    let plain = std::fs::read(&out).unwrap();
    assert!(plain.starts_with(b"K3SDLT01"), "{:?}", &plain[..plain.len().min(16)]);
    assert!(plain.windows(MARK.len()).any(|w| w == MARK.as_bytes()), "the decrypted segment holds the writes");

    // `ls`, locally and through the server's API, shows the chains, marked encrypted; `-o json`
    // stays k3s's document.
    let mut c = bin::cmd();
    c.args(["etcd-snapshot", "ls"]).arg(format!("--data-dir={}", dd.path().display()));
    c.args(s3.server_flags("snaps"));
    let local = bin::run(&mut c);
    local.assert_ok();
    let chain_lines = |out: &str| -> Vec<String> {
        out.lines().filter(|l| l.starts_with("Delta chain in ")).map(str::to_string).collect()
    };
    let local_chains = chain_lines(&local.stdout);
    assert_eq!(local_chains.len(), 2, "one chain locally, one in S3:\n{}", local.stdout);
    assert!(local_chains.iter().all(|l| l.ends_with(", encrypted")), "{local_chains:?}");
    assert!(local_chains[1].starts_with("Delta chain in s3://"), "{local_chains:?}");
    let remote = crate::remote::remote(&s, &dd.token(), &["ls"]);
    remote.assert_ok();
    assert_eq!(chain_lines(&remote.stdout), local_chains, "the server's ls shows the same chains:\n{}", remote.stdout);
    let json = crate::remote::remote(&s, &dd.token(), &["ls", "-o", "json"]);
    json.assert_ok();
    let doc: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let top: Vec<&String> = doc.as_object().unwrap().keys().collect();
    assert_eq!(top, ["apiVersion", "items", "kind", "metadata"], "k3s's List, no extra field");
    s.stop();

    // A fresh node with the S3 settings and the identity replays every write.
    let token = dd.token().split_once("::server:").map(|(_, s)| s.to_string()).unwrap();
    let fresh = DataDir::new(v);
    let r =
        fresh.run(&strs(&restore_flags(&s3, &token, &["--cluster-reset-restore-deltas".into(), identity_flag(&key)])));
    assert_reset_done(&r, &fresh);
    assert!(r.stderr.contains("replayed the delta segments"), "{}", r.stderr);
    assert!(!r.stderr.contains(&key.secret()), "the private key leaked");
    let snaps = files(&fresh.snapshots());
    assert!(!snaps.iter().any(|f| f.starts_with("delta-")), "no segment, plain or not, kept: {snaps:?}");
    let s2 = fresh.start(&["--etcd-disable-snapshots", &format!("--token={token}")]);
    assert_eq!(all_keys(&fresh), want, "every write, the delete included");
    s2.stop();
}
