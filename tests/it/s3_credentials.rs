//! Where S3 credentials come from, as k3s finds them (minio-go's chain, read in k3s's
//! `pkg/etcd/s3/s3.go` and minio-go's `pkg/credentials`): the key flags (or `AWS_ACCESS_KEY_ID`/
//! `AWS_SECRET_ACCESS_KEY`), then the shared credentials file (`~/.aws/credentials`, `AWS_PROFILE`,
//! `AWS_SHARED_CREDENTIALS_FILE`), then the instance role through IMDSv2
//! (`AWS_EC2_METADATA_SERVICE_ENDPOINT`), against s3s-fs, which checks every SigV4 signature.
//! The credentials files are written as the AWS CLI writes them (`aws configure`): INI sections
//! named after the profile, `aws_access_key_id`/`aws_secret_access_key`/`aws_session_token`.
//! Beyond k3s (issue 29): web identity (moto's STS; a loopback STS for a refresh within
//! seconds), container credentials (a loopback agent), `credential_process`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use k3s_snapshot_core::store::{PutOptions, SnapshotStore};
use s3_backend::{CredentialChain, S3Config, S3Store, WebIdentityConfig};
use tests::support::bin::{self, run, Run};
use tests::support::cred_agent::{Answer as CredAnswer, CredAgent};
use tests::support::etcd::{Etcd, EtcdVersion};
use tests::support::imds::{Answer, ImdsResponder};
use tests::support::moto::MotoServer;
use tests::support::s3::{S3Server, TlsProxy, ACCESS_KEY, SECRET_KEY};

/// A secret the S3 server does not accept.
const WRONG_SECRET: &str = "wr0ng-Secret-Tq5Lx8Vb";
/// The session token the metadata service hands out with the role's credentials.
const SESSION_TOKEN: &str = "role-session-token-Nc4Jw9Ke";

/// `etcd-snapshot <args> --s3 …` with no key flags: the chain finds the credentials.
fn snap(etcd: &Etcd, dir: &Path, s3: &S3Server, args: &[&str]) -> Command {
    let mut c = bin::cmd();
    c.arg("etcd-snapshot")
        .args(args)
        .args(["--etcd-endpoints", &etcd.endpoint, "--node-name", "n1", "--dir"])
        .arg(dir)
        .args(["--s3", "--s3-insecure", "--s3-endpoint", &s3.endpoint, "--s3-bucket", "snaps"]);
    c
}

/// A credentials file as `aws configure` writes it.
fn credentials_file(path: &Path, profiles: &[(&str, &str, &str)]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut text = String::new();
    for (profile, key, secret) in profiles {
        text.push_str(&format!("[{profile}]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n\n"));
    }
    std::fs::write(path, text).unwrap();
}

#[track_caller]
fn assert_no_secrets(r: &Run) {
    for s in [SECRET_KEY, WRONG_SECRET, SESSION_TOKEN] {
        assert!(!r.stdout.contains(s) && !r.stderr.contains(s), "a secret leaked:\n{}\n{}", r.stdout, r.stderr);
    }
}

/// `save` then `ls`: the snapshot is in the bucket and listed.
#[track_caller]
fn save_and_list(etcd: &Etcd, s3: &S3Server, env: impl Fn(&mut Command) -> &mut Command) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snapshots");
    let r = run(env(&mut snap(etcd, &dir, s3, &["save"])).env("K3S_SNAPSHOT_LOG", "debug"));
    r.assert_ok();
    assert_no_secrets(&r);
    let name = std::fs::read_dir(&dir).unwrap().next().unwrap().unwrap().file_name().into_string().unwrap();
    assert!(s3.root.join("snaps").join(&name).is_file(), "{name} is not in the bucket");
    let ls = run(env(&mut snap(etcd, &dir, s3, &["ls"])).env("K3S_SNAPSHOT_LOG", "debug"));
    ls.assert_ok();
    assert_no_secrets(&ls);
    assert!(ls.stdout.lines().any(|l| l.starts_with(&name) && l.contains("s3://snaps/")), "{}", ls.stdout);
    name
}

