//! Three real servers on 127.0.0.1, 127.0.0.2 and 127.0.0.3, each with its own data dir, on etcd
//! 3.5.1 and 3.4.23: joining with `--server`/`--token` (and the refusals that join nothing), the
//! user's HA restore from a local snapshot and from S3, a restarted member that keeps its
//! membership, a cluster that loses one server and keeps working, and a joiner that crashes
//! half-way through its join and joins on its next start.

use std::time::Duration;

use etcd_client::GetOptions;
use tests::support::bin;
use tests::support::etcd::EtcdVersion;
use tests::support::s3::{S3Server, SECRET_KEY};
use tests::support::server::{block_on, connect, delete, files, put, wait_until, DataDir, Server};

const RESET_DONE: &str = "Managed etcd cluster membership has been reset, restart without --cluster-reset flag now. Backup and delete ${datadir}/server/db on each peer etcd server and rejoin the nodes";
const ALREADY_MEMBER: &str = "already a member of the cluster";
const ADDED: &str = "added this server to the cluster as a learner";

tests::on_both_versions!(
    three_servers_join_and_refusals_join_nothing,
    users_ha_procedure_from_a_local_snapshot,
    users_ha_procedure_from_s3_with_every_node_snapshotting,
    restarted_member_keeps_its_membership_and_two_of_three_keep_working,
    a_joiner_that_crashes_mid_join_joins_on_its_next_start,
);

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn with(a: &[String], b: &[&str]) -> Vec<String> {
    a.iter().cloned().chain(b.iter().map(|s| s.to_string())).collect()
}

/// Data dirs of three servers, node-1..3 on 127.0.0.1..3.
fn nodes(v: EtcdVersion) -> [DataDir; 3] {
    [
        DataDir::on(v, "node-1", "127.0.0.1"),
        DataDir::on(v, "node-2", "127.0.0.2"),
        DataDir::on(v, "node-3", "127.0.0.3"),
    ]
}

/// node-1 with `--cluster-init`, then node-2 and node-3 joining it; `extra` for every server.
fn start_cluster(n: &[DataDir; 3], extra: &[&str]) -> Vec<Server> {
    let first =
        n[0].start(&with(&["--cluster-init".to_string()], extra).iter().map(String::as_str).collect::<Vec<_>>());
    let token = n[0].token();
    let mut servers = vec![first];
    for d in &n[1..] {
        servers.push(d.start(&strs(&with(&DataDir::join_args(&n[0], &token), extra))));
    }
    assert_eq!(voters(&n[0]), 3, "{:?}", members(&n[0]));
    servers
}

/// Stops servers, last first.
fn stop_all(servers: Vec<Server>) {
    for s in servers.into_iter().rev() {
        s.stop();
    }
}

/// (id, name, is_learner) of every member, as this server's etcd lists them.
fn members(dd: &DataDir) -> Vec<(u64, String, bool)> {
    block_on(async {
        let r = connect(dd).await.client.member_list().await.unwrap();
        let mut v: Vec<_> = r.members().iter().map(|m| (m.id(), m.name().to_string(), m.is_learner())).collect();
        v.sort_by(|a, b| a.1.cmp(&b.1));
        v
    })
}

fn voters(dd: &DataDir) -> usize {
    members(dd).iter().filter(|m| !m.2).count()
}

fn all_keys(dd: &DataDir) -> Vec<(String, String)> {
    block_on(async {
        let mut c = connect(dd).await;
        let r = c.client.get("", Some(GetOptions::new().with_all_keys())).await.unwrap();
        r.kvs().iter().map(|kv| (kv.key_str().unwrap().to_string(), kv.value_str().unwrap().to_string())).collect()
    })
}

fn get(dd: &DataDir, key: &str) -> Option<String> {
    block_on(async {
        let r = connect(dd).await.client.get(key, None).await.unwrap();
        r.kvs().first().map(|kv| kv.value_str().unwrap().to_string())
    })
}

/// A GET on a server's supervisor API (trusting the cluster CA), with an optional bearer token.
fn api_get(s: &Server, path: &str, token: Option<&str>) -> (u16, String) {
    block_on(async {
        let mut req = s.http().get(format!("{}{path}", s.api()));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    })
}

fn metric(s: &Server, line_start: &str) -> f64 {
    let (_, text) = api_get(s, "/metrics", None);
    text.lines().find_map(|l| l.strip_prefix(line_start).map(|v| v.trim().parse::<f64>().unwrap())).unwrap_or(0.0)
}

