//! `k3s-snapshot server` with real etcd 3.5.1 and 3.4.23: TLS-only etcd, the supervisor API,
//! scheduled snapshots with retention, `etcd-snapshot save` against the running server, clear
//! start-up errors, and a clean SIGTERM in the middle of a scheduled snapshot.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use k3s_snapshot_core::etcd::EtcdClientConfig;
use tests::support::bin;
use tests::support::etcd::EtcdVersion;
use tests::support::server::{block_on, connect, etcd_pids, files, wait_until, DataDir, Server};

tests::on_both_versions!(
    etcd_answers_only_tls_with_the_client_cert,
    scheduled_snapshots_fire_and_retention_holds,
    etcd_snapshot_save_works_against_the_running_server,
    sigterm_during_a_scheduled_snapshot_exits_cleanly,
);

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

async fn get(s: &Server, path: &str, auth: Option<&str>) -> (u16, String) {
    get_as(s, path, auth, None).await
}

async fn get_as(s: &Server, path: &str, auth: Option<&str>, basic: Option<(&str, &str)>) -> (u16, String) {
    let mut req = s.http().get(format!("{}{path}", s.api()));
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    if let Some((user, password)) = basic {
        req = req.basic_auth(user, Some(password));
    }
    let resp = req.send().await.unwrap();
    let code = resp.status().as_u16();
    (code, resp.text().await.unwrap())
}

/// The value of one metric line, 0 when absent.
fn metric(s: &Server, line_start: &str) -> f64 {
    let (_, text) = block_on(get(s, "/metrics", None));
    text.lines().find_map(|l| l.strip_prefix(line_start).map(|v| v.trim().parse::<f64>().unwrap())).unwrap_or(0.0)
}

fn etcd_answers_only_tls_with_the_client_cert(v: EtcdVersion) {
    let dd = DataDir::new(v);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    let root = dd.path();
    for d in ["server", "server/db", "server/tls", "server/tls/etcd", "server/db/etcd"] {
        assert_eq!(mode(&root.join(d)), 0o700, "{d}");
    }
    for f in
        ["server/token", "server/tls/etcd/client.key", "server/tls/etcd/server-client.key", "server/db/etcd/config"]
    {
        assert_eq!(mode(&root.join(f)), 0o600, "{f}");
    }
    let token = std::fs::read_to_string(root.join("server/token")).unwrap().trim().to_string();
    let (hash, secret) = token.strip_prefix("K10").unwrap().split_once("::server:").unwrap();
    assert_eq!(hash.len(), 64);
    assert!(!secret.is_empty());
    let ca_pem = std::fs::read_to_string(root.join("server/tls/server-ca.crt")).unwrap();
    assert_eq!(hash, hex::encode(<sha2::Sha256 as sha2::Digest>::digest(ca_pem.as_bytes())));

    block_on(async {
        let mut c = connect(&dd).await;
        c.client.put("greeting", "hello", None).await.unwrap();
        let r = c.client.get("greeting", None).await.unwrap();
        assert_eq!(r.kvs()[0].value(), b"hello");
        assert!(c.version.starts_with(&v.label()[..3]), "{} vs {}", c.version, v.label());

        let https = format!("https://127.0.0.1:{}", dd.client_port);
        let plain =
            EtcdClientConfig { endpoints: vec![format!("http://127.0.0.1:{}", dd.client_port)], ..Default::default() };
        assert!(plain.connect().await.is_err(), "plain http must not reach etcd");
        let no_cert = EtcdClientConfig {
            endpoints: vec![https],
            cacert: Some(root.join("server/tls/etcd/server-ca.crt")),
            ..Default::default()
        };
        assert!(no_cert.connect().await.is_err(), "tls without the client cert must be refused");

        assert_eq!(get(&s, "/ping", None).await, (200, "pong".into()));
        assert_eq!(get(&s, "/cacerts", None).await, (200, ca_pem.clone()));
        assert_eq!(get(&s, "/db/info", None).await.0, 401);
        assert_eq!(get(&s, "/db/info", Some("Bearer wrong")).await.0, 401);
        let (code, body) = get(&s, "/db/info", Some(&format!("Bearer {token}"))).await;
        assert_eq!(code, 200, "{body}");
        let info: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(info["members"].as_array().unwrap().len(), 1, "{body}");
        assert_eq!(info["members"][0]["name"], "node-a");
        assert_eq!(get_as(&s, "/db/info", None, Some(("server", secret))).await.0, 200);
        assert_eq!(get_as(&s, "/db/info", None, Some(("server", "nope"))).await.0, 401);
    });
    let data_dir = s.data_dir.clone();
    s.stop();
    assert!(etcd_pids(&data_dir).is_empty(), "etcd still runs after the server stopped");
}