/// etcd, s3s-fs with the bucket `snaps`, a scratch dir.
fn setup() -> (Etcd, S3Server, tempfile::TempDir) {
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    (Etcd::start(EtcdVersion::V3_5), s3, tempfile::tempdir().unwrap())
}

#[test]
fn a_shared_credentials_file_stands_in_for_the_key_flags() {
    let (etcd, s3, tmp) = setup();

    // ~/.aws/credentials, profile default.
    let home = tmp.path().join("home");
    credentials_file(&home.join(".aws/credentials"), &[("default", ACCESS_KEY, SECRET_KEY)]);
    save_and_list(&etcd, &s3, |c| c.env("HOME", &home).env_remove("AWS_SHARED_CREDENTIALS_FILE"));

    // AWS_SHARED_CREDENTIALS_FILE elsewhere; AWS_PROFILE picks a profile (either spelling).
    let file = tmp.path().join("elsewhere/creds");
    credentials_file(
        &file,
        &[
            ("default", ACCESS_KEY, WRONG_SECRET),
            ("backup", ACCESS_KEY, SECRET_KEY),
            ("profile other", ACCESS_KEY, SECRET_KEY),
        ],
    );
    for profile in ["backup", "other"] {
        save_and_list(&etcd, &s3, |c| c.env("AWS_SHARED_CREDENTIALS_FILE", &file).env("AWS_PROFILE", profile));
    }
    // Without AWS_PROFILE the default profile's (wrong) secret is used, and the refusal says whose.
    let r = run(snap(&etcd, &tmp.path().join("d"), &s3, &["ls"]).env("AWS_SHARED_CREDENTIALS_FILE", &file));
    r.assert_fails_with(&format!("profile default of the shared credentials file {}", file.display()));
    assert_no_secrets(&r);
}

#[test]
fn the_key_flags_win_over_the_shared_credentials_file() {
    let (etcd, s3, tmp) = setup();
    let right = tmp.path().join("right");
    credentials_file(&right, &[("default", ACCESS_KEY, SECRET_KEY)]);
    let wrong = tmp.path().join("wrong");
    credentials_file(&wrong, &[("default", ACCESS_KEY, WRONG_SECRET)]);

    // Wrong flags, right file: the flags are used (and refused).
    let r = run(snap(&etcd, &tmp.path().join("d1"), &s3, &["ls"]).env("AWS_SHARED_CREDENTIALS_FILE", &right).args([
        "--s3-access-key",
        ACCESS_KEY,
        "--s3-secret-key",
        WRONG_SECRET,
    ]));
    r.assert_fails_with("the credentials of --etcd-s3-access-key/--etcd-s3-secret-key");
    assert_no_secrets(&r);
    // The same through the environment variables of the flags.
    let r = run(snap(&etcd, &tmp.path().join("d2"), &s3, &["ls"])
        .env("AWS_SHARED_CREDENTIALS_FILE", &right)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", WRONG_SECRET));
    r.assert_fails_with("AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY");
    assert_no_secrets(&r);
    // Right flags, wrong file: works.
    save_and_list(&etcd, &s3, |c| {
        c.env("AWS_SHARED_CREDENTIALS_FILE", &wrong).args([
            "--s3-access-key",
            ACCESS_KEY,
            "--s3-secret-key",
            SECRET_KEY,
        ])
    });
}

#[test]
fn an_instance_role_stands_in_for_the_key_flags_through_imdsv2() {
    let (etcd, s3, _tmp) = setup();
    let imds = ImdsResponder::start(Answer::Credentials {
        access_key: ACCESS_KEY.into(),
        secret_key: SECRET_KEY.into(),
        token: SESSION_TOKEN.into(),
        lifetime: Duration::from_secs(6 * 3600),
    });
    save_and_list(&etcd, &s3, |c| {
        c.env_remove("AWS_EC2_METADATA_DISABLED").env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds.url)
    });
    assert!(imds.tokens() >= 2 && imds.credentials_served() >= 2, "one lookup per command");
    assert_eq!(imds.refused(), 0, "a request came without the IMDSv2 session token");
}