const LOCAL_TAKEN: &str = "k3s_snapshot_scheduled_taken_total{store=\"local\"}";
const S3_TAKEN: &str = "k3s_snapshot_scheduled_taken_total{store=\"s3\"}";

/// `etcd-snapshot ARGS --data-dir D --node-name N`.
fn snapshot_cmd(dd: &DataDir, args: &[&str]) -> bin::Run {
    let data_dir = dd.path().display().to_string();
    bin::run(bin::cmd().arg("etcd-snapshot").args(args).args(["--data-dir", &data_dir, "--node-name", &dd.node]))
}

/// `etcd-snapshot save ARGS`; returns the new snapshot's file name.
fn save(dd: &DataDir, args: &[&str]) -> String {
    let before = files(&dd.snapshots());
    let r = snapshot_cmd(dd, &with(&["save".to_string()], args).iter().map(String::as_str).collect::<Vec<_>>());
    r.assert_ok();
    let new: Vec<_> =
        files(&dd.snapshots()).into_iter().filter(|f| !before.contains(f) && !f.ends_with(".part")).collect();
    assert_eq!(new.len(), 1, "{new:?}\n{}", r.stderr);
    new[0].clone()
}

#[track_caller]
fn assert_reset_done(r: &bin::Run, dd: &DataDir) {
    r.assert_ok();
    assert!(r.stderr.contains(RESET_DONE), "the reset message is missing:\n{}", r.stderr);
    assert!(dd.db().join("reset-flag").is_file());
}

/// Nothing of a join was written: no etcd member, no token, no CA.
#[track_caller]
fn assert_nothing_joined(dd: &DataDir, r: &bin::Run) {
    let root = dd.path();
    assert!(!dd.db().join("etcd/member").exists(), "the refused joiner has etcd data\n{}", r.stderr);
    assert!(!root.join("server/token").exists(), "the refused joiner wrote a token\n{}", r.stderr);
    assert!(!root.join("server/tls/server-ca.crt").exists(), "the refused joiner wrote a CA\n{}", r.stderr);
}

fn three_servers_join_and_refusals_join_nothing(v: EtcdVersion) {
    let n = nodes(v);
    let quiet = ["--etcd-disable-snapshots"];
    let s1 = n[0].start(&["--cluster-init", "--etcd-disable-snapshots"]);
    let token = n[0].token();
    let (hash, secret) = token.strip_prefix("K10").unwrap().split_once("::server:").unwrap();
    let before = members(&n[0]);
    assert_eq!(before.len(), 1);

    // A wrong secret: the CA matches, the API says 401.
    let wrong_secret = format!("K10{hash}::server:not-the-secret");
    let r = n[1].run(&strs(&with(&DataDir::join_args(&n[0], &wrong_secret), &quiet)));
    r.assert_fails_with("401");
    assert!(r.stderr.contains("--token"), "{}", r.stderr);
    assert_nothing_joined(&n[1], &r);
    // A CA hash of another cluster with the right secret: refused before the token is even sent.
    let wrong_ca = format!("K10{}::server:{secret}", "0".repeat(64));
    let r = n[1].run(&strs(&with(&DataDir::join_args(&n[0], &wrong_ca), &quiet)));
    r.assert_fails_with("the token expects 0000");
    assert!(!r.stderr.contains(secret), "the secret leaked: {}", r.stderr);
    assert_nothing_joined(&n[1], &r);
    assert_eq!(members(&n[0]), before, "a refused joiner changed the member list");

    // A joiner whose etcd fails after MemberAdd removes its member again, and a retry joins.
    let r = n[1].run(&strs(&with(
        &DataDir::join_args(&n[0], &token),
        &["--etcd-disable-snapshots", "--etcd-arg=snapshot-count=not-a-number"],
    )));
    r.assert_fails_with("etcd exited");
    assert!(r.stderr.contains(ADDED), "the failure was not after MemberAdd:\n{}", r.stderr);
    assert!(r.stderr.contains("removed this server's member from the cluster again"), "{}", r.stderr);
    assert_eq!(members(&n[0]), before, "the half-joined member was not removed");
    assert!(!n[1].db().join("etcd/member").exists(), "the failed join left etcd data behind");

    let s2 = n[1].start(&strs(&with(&DataDir::join_args(&n[0], &token), &quiet)));
    // node-3 joins with the bare secret: the CA cannot be checked (a warning), the token still is.
    let mut srv3 = n[2].start(&strs(&with(&DataDir::join_args(&n[0], secret), &quiet)));
    srv3.wait_for_log("bare secret", Duration::from_secs(1));
    let m = members(&n[0]);
    let names: Vec<_> = m.iter().map(|m| (m.1.as_str(), m.2)).collect();
    assert_eq!(names, [("node-1", false), ("node-2", false), ("node-3", false)], "{m:?}");
    assert_eq!(members(&n[1]), m);
    assert_eq!(members(&n[2]), m);
    // The joiners hold the cluster's CA and token.
    for d in &n[1..] {
        assert_eq!(
            std::fs::read(d.path().join("server/tls/server-ca.crt")).unwrap(),
            std::fs::read(n[0].path().join("server/tls/server-ca.crt")).unwrap()
        );
        assert_eq!(d.token(), token, "{}", d.node);
    }

    // Writes through any server are read on the others.
    for (i, d) in n.iter().enumerate() {
        let key = format!("/written/through/{}", d.node);
        put(d, &[(&key, &i.to_string())]);
        for other in &n {
            assert_eq!(get(other, &key).as_deref(), Some(i.to_string().as_str()), "{key} on {}", other.node);
        }
    }

    // /db/info on a joiner lists the three members and a leader.
    let (code, body) = api_get(&s2, "/db/info", Some(&token));
    assert_eq!(code, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["members"].as_array().unwrap().len(), 3, "{body}");
    assert!(info["leader"].is_string(), "{body}");
    // The etcd certificates carry each server's own address: each etcd answers a TLS client there
    // (tools use the loopback listener, which the config file names).
    for d in &n {
        let mut c = d.etcd_config();
        assert_eq!(c.endpoints, [format!("https://127.0.0.1:{}", d.client_port)]);
        c.endpoints = vec![format!("https://{}:{}", d.ip, d.client_port)];
        block_on(c.connect()).unwrap_or_else(|e| panic!("{} at its own address: {e}", d.node));
    }
    stop_all(vec![s1, s2, srv3]);
}

