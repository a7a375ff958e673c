//! The supervisor API and the token, signals, the environment etcd inherits, and a lying server
//! that a joiner talks to before it can verify anything.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tests::support::etcd::EtcdVersion;
use tests::support::server::{block_on, DataDir, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Status and body of `GET path` with optional basic credentials or an Authorization header.
async fn get(s: &Server, path: &str, basic: Option<(&str, &str)>, authorization: Option<&str>) -> (u16, String) {
    let mut req = s.http().get(format!("{}{path}", s.api()));
    if let Some((user, password)) = basic {
        req = req.basic_auth(user, Some(password));
    }
    if let Some(a) = authorization {
        req = req.header("Authorization", a);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[test]
fn an_empty_token_file_stops_the_server_saying_how_to_set_one() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    std::fs::create_dir_all(dd.path().join("server")).unwrap();
    for content in ["", "  \n"] {
        std::fs::write(dd.path().join("server/token"), content).unwrap();
        let run = dd.run(&[]);
        run.assert_fails_with("holds no token secret");
        run.assert_fails_with("--token");
    }
}

#[test]
fn a_token_file_with_a_ca_hash_and_no_secret_stops_the_server() {
    // What an empty secret became after one restart: `K10<hash>::server:`, computable by anyone
    // from /cacerts. It must not become the secret.
    let dd = DataDir::new(EtcdVersion::V3_5);
    let s = dd.start(&[]);
    s.stop();
    let full = dd.token();
    let (head, _) = full.split_once("::server:").unwrap();
    std::fs::write(dd.path().join("server/token"), format!("{head}::server:\n")).unwrap();
    dd.run(&[]).assert_fails_with("holds no token secret");
}

#[test]
fn basic_auth_with_an_empty_password_gets_no_ca_material() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let s = dd.start(&[]);
    let (head, _) = dd.token().split_once("::server:").map(|(h, t)| (h.to_string(), t.to_string())).unwrap();
    let secretless = format!("{head}::server:");
    for (basic, auth) in [
        (Some(("server", "")), None),
        (Some(("server", secretless.as_str())), None),
        (None, Some(format!("Bearer {secretless}"))),
        (None, Some("Bearer ".to_string())),
    ] {
        let (code, body) = block_on(get(&s, "/db/ca-material", basic, auth.as_deref()));
        assert_eq!(code, 401, "{basic:?} {auth:?} got {code}: {body}");
        assert!(!body.contains("PRIVATE KEY"));
    }
    let (code, body) = block_on(get(&s, "/db/ca-material", Some(("server", &dd.token())), None));
    assert_eq!(code, 200, "{body}");
    s.stop();
}

#[test]
fn failed_token_checks_are_logged_without_the_secret_and_rate_limited() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let s = dd.start(&[]);
    let wrong = "wrong-guess-Hq3xT";
    let mut codes = Vec::new();
    for _ in 0..12 {
        codes.push(block_on(get(&s, "/db/info", Some(("server", wrong)), None)).0);
    }
    assert!(codes[..10].iter().all(|c| *c == 401), "{codes:?}");
    assert!(codes[10..].iter().all(|c| *c == 429), "{codes:?}");
    // Once over its allowance a source is refused even with the right token, until the window ends.
    let (code, _) = block_on(get(&s, "/db/info", Some(("server", &dd.token())), None));
    assert_eq!(code, 429);
    // Endpoints without authentication still answer.
    assert_eq!(block_on(get(&s, "/ping", None, None)).0, 200);
    let log = s.log_text();
    assert!(log.contains("refused a request") && log.contains("127.0.0.1"), "{log}");
    assert!(!log.contains(wrong), "the presented credential was logged");
    s.stop();
}