#[test]
fn a_malformed_shared_credentials_file_is_an_error_naming_it_and_quoting_nothing() {
    let (etcd, s3, tmp) = setup();
    let file = tmp.path().join("credentials");
    std::fs::write(&file, format!("[default]\naws_secret_access_key = {SECRET_KEY}\n{SECRET_KEY}\n")).unwrap();
    let r = run(snap(&etcd, &tmp.path().join("d"), &s3, &["ls"]).env("AWS_SHARED_CREDENTIALS_FILE", &file));
    r.assert_fails_with(&format!("the shared credentials file {} is malformed: line 3", file.display()));
    assert_eq!(r.code, Some(1));
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert_no_secrets(&r);
    // Half a key is no better.
    std::fs::write(&file, "[default]\naws_access_key_id = AKIAEXAMPLE\n").unwrap();
    let r = run(snap(&etcd, &tmp.path().join("d"), &s3, &["ls"]).env("AWS_SHARED_CREDENTIALS_FILE", &file));
    r.assert_fails_with("has aws_access_key_id but no aws_secret_access_key");
}

#[test]
fn without_any_credentials_the_refusal_says_which_sources_were_tried() {
    let (etcd, s3, tmp) = setup();
    let r = run(&mut snap(&etcd, &tmp.path().join("d"), &s3, &["ls"]));
    r.assert_fails_with("anonymous requests: no credentials found (no --etcd-s3-access-key or AWS_ACCESS_KEY_ID; ");
    r.assert_fails_with(&format!("no shared credentials file at {}", bin::NO_CREDENTIALS_FILE));
    r.assert_fails_with("instance role lookup off (AWS_EC2_METADATA_DISABLED)");
    r.assert_fails_with("set --etcd-s3-access-key and --etcd-s3-secret-key");
}

/// Waits (polling, with a deadline) until `cond` holds.
async fn eventually(what: &str, timeout: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every request of the store, the streamed PUT included, carries the role's session token;
/// credentials that near their expiry are fetched again and the new token is used from then on.
/// nginx (TLS in front of s3s-fs) records the `x-amz-security-token` of each request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_role_credentials_sign_every_request_with_their_token_and_are_refreshed() {
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let tls = TlsProxy::start(&s3);
    let role = |token: &str| Answer::Credentials {
        access_key: ACCESS_KEY.into(),
        secret_key: SECRET_KEY.into(),
        token: token.into(),
        // Short-lived: refreshed at half their life.
        lifetime: Duration::from_secs(4),
    };
    let imds = ImdsResponder::start(role("token-one"));
    let cfg = S3Config {
        endpoint_ca: Some(tls.ca_file.clone()),
        access_key: String::new(),
        secret_key: String::new(),
        credential_chain: CredentialChain {
            shared_file: None,
            profile: String::new(),
            imds_endpoint: Some(imds.url.clone()),
            ..CredentialChain::default()
        },
        ..tls.config("snaps")
    };
    let store = S3Store::new(&cfg).unwrap();
    assert_eq!(imds.tokens(), 0, "building the store must not ask the metadata service");
    store.check().await.unwrap();
    assert_eq!((imds.tokens(), imds.credentials_served()), (1, 1));

    let small = Bytes::from(vec![7u8; 1000]);
    let big = Bytes::from(vec![9u8; 9 << 20]); // above the part size: one streamed PUT
    let opts = |n: usize| PutOptions { size_hint: Some(n as u64), ..PutOptions::default() };
    let body = |b: &Bytes| futures::stream::iter([Ok(b.clone())]).boxed();
    store.put("s-n1-100", body(&small), opts(small.len())).await.unwrap();
    store.put("s-n1-101", body(&big), opts(big.len())).await.unwrap();
    let (_, got) = store.get("s-n1-101").await.unwrap();
    let got: Vec<Bytes> = got.try_collect().await.unwrap();
    assert_eq!(got.concat().len(), big.len());
    let listed: Vec<_> = store.list("s-").try_collect().await.unwrap();
    assert_eq!(listed.len(), 2);
    let requests = tls.requests();
    assert!(requests.iter().any(|l| l.starts_with("PUT /snaps/s-n1-101 ")), "{requests:#?}");
    assert!(requests.iter().all(|l| l.ends_with("token=token-one")), "a request without the token: {requests:#?}");

    imds.set(role("token-two"));
    eventually("the credentials to be refreshed", Duration::from_secs(20), async || {
        store.head("s-n1-100").await.unwrap().is_some() && imds.credentials_served() >= 2
    })
    .await;
    let seen = tls.requests().len();
    store.put("s-n1-102", body(&big), opts(big.len())).await.unwrap();
    assert!(store.head("s-n1-102").await.unwrap().is_some());
    let after: Vec<String> = tls.requests().split_off(seen);
    assert!(!after.is_empty() && after.iter().all(|l| l.ends_with("token=token-two")), "{after:#?}");
    assert_eq!(imds.refused(), 0);
    assert!(format!("{store:?}").len() < 400 && !format!("{store:?}").contains(SECRET_KEY));
}