fn users_ha_procedure_from_a_local_snapshot(v: EtcdVersion) {
    let n = nodes(v);
    let quiet = ["--etcd-disable-snapshots"];
    let servers = start_cluster(&n, &quiet);
    let token = n[0].token();
    put(&n[0], &[("/registry/a", "1"), ("/registry/b", "2")]);
    put(&n[1], &[("/registry/from-node-2", "3")]);
    let snap = save(&n[0], &[]);
    let want = all_keys(&n[0]);
    assert_eq!(want.len(), 3);
    put(&n[2], &[("/registry/later", "4")]);
    delete(&n[0], "/registry/a");
    stop_all(servers);

    // S1: reset with the restore path, and exits.
    let r = n[0]
        .run(&["--cluster-reset", &format!("--cluster-reset-restore-path={}", n[0].snapshots().join(&snap).display())]);
    assert_reset_done(&r, &n[0]);
    // S1 starts.
    let s1 = n[0].start(&quiet);
    assert_eq!(members(&n[0]).len(), 1);

    // A joiner whose old db is still there: a clear error to delete it, not an etcd crash loop.
    let r = n[1].run(&strs(&with(&DataDir::join_args(&n[0], &token), &quiet)));
    r.assert_fails_with(&format!("delete {}", n[1].db().display()));
    assert!(r.stderr.contains("belongs to member"), "the stale member was not read from the wal: {}", r.stderr);
    assert_eq!(r.code, Some(1));
    assert!(n[1].db().join("etcd/member").is_dir(), "the refused joiner's data was touched");
    assert_eq!(members(&n[0]).len(), 1, "the refused joiner changed the member list");

    // S2 and S3: db deleted, then they join.
    let mut servers = vec![s1];
    for d in &n[1..] {
        std::fs::remove_dir_all(d.db()).unwrap();
        let s = d.start(&strs(&with(&DataDir::join_args(&n[0], &token), &quiet)));
        assert!(s.log_text().contains(ADDED), "{}", s.log_text());
        servers.push(s);
    }
    assert_eq!(voters(&n[0]), 3, "{:?}", members(&n[0]));
    for d in &n {
        assert_eq!(all_keys(d), want, "{} does not serve exactly the snapshot's keys", d.node);
    }
    stop_all(servers);
}

