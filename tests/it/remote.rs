//! `etcd-snapshot save|ls|delete|prune --etcd-server URL --etcd-token T`: a running server does
//! the work through its supervisor API. The CLI runs with an empty data dir of its own, so it has
//! no etcd certificate and no S3 credential: whatever it achieves, the server did.

use tests::support::bin::{self, Run};
use tests::support::etcd::EtcdVersion;
use tests::support::s3::S3Server;
use tests::support::server::{files, put, DataDir, Server};

/// `k3s-snapshot etcd-snapshot <args> --etcd-server <server> --etcd-token <token>` from a
/// machine with nothing of the cluster (its own empty data dir).
pub(crate) fn remote(server: &Server, token: &str, args: &[&str]) -> Run {
    let elsewhere = tempfile::tempdir().unwrap();
    let mut c = bin::cmd();
    c.arg("etcd-snapshot")
        .args(args)
        .arg(format!("--data-dir={}", elsewhere.path().display()))
        .arg(format!("--etcd-server={}", server.api()))
        .env("K3S_ETCD_TOKEN", token);
    bin::run(&mut c)
}

fn s3_server_flags(s3: &S3Server) -> Vec<String> {
    let mut flags = s3.server_flags("snaps");
    flags.push("--etcd-disable-snapshots".into());
    flags
}

#[test]
fn save_ls_delete_and_prune_through_the_server_with_its_own_etcd_and_s3() {
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let dd = DataDir::new(EtcdVersion::V3_5);
    let flags = s3_server_flags(&s3);
    let s = dd.start(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    put(&dd, &[("k", "v")]);
    let token = dd.token();

    let saved = remote(&s, &token, &["save", "--name=remote"]);
    saved.assert_ok();
    let local: Vec<String> = files(&dd.snapshots()).into_iter().filter(|f| f.starts_with("remote-node-a-")).collect();
    assert_eq!(local.len(), 1, "the server saved one snapshot in its own dir: {:?}", files(&dd.snapshots()));
    let name = &local[0];
    assert!(saved.stdout.contains(&format!("Snapshot {name} saved to ")), "{}", saved.stdout);
    assert!(saved.stdout.contains(&format!("Snapshot {name} uploaded to s3://snaps/{name}")), "{}", saved.stdout);
    assert!(s3.root.join("snaps").join(name).is_file(), "the server uploaded with its own S3 settings");

    let ls = remote(&s, &token, &["ls"]);
    ls.assert_ok();
    let rows: Vec<&str> = ls.stdout.lines().filter(|l| l.starts_with(name.as_str())).collect();
    assert_eq!(rows.len(), 2, "a local and an s3 row:\n{}", ls.stdout);
    assert!(ls.stdout.starts_with("Name "), "{}", ls.stdout);
    let size = std::fs::metadata(dd.snapshots().join(name)).unwrap().len().to_string();
    assert!(rows.iter().all(|r| r.split_whitespace().nth(2) == Some(size.as_str())), "sizes in bytes: {rows:?}");

    let json = remote(&s, &token, &["ls", "-o", "json"]);
    json.assert_ok();
    let list: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(list["kind"], "List");
    let items = list["items"].as_array().unwrap();
    let ours: Vec<_> = items.iter().filter(|i| i["spec"]["snapshotName"] == name.as_str()).collect();
    assert_eq!(ours.len(), 2);
    assert!(ours.iter().any(|i| i["spec"]["nodeName"] == "node-a" && i["spec"]["s3"].is_null()));
    assert!(ours.iter().any(|i| i["spec"]["s3"]["bucket"] == "snaps"));
    assert!(!json.stdout.contains(tests::support::s3::SECRET_KEY), "no S3 secret in the list");

    // Two more, then prune to one: the two oldest go, locally (--snapshot-retention) and in S3
    // (the server's --etcd-s3-retention is 5, so S3 keeps all three).
    for _ in 0..2 {
        std::thread::sleep(std::time::Duration::from_millis(1100)); // names carry the second
        remote(&s, &token, &["save", "--name=remote"]).assert_ok();
    }
    let pruned = remote(&s, &token, &["prune", "--name=remote", "--snapshot-retention=1"]);
    pruned.assert_ok();
    assert_eq!(pruned.stdout.lines().filter(|l| l.starts_with("Pruned ")).count(), 2, "{}", pruned.stdout);
    let left: Vec<String> = files(&dd.snapshots()).into_iter().filter(|f| f.starts_with("remote-")).collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(!left.contains(name), "the oldest was pruned");

    let newest = left[0].clone();
    let deleted = remote(&s, &token, &["delete", &newest, "not-there-1"]);
    deleted.assert_ok();
    assert!(deleted.stdout.contains("Deleted "), "{}", deleted.stdout);
    assert!(deleted.stderr.contains("not-there-1 not found"), "a missing name is a warning: {}", deleted.stderr);
    assert!(!dd.snapshots().join(&newest).exists());
    assert!(!s3.root.join("snaps").join(&newest).exists(), "deleted in S3 too");
    s.stop();
}

#[test]
fn the_server_refuses_a_wrong_token_an_unverifiable_server_and_s3_it_does_not_have() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    let full = dd.token();
    let (head, secret) = full.split_once("::server:").unwrap();

    let wrong = format!("{head}::server:not-the-secret");
    remote(&s, &wrong, &["save"]).assert_fails_with("refused the token (401)");

    // A bare secret cannot verify the server's certificate from elsewhere: refused before the
    // token is sent (the server logs no refused request).
    let bare = remote(&s, secret, &["ls"]);
    bare.assert_fails_with("full K10");
    assert!(!bare.stderr.contains(secret), "the secret is never echoed: {}", bare.stderr);

    // A token whose CA hash is another cluster's.
    let other = format!("K10{}::server:{secret}", "0".repeat(64));
    remote(&s, &other, &["ls"]).assert_fails_with("but the token expects");

    // S3 asked of a server without S3: refused, nothing saved.
    remote(&s, &full, &["save", "--etcd-s3"]).assert_fails_with("no S3 configured");
    assert!(files(&dd.snapshots()).iter().all(|f| !f.starts_with("on-demand-")), "{:?}", files(&dd.snapshots()));

    // A directory in the request is ignored with a warning: the server saves to its own.
    let other_dir = tempfile::tempdir().unwrap();
    let r = remote(&s, &full, &["save", &format!("--dir={}", other_dir.path().display())]);
    r.assert_ok();
    assert!(r.stderr.contains("is ignored: this server uses its own"), "{}", r.stderr);
    assert!(files(other_dir.path()).is_empty());
    assert_eq!(files(&dd.snapshots()).iter().filter(|f| f.starts_with("on-demand-node-a-")).count(), 1);

    // A bare secret works where the cluster CA is at hand: on the server, with its data dir.
    let mut c = bin::cmd();
    c.args(["etcd-snapshot", "ls"])
        .arg(format!("--data-dir={}", dd.path().display()))
        .arg(format!("--etcd-server={}", s.api()))
        .arg(format!("--etcd-token={secret}"));
    let on_server = bin::run(&mut c);
    on_server.assert_ok();
    assert!(on_server.stdout.contains("on-demand-node-a-"), "{}", on_server.stdout);
    s.stop();
}