fn scheduled_snapshots_fire_and_retention_holds(v: EtcdVersion) {
    let dd = DataDir::new(v);
    let s = dd.start(&["--etcd-snapshot-schedule-cron=@every 2s", "--etcd-snapshot-retention=2"]);
    let taken = "k3s_snapshot_scheduled_taken_total{store=\"local\"}";
    wait_until("4 scheduled snapshots", Duration::from_secs(90), || metric(&s, taken) >= 4.0);
    let ours = |f: &String| f.starts_with("etcd-snapshot-node-a-") && !f.ends_with(".part");
    wait_until("retention to leave 2 snapshots", Duration::from_secs(10), || {
        files(&dd.snapshots()).iter().filter(|f| ours(f)).count() == 2
    });
    for f in files(&dd.snapshots()).iter().filter(|f| ours(f)) {
        let ts = f.strip_prefix("etcd-snapshot-node-a-").unwrap();
        assert!(ts.len() >= 10 && ts.bytes().all(|b| b.is_ascii_digit()), "{f}");
        assert_eq!(mode(&dd.snapshots().join(f)), 0o600);
    }
    assert_eq!(metric(&s, "k3s_snapshot_scheduled_failed_total{store=\"local\"}"), 0.0);
    assert!(metric(&s, "k3s_snapshot_last_size_bytes{store=\"local\"}") > 0.0);
    assert!(metric(&s, "k3s_snapshot_last_success_timestamp_seconds{store=\"local\"}") > 1.6e9);
    s.stop();
    // Metadata follows retention.
    let md = files(&dd.db().join(".metadata"));
    let snaps: Vec<_> = files(&dd.snapshots()).into_iter().filter(|f| ours(f)).collect();
    for f in &snaps {
        assert!(md.contains(f), "no metadata for {f}: {md:?}");
    }
}

fn etcd_snapshot_save_works_against_the_running_server(v: EtcdVersion) {
    let dd = DataDir::new(v);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    block_on(async { connect(&dd).await.client.put("k", "v", None).await.unwrap() });
    let data_dir = dd.path().display().to_string();
    let r = bin::run(bin::cmd().args(["etcd-snapshot", "save", "--data-dir", &data_dir, "--node-name", "node-a"]));
    r.assert_ok();
    let saved: Vec<_> = files(&dd.snapshots()).into_iter().filter(|f| f.starts_with("on-demand-node-a-")).collect();
    assert_eq!(saved.len(), 1, "{saved:?}\n{}", r.stderr);
    let status = tests::support::etcd::etcdutl_status(&dd.snapshots().join(&saved[0]));
    assert!(status["totalKey"].as_u64().unwrap() >= 1, "{status}");
    s.stop();
}