fn users_ha_procedure_from_s3_with_every_node_snapshotting(v: EtcdVersion) {
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let mut s3f = s3.server_flags("snaps");
    s3f.push("--etcd-s3-folder=ha".into());
    let objects = || files(&s3.root.join("snaps/ha"));
    let n = nodes(v);
    let scheduled = with(
        &s3f,
        &["--etcd-snapshot-schedule-cron=@every 2s", "--etcd-snapshot-retention=2", "--etcd-s3-retention=2"],
    );
    let servers = start_cluster(&n, &strs(&scheduled));
    let token = n[0].token();

    // Every server takes its own scheduled snapshots, named with its node name.
    for s in &servers {
        wait_until("two scheduled uploads from every server", Duration::from_secs(120), || metric(s, S3_TAKEN) >= 2.0);
    }
    for d in &n {
        let local: Vec<_> = files(&d.snapshots()).into_iter().filter(|f| f.starts_with("etcd-snapshot-")).collect();
        assert!(!local.is_empty(), "{} has no scheduled snapshot", d.node);
        let own = format!("etcd-snapshot-{}-", d.node);
        assert!(local.iter().all(|f| f.starts_with(&own)), "{}: {local:?}", d.node);
        // `etcd-snapshot ls` on any server shows its local snapshots.
        let ls = snapshot_cmd(d, &["ls"]);
        ls.assert_ok();
        assert!(ls.stdout.contains(&own) && ls.stdout.contains("file://"), "{}:\n{}", d.node, ls.stdout);
    }
    // S3 retention counts all nodes' snapshots under the prefix: with 2 kept per node, at least 6
    // objects would stay; across nodes, 2 (a third only between an upload and its prune).
    wait_until("s3 retention across nodes to keep 2", Duration::from_secs(30), || {
        objects().iter().filter(|f| f.starts_with("etcd-snapshot-")).count() <= 2
    });

    // The snapshot to restore: on S3, taken on node-3.
    put(&n[0], &[("/registry/a", "1")]);
    put(&n[2], &[("/registry/b", "2")]);
    let mut on_demand = vec!["--name=ha"];
    on_demand.extend(strs(&s3f));
    let snap = save(&n[2], &on_demand);
    assert!(snap.starts_with("ha-node-3-"), "{snap}");
    assert!(objects().contains(&snap), "{snap} not in s3: {:?}", objects());
    let want = all_keys(&n[2]);
    put(&n[1], &[("/registry/later", "3")]);
    delete(&n[0], "/registry/a");
    stop_all(servers);

    // S1 resets from the S3 object, by name.
    let mut args = vec!["--cluster-reset".to_string(), format!("--cluster-reset-restore-path={snap}")];
    args.extend(s3f.clone());
    let r = n[0].run(&strs(&args));
    assert_reset_done(&r, &n[0]);
    assert!(!r.stderr.contains(SECRET_KEY), "the secret key leaked");
    let quiet = with(&s3f, &["--etcd-disable-snapshots"]);
    let mut servers = vec![n[0].start(&strs(&quiet))];
    for d in &n[1..] {
        std::fs::remove_dir_all(d.db()).unwrap();
        servers.push(d.start(&strs(&with(&DataDir::join_args(&n[0], &token), &strs(&quiet)))));
    }
    assert_eq!(voters(&n[0]), 3, "{:?}", members(&n[0]));
    for d in &n {
        assert_eq!(all_keys(d), want, "{} does not serve exactly the snapshot's keys", d.node);
    }
    stop_all(servers);
}