/// A TLS connection to the supervisor API trusting the cluster CA.
async fn tls_connect(s: &Server) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let ca = std::fs::read(s.data_dir.join("server/tls/server-ca.crt")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect((s.ip.as_str(), s.api_port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(s.ip.clone()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.unwrap()
}

#[test]
fn half_sent_requests_are_closed_and_do_not_stop_the_api() {
    // The server inherits a low soft limit on open files (as from a login shell) and must raise it.
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if hard > 4096 {
        setrlimit(Resource::RLIMIT_NOFILE, 4096, hard).unwrap();
    }
    let dd = DataDir::new(EtcdVersion::V3_5);
    let s = dd.start(&[]);
    block_on(async {
        // 300 clients that finish the handshake, send half a request head, and stall.
        let mut stalled = Vec::new();
        for _ in 0..300 {
            let mut c = tls_connect(&s).await;
            c.write_all(b"GET /db/info HTTP/1.1\r\nHost: x\r\n").await.unwrap();
            c.flush().await.unwrap();
            stalled.push(c);
        }
        // The API still answers others.
        let (code, body) = get(&s, "/ping", None, None).await;
        assert_eq!((code, body.as_str()), (200, "pong"));
        // And the stalled ones are closed by the server once the head is overdue (10 s), instead
        // of being held for ever.
        let started = Instant::now();
        for c in &mut stalled {
            let mut buf = [0u8; 256];
            let left = Duration::from_secs(30).saturating_sub(started.elapsed());
            let read = tokio::time::timeout(left, c.read(&mut buf)).await;
            assert!(read.is_ok(), "a half-sent request was still open after {:?}", started.elapsed());
        }
    });
    // Descriptors were not the limit either: the server raised its soft limit to the hard one.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", s.pid())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_string();
    let nums: Vec<&str> = line.split_whitespace().filter(|w| w.chars().all(|c| c.is_ascii_digit())).collect();
    assert_eq!(nums[0], hard.to_string(), "soft open-file limit not raised to the hard one: {line}");
    s.stop();
}

#[test]
fn our_secrets_proxies_and_etcd_variables_do_not_reach_etcd() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let planted = [
        ("K3S_TOKEN", "leaky-Token-5Jx"),
        ("AWS_SECRET_ACCESS_KEY", "leaky-Secret-8Qw"),
        ("AWS_SESSION_TOKEN", "leaky-Session-2Zr"),
        ("HTTPS_PROXY", "http://127.0.0.1:9"),
        ("NO_PROXY", ""),
        // etcd would take this as --listen-client-urls and stop answering where we expect it.
        ("ETCD_LISTEN_CLIENT_URLS", "http://127.0.0.1:9"),
        ("ETCD_NAME", "hijacked"),
    ];
    let mut cmd = dd.command(&[]);
    cmd.envs(planted);
    let mut s = dd.spawn_command(cmd);
    s.wait_for_log(tests::support::server::RUNNING, Duration::from_secs(120));
    let pids = tests::support::server::etcd_pids(&dd.path());
    assert_eq!(pids.len(), 1, "{pids:?}");
    let environ = std::fs::read(format!("/proc/{}/environ", pids[0])).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    for (k, v) in planted {
        assert!(!environ.split('\0').any(|e| e.starts_with(&format!("{k}="))), "{k} reached etcd");
        if !v.is_empty() {
            assert!(!environ.contains(v), "{k}'s value reached etcd");
        }
    }
    s.stop();
}

fn signal(s: &Server, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(s.pid() as i32), sig).unwrap();
}

#[test]
fn sighup_stops_the_server_and_its_etcd() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let mut s = dd.start(&[]);
    assert_eq!(tests::support::server::etcd_pids(&dd.path()).len(), 1);
    signal(&s, nix::sys::signal::Signal::SIGHUP);
    let status = s.wait(Duration::from_secs(60));
    assert!(status.success(), "{status}:\n{}", s.log_text());
    assert!(s.log_text().contains("SIGHUP"));
    assert_eq!(tests::support::server::etcd_pids(&dd.path()), Vec::<u32>::new(), "etcd left running");
}

#[test]
fn a_second_signal_kills_etcd_before_exiting() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let mut s = dd.start(&[]);
    let etcd = tests::support::server::etcd_pids(&dd.path());
    assert_eq!(etcd.len(), 1);
    signal(&s, nix::sys::signal::Signal::SIGTERM);
    s.wait_for_log("shutting down", Duration::from_secs(10));
    signal(&s, nix::sys::signal::Signal::SIGINT);
    let status = s.wait(Duration::from_secs(60));
    // Either the graceful stop won the race (0) or the second signal did (130); etcd is gone both ways.
    assert!(matches!(status.code(), Some(0) | Some(130)), "{status}:\n{}", s.log_text());
    tests::support::server::wait_until("etcd to be gone", Duration::from_secs(10), || {
        !std::path::Path::new(&format!("/proc/{}", etcd[0])).exists()
            || std::fs::read_to_string(format!("/proc/{}/stat", etcd[0])).is_ok_and(|st| st.contains(") Z "))
    });
}

/// An HTTPS server on loopback that answers every request with `response` (a lying supervisor
/// API: the joiner talks to it before it can verify anything). Runs until the test ends.
fn lying_supervisor(response: Vec<u8>) -> u16 {
    let (_, cert_pem, key_pem) = tests::support::s3::make_certs();
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_bytes()).map(Result::unwrap).collect();
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes()).unwrap().unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let response = Arc::new(response);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, response) = (acceptor.clone(), response.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let mut buf = [0u8; 4096];
                    let _ = tls.read(&mut buf).await;
                    let _ = tls.write_all(&response).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
    });
    port
}