fn sigterm_during_a_scheduled_snapshot_exits_cleanly(v: EtcdVersion) {
    let dd = DataDir::new(v);
    let mut s = dd.start(&["--etcd-snapshot-schedule-cron=@every 1s", "--etcd-snapshot-retention=1"]);
    // About 96 MiB, so that a snapshot takes long enough to be caught in the middle.
    block_on(async {
        let mut c = connect(&dd).await;
        let mut state = 0x9e3779b97f4a7c15u64;
        for i in 0..96 {
            let mut v = vec![0u8; 1 << 20];
            for chunk in v.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
            }
            c.client.put(format!("big/{i:03}"), v, None).await.unwrap();
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if files(&dd.snapshots()).iter().any(|f| f.ends_with(".part")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no snapshot was seen in progress:\n{}", s.log_text());
        std::thread::sleep(Duration::from_millis(2));
    }
    s.sigterm();
    let status = s.wait(Duration::from_secs(60));
    assert!(status.success(), "exit {status}:\n{}", s.log_text());
    assert!(etcd_pids(&dd.path()).is_empty(), "etcd still runs");
    let left = files(&dd.snapshots());
    assert!(!left.iter().any(|f| f.ends_with(".part")), "partial snapshot left: {left:?}");
    for f in left.iter().filter(|f| f.starts_with("etcd-snapshot-")) {
        // Whatever is there is whole.
        tests::support::etcd::etcdutl_status(&dd.snapshots().join(f));
    }
}

#[test]
fn invalid_cron_is_a_startup_error_that_quotes_it() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let r = dd.run(&["--etcd-snapshot-schedule-cron=every tuesday"]);
    r.assert_fails_with("\"every tuesday\"");
    assert_eq!(r.code, Some(1));
    assert!(!dd.db().join("etcd/member").exists(), "etcd must not have started");
}

#[test]
fn missing_etcd_is_a_startup_error_naming_the_flag() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let r = dd.run(&["--etcd-bin-dir=/nonexistent/etcd-bin"]);
    r.assert_fails_with("--etcd-bin-dir");
    assert_eq!(r.code, Some(1));
}

#[test]
fn occupied_ports_are_startup_errors() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let hold = std::net::TcpListener::bind(("127.0.0.1", dd.client_port)).unwrap();
    dd.run(&[]).assert_fails_with("--etcd-client-port");
    drop(hold);
    let hold = std::net::TcpListener::bind(("0.0.0.0", dd.api_port)).unwrap();
    let r = dd.run(&[]);
    r.assert_fails_with("--https-listen-port");
    assert_eq!(r.code, Some(1));
    drop(hold);
    assert!(etcd_pids(&dd.path()).is_empty());
}

#[test]
fn unwritable_data_dir_is_a_startup_error() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let file = dd.tmp.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let r = dd.run(&[&format!("--data-dir={}/k3s", file.display())]);
    r.assert_fails_with("--data-dir");
    assert_eq!(r.code, Some(1));
    assert_eq!(r.stderr.trim().lines().filter(|l| l.starts_with("error:")).count(), 1, "{}", r.stderr);
}

#[test]
fn a_second_server_on_the_same_data_dir_is_refused() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    let r = dd.run(&["--etcd-disable-snapshots"]);
    r.assert_fails_with("already running");
    s.stop();
}

#[test]
fn s3_down_during_scheduled_snapshots_keeps_local_counts_the_failure_and_recovers() {
    let mut s3 = tests::support::s3::S3Server::start();
    s3.create_bucket("snaps");
    let dd = DataDir::new(EtcdVersion::V3_5);
    let mut flags = s3.server_flags("snaps");
    flags.push("--etcd-s3-timeout=3s".into());
    flags.push("--etcd-snapshot-schedule-cron=@every 2s".into());
    flags.push("--etcd-snapshot-retention=3".into());
    flags.push("--etcd-s3-retention=2".into());
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let s = dd.start(&args);
    let local = "k3s_snapshot_scheduled_taken_total{store=\"local\"}";
    let remote = "k3s_snapshot_scheduled_taken_total{store=\"s3\"}";
    let remote_failed = "k3s_snapshot_scheduled_failed_total{store=\"s3\"}";
    wait_until("a snapshot in s3", Duration::from_secs(60), || metric(&s, remote) >= 1.0);
    assert!(files(&s3.root.join("snaps")).iter().any(|f| f.starts_with("etcd-snapshot-node-a-")));

    s3.kill();
    let local_before = metric(&s, local);
    wait_until("an s3 failure to be counted", Duration::from_secs(60), || metric(&s, remote_failed) >= 1.0);
    assert!(metric(&s, local) > local_before, "the local snapshot of a failed upload must be kept");
    assert_eq!(metric(&s, "k3s_snapshot_last_failed{store=\"s3\"}"), 1.0);
    assert_eq!(metric(&s, "k3s_snapshot_last_failed{store=\"local\"}"), 0.0);
    assert!(files(&dd.snapshots()).iter().any(|f| f.starts_with("etcd-snapshot-node-a-")));

    s3.restart();
    let remote_before = metric(&s, remote);
    wait_until("the next upload to succeed", Duration::from_secs(60), || metric(&s, remote) > remote_before);
    wait_until("the failure flag to clear", Duration::from_secs(10), || {
        metric(&s, "k3s_snapshot_last_failed{store=\"s3\"}") == 0.0
    });
    // S3 retention across the folder.
    wait_until("s3 retention", Duration::from_secs(30), || {
        files(&s3.root.join("snaps")).iter().filter(|f| f.starts_with("etcd-snapshot-node-a-")).count() <= 2
    });
    assert!(!s.log_text().contains(tests::support::s3::SECRET_KEY), "the secret key leaked into the logs");
    s.stop();
}