fn restarted_member_keeps_its_membership_and_two_of_three_keep_working(v: EtcdVersion) {
    let n = nodes(v);
    let flags = ["--etcd-snapshot-schedule-cron=@every 2s", "--etcd-snapshot-retention=2"];
    let mut servers = start_cluster(&n, &flags);
    let token = n[0].token();
    let before = members(&n[0]);

    // node-2 stopped and started again with the same flags: it starts from its data, no MemberAdd.
    servers.remove(1).stop();
    let join = with(&DataDir::join_args(&n[0], &token), &flags);
    let s2 = n[1].start(&strs(&join));
    let log = s2.log_text();
    assert!(log.contains(ALREADY_MEMBER), "{log}");
    assert!(!log.contains(ADDED), "a restarted member joined again:\n{log}");
    assert_eq!(members(&n[0]), before, "member ids or count changed after the restart");
    servers.insert(1, s2);
    put(&n[1], &[("after-restart", "1")]);
    assert_eq!(get(&n[0], "after-restart").as_deref(), Some("1"));

    // The whole cluster stopped and started again, all at once: node-1 needs a peer for quorum
    // before its API answers, so the others start from their data without waiting for it.
    stop_all(std::mem::take(&mut servers));
    servers.push(n[0].spawn(&flags));
    for d in &n[1..] {
        servers.push(d.spawn(&strs(&with(&DataDir::join_args(&n[0], &token), &flags))));
    }
    for s in &mut servers {
        s.wait_for_log(tests::support::server::RUNNING, Duration::from_secs(120));
    }
    assert_eq!(members(&n[0]), before, "member ids or count changed after the cluster restart");
    assert_eq!(get(&n[2], "after-restart").as_deref(), Some("1"));

    // node-3 is lost (killed with its etcd): the other two stay writable and keep snapshotting.
    drop(servers.pop());
    let taken: Vec<f64> = servers.iter().map(|s| metric(s, LOCAL_TAKEN)).collect();
    wait_until("a write with one of three servers gone", Duration::from_secs(60), || {
        block_on(async {
            let Ok(mut c) = n[0].etcd_config().connect().await else { return false };
            tokio::time::timeout(Duration::from_secs(5), c.client.put("after-loss", "2", None))
                .await
                .is_ok_and(|r| r.is_ok())
        })
    });
    assert_eq!(get(&n[1], "after-loss").as_deref(), Some("2"));
    for (s, before) in servers.iter().zip(taken) {
        wait_until("scheduled snapshots after the loss", Duration::from_secs(60), || {
            metric(s, LOCAL_TAKEN) >= before + 2.0
        });
        assert_eq!(metric(s, "k3s_snapshot_last_failed{store=\"local\"}"), 0.0);
    }
    for d in &n[..2] {
        let own = format!("etcd-snapshot-{}-", d.node);
        let local: Vec<_> = files(&d.snapshots())
            .into_iter()
            .filter(|f| f.starts_with("etcd-snapshot-") && !f.ends_with(".part"))
            .collect();
        assert!(local.iter().all(|f| f.starts_with(&own)), "{local:?}");
        assert!(local.len() <= 2 + 1, "local retention: {local:?}");
    }
    stop_all(servers);
}

/// A joiner killed (abort, so nothing cleans up) right after `MemberAdd`, and another killed while
/// its learner runs unpromoted: each next start ends with every member a voter and the data shared.
fn a_joiner_that_crashes_mid_join_joins_on_its_next_start(v: EtcdVersion) {
    let n = nodes(v);
    let first = n[0].start(&["--cluster-init"]);
    let token = n[0].token();
    put(&n[0], &[("before", "0")]);
    let join = DataDir::join_args(&n[0], &token);

    // Crash after MemberAdd, before etcd started: the cluster holds an unstarted learner.
    let r = bin::run(n[1].command(&strs(&join)).env("K3S_SNAPSHOT_TEST_JOIN_ABORT_AT", "added"));
    assert!(!r.ok() && r.stderr.contains("aborting here"), "{}", r.stderr);
    let m = members(&n[0]);
    assert_eq!(m.len(), 2, "{m:?}");
    assert!(m.iter().any(|(_, name, learner)| name.is_empty() && *learner), "no unstarted learner: {m:?}");
    let s2 = n[1].start(&strs(&join));
    assert_eq!(voters(&n[0]), 2, "{:?}", members(&n[0]));
    assert!(members(&n[0]).iter().any(|(_, name, _)| name == "node-2"), "{:?}", members(&n[0]));
    put(&n[1], &[("via-node-2", "2")]);
    assert_eq!(get(&n[0], "via-node-2").as_deref(), Some("2"));

    // Crash while the learner's etcd runs, before promotion: its etcd outlives the server.
    let r = bin::run(n[2].command(&strs(&join)).env("K3S_SNAPSHOT_TEST_JOIN_ABORT_AT", "learner-running"));
    assert!(!r.ok() && r.stderr.contains("aborting here"), "{}", r.stderr);
    assert!(members(&n[0]).iter().any(|(_, name, learner)| name == "node-3" && *learner), "{:?}", members(&n[0]));
    let s3 = n[2].start(&strs(&join));
    assert!(s3.log_text().contains(ALREADY_MEMBER), "{}", s3.log_text());
    wait_until("node-3 promoted after its restart", Duration::from_secs(60), || voters(&n[0]) == 3);
    assert_eq!(members(&n[0]).len(), 3, "{:?}", members(&n[0]));
    assert_eq!(get(&n[2], "before").as_deref(), Some("0"));
    assert_eq!(get(&n[2], "via-node-2").as_deref(), Some("2"));
    stop_all(vec![first, s2, s3]);
}