/// A web identity token exchanged with moto's STS (`AssumeRoleWithWebIdentity` at
/// `AWS_ENDPOINT_URL_STS`): every request to the bucket is signed with the assumed role's key and
/// carries its session token, as nginx in front of moto records (moto checks no signature, so
/// the record is the proof), and moto's STS shows the role and session name asked for.
#[test]
fn web_identity_from_moto_sts_signs_every_request_with_the_assumed_role() {
    let moto = MotoServer::start();
    moto.create_bucket("snaps");
    let recorder = TlsProxy::in_front_of(moto.port(), false);
    let etcd = Etcd::start(EtcdVersion::V3_5);
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.eks-service-account.token\n").unwrap();
    let role = "arn:aws:iam::123456789012:role/k3s-backup";
    let dir = tmp.path().join("snapshots");
    for args in [&["save"][..], &["ls"]] {
        let mut c = bin::cmd();
        c.arg("etcd-snapshot")
            .args(args)
            .args(["--etcd-endpoints", &etcd.endpoint, "--node-name", "n1", "--dir"])
            .arg(&dir)
            .args(["--s3", "--s3-insecure", "--s3-endpoint", &recorder.endpoint, "--s3-bucket", "snaps"])
            .env("AWS_WEB_IDENTITY_TOKEN_FILE", &token)
            .env("AWS_ROLE_ARN", role)
            .env("AWS_ROLE_SESSION_NAME", "k3s-node-1")
            .env("AWS_ENDPOINT_URL_STS", format!("http://{}", moto.endpoint));
        let r = run(&mut c);
        r.assert_ok();
        assert!(!r.stderr.contains("eks-service-account"), "the token was shown:\n{}", r.stderr);
    }
    let sessions = moto.assumed_roles();
    assert!(!sessions.is_empty() && sessions.iter().all(|s| s.0 == role && s.1 == "k3s-node-1"), "{sessions:?}");
    let requests = recorder.requests();
    assert!(requests.iter().any(|l| l.starts_with("PUT /snaps/on-demand-n1-")), "{requests:#?}");
    for l in &requests {
        let signed_by_a_session = sessions
            .iter()
            .any(|s| l.contains(&format!("Credential={}/", s.2)) && l.ends_with(&format!("token={}", s.3)));
        assert!(signed_by_a_session, "not signed with an assumed role's credentials: {l}");
    }
}