const LOCAL_TAKEN: &str = "k3s_snapshot_scheduled_taken_total{store=\"local\"}";
const S3_TAKEN: &str = "k3s_snapshot_scheduled_taken_total{store=\"s3\"}";
const S3_FAILED: &str = "k3s_snapshot_scheduled_failed_total{store=\"s3\"}";
const UPLOAD_FAILED: &str = "scheduled snapshot upload failed";

/// Snapshots of node-a in a bucket of an s3s-fs root.
fn in_bucket(s3: &tests::support::s3::S3Server, bucket: &str) -> Vec<String> {
    files(&s3.root.join(bucket)).into_iter().filter(|f| f.starts_with("etcd-snapshot-node-a-")).collect()
}

/// `server` flags for `bucket` on `s3`, snapshots every 2 s, a short S3 timeout.
fn scheduled_s3_flags(s3: &tests::support::s3::S3Server, bucket: &str) -> Vec<String> {
    let mut flags = s3.server_flags(bucket);
    flags.push("--etcd-s3-timeout=2s".into());
    flags.push("--etcd-snapshot-schedule-cron=@every 2s".into());
    flags.push("--etcd-snapshot-retention=0".into());
    flags
}

/// The level and message of the log lines that carry `needle` are a warning.
#[track_caller]
fn assert_warned(s: &Server, needle: &str) {
    let log = s.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
    assert!(!lines.is_empty(), "no {needle:?} in the log:\n{log}");
    assert!(lines.iter().all(|l| l.contains("WARN")), "{needle:?} is not a warning: {lines:#?}");
}

/// SPEC §4: the server starts whatever S3's state. With S3's port closed at start-up, etcd runs,
/// every scheduled snapshot is kept locally and its failed upload is a warning and a counted
/// failure; once S3 listens again, the next scheduled snapshot lands in the bucket.
#[test]
fn a_server_started_while_s3_is_down_keeps_local_snapshots_and_uploads_once_s3_is_back() {
    let mut s3 = tests::support::s3::S3Server::start();
    s3.create_bucket("snaps");
    s3.kill();
    let dd = DataDir::new(EtcdVersion::V3_5);
    let flags = scheduled_s3_flags(&s3, "snaps");
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut s = dd.start(&args);
    s.wait_for_log("s3 is not usable now", Duration::from_secs(30));
    wait_until("two local snapshots whose uploads failed", Duration::from_secs(90), || {
        metric(&s, LOCAL_TAKEN) >= 2.0 && metric(&s, S3_FAILED) >= 2.0
    });
    assert!(files(&dd.snapshots()).iter().filter(|f| f.starts_with("etcd-snapshot-node-a-")).count() >= 2);
    assert!(in_bucket(&s3, "snaps").is_empty());
    assert_eq!(metric(&s, S3_TAKEN), 0.0);
    assert_warned(&s, UPLOAD_FAILED);
    block_on(async { connect(&dd).await.client.put("still", "serving", None).await.unwrap() });

    s3.restart();
    wait_until("a scheduled snapshot in s3", Duration::from_secs(60), || !in_bucket(&s3, "snaps").is_empty());
    wait_until("the upload to be counted", Duration::from_secs(10), || metric(&s, S3_TAKEN) >= 1.0);
    assert!(!s.log_text().contains(tests::support::s3::SECRET_KEY), "the secret key leaked into the logs");
    s.stop();
}

