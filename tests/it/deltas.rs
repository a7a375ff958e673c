//! Continuous backup on etcd 3.5.1 and 3.4.23: a server ships delta segments to S3; a fresh node
//! with only the S3 settings restores `latest` with every write, or exactly the keyspace of a
//! chosen revision; a gap (the server down while etcd compacted) starts a new chain.

use std::time::Duration;

use tests::support::bin;
use tests::support::etcd::EtcdVersion;
use tests::support::s3::S3Server;
use tests::support::server::{
    all_keys, assert_reset_done, block_on, connect, delete, put, wait_until, DataDir, Server,
};

tests::on_both_versions!(
    a_fresh_node_restores_every_shipped_write_from_s3,
    a_compaction_while_the_server_was_down_starts_a_new_chain,
);

fn metric(s: &Server, name: &str) -> f64 {
    let text =
        block_on(async { s.http().get(format!("{}/metrics", s.api())).send().await.unwrap().text().await.unwrap() });
    text.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse::<f64>().unwrap())).unwrap_or(0.0)
}

fn revision(dd: &DataDir) -> i64 {
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

fn wait_shipped(s: &Server, rev: i64) {
    wait_until(&format!("revision {rev} to be shipped"), Duration::from_secs(60), || {
        metric(s, "k3s_snapshot_delta_shipped_revision ") >= rev as f64
            && metric(s, "k3s_snapshot_delta_upload_failures_total ") == 0.0
    });
}

/// Waits until the server follows etcd after its chain's full snapshot, so that later writes
/// travel in delta segments.
fn wait_following(s: &Server) {
    wait_until("the chain's snapshot", Duration::from_secs(60), || {
        metric(s, "k3s_snapshot_delta_shipped_revision ") >= 1.0
    });
}

fn shipping_flags(s3: &S3Server) -> Vec<String> {
    let mut f = s3.server_flags("snaps");
    f.extend(["--etcd-disable-snapshots".into(), "--etcd-snapshot-delta-interval=1s".into()]);
    f
}

/// A fresh node's reset from S3: the S3 flags, the token, `latest`, then `extra`.
fn restore_flags(s3: &S3Server, token: &str, extra: &[String]) -> Vec<String> {
    let mut f = s3.server_flags("snaps");
    f.extend([format!("--token={token}"), "--cluster-reset".into(), "--cluster-reset-restore-path=latest".into()]);
    f.extend_from_slice(extra);
    f
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// S3 with a bucket, and a server shipping deltas to it that already follows etcd.
fn start_shipping(v: EtcdVersion) -> (S3Server, DataDir, Vec<String>, Server) {
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let dd = DataDir::new(v);
    let flags = shipping_flags(&s3);
    let s = dd.start(&strs(&flags));
    wait_following(&s);
    (s3, dd, flags, s)
}

fn a_fresh_node_restores_every_shipped_write_from_s3(v: EtcdVersion) {
    let (s3, dd, _, s) = start_shipping(v);
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
    let (s3, dd, flags, s) = start_shipping(v);
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