/// The token file is read again at each refresh: with credentials that live 4 s, the next
/// exchange sends the token the platform rotated into the file. The loopback STS hands out the
/// key s3s-fs accepts, and s3s-fs checks every signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_identity_reads_its_token_file_again_at_each_refresh() {
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let sts = CredAgent::start(CredAnswer::Sts {
        access_key: ACCESS_KEY.into(),
        secret_key: SECRET_KEY.into(),
        token: SESSION_TOKEN.into(),
        lifetime: Duration::from_secs(4),
    });
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, "token-one").unwrap();
    let cfg = S3Config {
        access_key: String::new(),
        secret_key: String::new(),
        credential_chain: CredentialChain {
            web_identity: Some(WebIdentityConfig {
                token_file: token.clone(),
                role_arn: "arn:aws:iam::123456789012:role/k3s-backup".into(),
                session_name: None,
                sts_endpoint: Some(sts.url.clone()),
            }),
            ..CredentialChain::default()
        },
        ..s3.config("snaps")
    };
    let store = S3Store::new(&cfg).unwrap();
    assert!(sts.seen().is_empty(), "building the store must not ask STS");
    store.check().await.unwrap();
    let first = sts.seen();
    assert_eq!(first.len(), 1);
    assert!(
        first[0].body.contains("Action=AssumeRoleWithWebIdentity")
            && first[0].body.contains("WebIdentityToken=token-one"),
        "{:?}",
        first[0].body
    );
    std::fs::write(&token, "token-two").unwrap();
    eventually("a refresh", Duration::from_secs(20), async || {
        store.check().await.unwrap();
        sts.seen().len() >= 2
    })
    .await;
    assert!(sts.seen()[1].body.contains("WebIdentityToken=token-two"), "{:?}", sts.seen()[1].body);
}

/// EKS Pod Identity / ECS: the container credentials endpoint, asked with the token in
/// `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`, hands out the key s3s-fs checks.
#[test]
fn container_credentials_with_the_authorization_token_file_stand_in_for_the_key_flags() {
    let (etcd, s3, tmp) = setup();
    let agent = CredAgent::start(CredAnswer::Container {
        access_key: ACCESS_KEY.into(),
        secret_key: SECRET_KEY.into(),
        token: SESSION_TOKEN.into(),
        lifetime: Duration::from_secs(3600),
        auth: Some("pod-identity-token".into()),
    });
    let token_file = tmp.path().join("eks-pod-identity-token");
    std::fs::write(&token_file, "pod-identity-token\n").unwrap();
    let url = format!("{}/v1/credentials", agent.url);
    save_and_list(&etcd, &s3, |c| {
        c.env("AWS_CONTAINER_CREDENTIALS_FULL_URI", &url).env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &token_file)
    });
    let seen = agent.seen();
    assert!(
        !seen.is_empty() && seen.iter().all(|s| s.header("authorization") == Some("pod-identity-token")),
        "{seen:?}"
    );
    // Without the token the agent refuses, and the refusal names the source.
    let r = run(snap(&etcd, &tmp.path().join("d"), &s3, &["ls"]).env("AWS_CONTAINER_CREDENTIALS_FULL_URI", &url));
    r.assert_fails_with(&format!("container credentials at {url}: the credentials request was answered with http 401"));
    assert_no_secrets(&r);
}

/// `credential_process` in a profile of the config file: its JSON document holds the key s3s-fs
/// checks.
#[test]
fn credential_process_in_the_profile_stands_in_for_the_key_flags() {
    let (etcd, s3, tmp) = setup();
    let doc = serde_json::json!({
        "Version": 1,
        "AccessKeyId": ACCESS_KEY,
        "SecretAccessKey": SECRET_KEY,
        "SessionToken": SESSION_TOKEN,
        "Expiration": (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339(),
    });
    let helper = tmp.path().join("creds.json");
    std::fs::write(&helper, doc.to_string()).unwrap();
    let config = tmp.path().join("config");
    std::fs::write(&config, format!("[profile backup]\ncredential_process = cat {}\n", helper.display())).unwrap();
    save_and_list(&etcd, &s3, |c| c.env("AWS_CONFIG_FILE", &config).env("AWS_PROFILE", "backup"));
}