/// A wrong secret key: the server runs, every scheduled snapshot is kept locally and its refused
/// upload is a warning and a counted failure. A bucket that does not exist: the server starts
/// with a warning that names it and takes its scheduled snapshots. (s3s-fs makes a bucket's
/// directory on the first PUT where real S3 answers NoSuchBucket, so the uploads themselves are
/// not a failure to count here; the closed port above shows the counting and the recovery.)
#[test]
fn a_server_started_with_a_wrong_secret_or_a_missing_bucket_keeps_local_snapshots() {
    let s3 = tests::support::s3::S3Server::start();
    s3.create_bucket("snaps");
    let dd = DataDir::new(EtcdVersion::V3_5);

    let wrong = "wr0ng-secret-Hx7Qp3";
    let flags: Vec<String> = scheduled_s3_flags(&s3, "snaps")
        .into_iter()
        .map(|f| if f.starts_with("--etcd-s3-secret-key=") { format!("--etcd-s3-secret-key={wrong}") } else { f })
        .collect();
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut s = dd.start(&args);
    s.wait_for_log("s3 is not usable now", Duration::from_secs(30));
    wait_until("local snapshots whose uploads were refused", Duration::from_secs(60), || {
        metric(&s, LOCAL_TAKEN) >= 2.0 && metric(&s, S3_FAILED) >= 2.0
    });
    assert_eq!(metric(&s, S3_TAKEN), 0.0);
    assert!(in_bucket(&s3, "snaps").is_empty());
    assert_warned(&s, UPLOAD_FAILED);
    assert!(!s.log_text().contains(wrong), "the secret key leaked into the logs");
    s.stop();

    let flags = scheduled_s3_flags(&s3, "not-there");
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut s = dd.start(&args);
    s.wait_for_log("bucket not-there does not exist", Duration::from_secs(30));
    assert_warned(&s, "s3 is not usable now");
    wait_until("a scheduled local snapshot", Duration::from_secs(60), || metric(&s, LOCAL_TAKEN) >= 1.0);
    s.stop();
}

/// Without key flags the server signs with the instance role's credentials (IMDSv2). The
/// metadata service is down when the server starts: the server starts anyway, keeps its
/// scheduled snapshots locally and says which sources it tried; once the service answers, the
/// next upload lands in the bucket.
#[test]
fn a_server_on_an_instance_role_starts_while_the_metadata_service_is_down_and_uploads_once_it_answers() {
    use tests::support::imds::{Answer, ImdsResponder};
    let s3 = tests::support::s3::S3Server::start();
    s3.create_bucket("snaps");
    let dd = DataDir::new(EtcdVersion::V3_5);
    let port = tests::support::etcd::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let flags: Vec<String> = scheduled_s3_flags(&s3, "snaps")
        .into_iter()
        .filter(|f| !f.starts_with("--etcd-s3-access-key=") && !f.starts_with("--etcd-s3-secret-key="))
        .collect();
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut cmd = dd.command(&args);
    cmd.env_remove("AWS_EC2_METADATA_DISABLED").env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &url);
    let mut s = dd.spawn_command(cmd);
    s.wait_for_log(tests::support::server::RUNNING, Duration::from_secs(120));
    s.wait_for_log("s3 is not usable now", Duration::from_secs(30));
    wait_until("a local snapshot whose upload failed", Duration::from_secs(60), || {
        metric(&s, LOCAL_TAKEN) >= 1.0 && metric(&s, S3_FAILED) >= 1.0
    });
    assert!(s.log_text().contains(&format!("instance role at {url}: cannot connect")), "{}", s.log_text());
    assert_warned(&s, UPLOAD_FAILED);

    let token = "server-role-token-Fh2Wq6";
    let imds = ImdsResponder::start_on_port(
        port,
        Answer::Credentials {
            access_key: tests::support::s3::ACCESS_KEY.into(),
            secret_key: tests::support::s3::SECRET_KEY.into(),
            token: token.into(),
            lifetime: Duration::from_secs(6 * 3600),
        },
    );
    wait_until("a scheduled snapshot in s3", Duration::from_secs(60), || !in_bucket(&s3, "snaps").is_empty());
    wait_until("the upload to be counted", Duration::from_secs(10), || metric(&s, S3_TAKEN) >= 1.0);
    assert!(imds.credentials_served() >= 1);
    assert_eq!(imds.refused(), 0);
    let log = s.log_text();
    assert!(!log.contains(tests::support::s3::SECRET_KEY) && !log.contains(token), "a secret leaked into the logs");
    s.stop();
}