#[test]
fn a_joiner_refuses_a_huge_cacerts_answer_and_escapes_an_error_body() {
    let mut huge = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-pem-file\r\nConnection: close\r\n\r\n".to_vec();
    huge.extend(std::iter::repeat_n(b'A', 3 << 20));
    let garbled =
        b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\r\n\x1b[2J\x1b[31mfake prompt$ \x07".to_vec();
    let port = lying_supervisor(huge);
    let dd = DataDir::new(EtcdVersion::V3_5);
    let run = dd.run(&[&format!("--server=https://127.0.0.1:{port}"), "--token=some-secret"]);
    run.assert_fails_with("answered more than");
    assert!(!dd.db().join("etcd/member").exists(), "nothing may be written for a refused join");

    // A 503 means "try again later": the joiner waits, and says why in its log, escaped.
    let port = lying_supervisor(garbled);
    let dd = DataDir::new(EtcdVersion::V3_5);
    let mut s = dd.spawn(&[&format!("--server=https://127.0.0.1:{port}"), "--token=some-secret"]);
    s.wait_for_log("answered 503", Duration::from_secs(30));
    let log = s.log_text();
    assert!(!log.contains('\x1b') && !log.contains('\x07'), "raw control bytes in the log: {log:?}");
    assert!(log.contains("fake prompt"), "{log}");
}

#[test]
fn a_dead_scheduler_stops_the_server_with_an_error_and_stops_etcd() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let mut cmd = dd.command(&["--etcd-snapshot-schedule-cron=@every 1s"]);
    cmd.env("K3S_SNAPSHOT_TEST_SCHEDULER_PANIC", "fire");
    let mut s = dd.spawn_command(cmd);
    let status = s.wait(Duration::from_secs(120));
    assert_eq!(status.code(), Some(1), "{}", s.log_text());
    assert!(s.log_text().contains("scheduled snapshots stopped (its task panicked)"), "{}", s.log_text());
    assert_eq!(tests::support::server::etcd_pids(&dd.path()), Vec::<u32>::new(), "etcd left running");
}

/// Status and body of `POST /db/snapshot` with `body`, authenticated with `token` when given.
async fn post_snapshot(s: &Server, token: Option<&str>, body: Vec<u8>) -> (u16, String) {
    let mut req = s.http().post(format!("{}/db/snapshot", s.api())).body(body);
    if let Some(t) = token {
        req = req.basic_auth("server", Some(t));
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[test]
fn snapshot_requests_that_are_unauthenticated_huge_traversing_or_unknown_are_refused() {
    let dd = DataDir::new(EtcdVersion::V3_5);
    let s = dd.start(&["--etcd-disable-snapshots"]);
    let token = dd.token();
    let save = br#"{"operation":"save"}"#.to_vec();
    let (code, _) = block_on(post_snapshot(&s, None, save.clone()));
    assert_eq!(code, 401, "no token, no snapshot");

    // A body beyond 64 KiB is not read.
    let mut huge = br#"{"operation":"save","name":[""#.to_vec();
    huge.extend(std::iter::repeat_n(b'a', 128 * 1024));
    huge.extend(br#""]}"#);
    let (code, _) = block_on(post_snapshot(&s, Some(&token), huge));
    assert_eq!(code, 413);

    // A file beside the snapshot dir that a traversing name would reach.
    let victim = dd.db().join("victim");
    std::fs::write(&victim, "keep me").unwrap();
    for name in ["../victim", "/etc/passwd", "..", ".metadata/x"] {
        let body = serde_json::json!({"operation": "delete", "name": [name]}).to_string().into_bytes();
        let (code, text) = block_on(post_snapshot(&s, Some(&token), body));
        assert_eq!(code, 400, "{name}: {text}");
    }
    assert!(victim.is_file(), "nothing outside the snapshot dir is touched");

    let (code, text) = block_on(post_snapshot(&s, Some(&token), br#"{"operation":"format-disk"}"#.to_vec()));
    assert_eq!(code, 400);
    assert!(text.contains("use save, list, delete or prune"), "{text}");
    let (code, _) = block_on(post_snapshot(&s, Some(&token), b"not json".to_vec()));
    assert_eq!(code, 400);
    let (code, _) = block_on(post_snapshot(&s, Some(&token), br#"{"operation":"save","name":["../up"]}"#.to_vec()));
    assert_eq!(code, 400, "a prefix is a file name too");
    assert!(tests::support::server::files(&dd.snapshots()).iter().all(|f| f.starts_with('.')), "nothing was saved");
    assert!(!s.log_text().contains(token.split("::server:").nth(1).unwrap()), "the token is never logged");
    s.stop();
}