#[test]
fn etcd_dying_stops_the_server_with_its_last_lines() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let mut s = dd.start(&["--etcd-disable-snapshots"]);
    let pids = etcd_pids(&dd.path());
    assert_eq!(pids.len(), 1, "{pids:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0] as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let status = s.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", s.log_text());
    let log = s.log_text();
    assert!(log.contains("etcd exited unexpectedly"), "{log}");
    assert!(log.contains("last lines"), "{log}");
}

/// Whether a process has let go of everything: gone, or a zombie with no thread left (a Go
/// process's main thread can be a zombie while its other threads still hold its sockets).
fn let_go(pid: u32) -> bool {
    let gone_or_zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(true);
    gone_or_zombie && std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count() <= 1).unwrap_or(true)
}

/// Issue 25.4: `kill -9` of the server left its etcd running, holding the client and peer ports
/// and the data dir. Its children now get SIGKILL when it dies (PR_SET_PDEATHSIG).
#[test]
fn etcd_dies_with_a_server_killed_with_sigkill() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    let etcd = etcd_pids(&dd.path());
    assert_eq!(etcd.len(), 1, "{etcd:?}");
    let etcd = etcd[0];
    let status = std::fs::read_to_string(format!("/proc/{etcd}/status")).unwrap();
    assert!(status.lines().any(|l| l == format!("PPid:\t{}", s.pid())), "etcd is the server's child:\n{status}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(s.pid() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until("etcd to die with its server", Duration::from_secs(2), || let_go(etcd));
    for port in [dd.client_port, dd.peer_port] {
        std::net::TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| panic!("port {port} is still held: {e}"));
    }
    drop(s);
}

/// A server killed with SIGKILL takes its etcd with it (see above); an etcd left running by a
/// server that could not (an older version) is stopped at the next start, which must not fail on
/// the busy port, and tidies the partial files a kill leaves. (The reaping itself is unit-tested
/// in `etcd_proc`.)
#[test]
fn a_server_killed_with_sigkill_starts_again_despite_its_orphaned_etcd() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let s = dd.start(&[]);
    let pid = s.pid();
    assert!(!etcd_pids(&dd.path()).is_empty(), "etcd runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    drop(s);
    // A stale partial snapshot, as a kill during a save leaves.
    let part = dd.snapshots().join("etcd-snapshot-n-1.part");
    std::fs::create_dir_all(dd.snapshots()).unwrap();
    std::fs::write(&part, b"partial").unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options().write(true).open(&part).unwrap().set_modified(old).unwrap();
    let orphans = etcd_pids(&dd.path());
    let mut s = dd.start(&[]);
    for o in orphans {
        assert!(
            !std::path::Path::new(&format!("/proc/{o}/cmdline")).exists()
                || std::fs::read(format!("/proc/{o}/cmdline")).unwrap().is_empty(),
            "orphan {o} is gone"
        );
    }
    assert!(!part.exists(), "the stale .part is tidied");
    block_on(async {
        let mut c = connect(&dd).await;
        c.client.put("after-restart", "ok", None).await.unwrap();
    });
    s.sigterm();
    assert!(s.wait(Duration::from_secs(60)).success());
}
