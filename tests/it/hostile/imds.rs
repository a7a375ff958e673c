//! A hostile instance metadata service: one that hangs, and one that answers garbage. Either way
//! the command ends within a bound, with one clear line that names the service and says what to
//! set, quoting nothing it was sent.

use std::process::Command;
use std::time::{Duration, Instant};

use tests::support::bin::{self, run, Run};
use tests::support::imds::{Answer, ImdsResponder};
use tests::support::s3::{HangingEndpoint, S3Server};

/// Stands for a secret inside a garbage answer: it must never be shown.
const MARKER: &str = "garbage-Secret-Wm3Rk7";

/// `etcd-snapshot ls --s3` with no keys, the instance role at `imds`.
fn ls(s3: &S3Server, imds: &str, dir: &std::path::Path) -> Command {
    let mut c = bin::cmd();
    c.args(["etcd-snapshot", "ls", "--node-name", "n1", "--dir"])
        .arg(dir)
        .args(["--s3", "--s3-insecure", "--s3-endpoint", &s3.endpoint, "--s3-bucket", "snaps"])
        .env_remove("AWS_EC2_METADATA_DISABLED")
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds);
    c
}

#[track_caller]
fn assert_clear(r: &Run, endpoint: &str, why: &str) {
    r.assert_fails_with(&format!("instance role at {endpoint}: {why}"));
    r.assert_fails_with("set --etcd-s3-access-key and --etcd-s3-secret-key");
    assert_eq!(r.code, Some(1));
    assert_eq!(r.stderr.lines().filter(|l| l.starts_with("error:")).count(), 1, "{}", r.stderr);
    assert!(!r.stderr.contains(MARKER) && !r.stdout.contains(MARKER), "quoted the answer:\n{}", r.stderr);
}

#[test]
fn a_metadata_service_that_never_answers_gives_a_bounded_clear_error() {
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let hang = HangingEndpoint::start();
    let url = format!("http://{}", hang.endpoint);
    let tmp = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let r = run(&mut ls(&s3, &url, tmp.path()));
    // One lookup bounded by s3_backend::IMDS_TIMEOUT, then the failure is remembered.
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    assert_clear(&r, &url, "no answer to the session token request (PUT /latest/api/token) within 2s");
}

#[test]
fn a_metadata_service_that_answers_garbage_gives_a_clear_error_quoting_none_of_it() {
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let imds = ImdsResponder::start(Answer::Raw(Vec::new()));
    let tmp = tempfile::tempdir().unwrap();
    let role = format!("the credentials of role {}", tests::support::imds::ROLE);
    let answer = "the answer to the role's credentials";
    let doc =
        |fields: &str| format!(r#"{{"Code":"Success","AccessKeyId":"AKIA","SecretAccessKey":"{MARKER}"{fields}}}"#);
    let cases: Vec<(Vec<u8>, String)> = vec![
        (
            format!("not json {MARKER}").into(),
            format!("{role} are not a JSON credentials document (error at line 1 column"),
        ),
        (
            format!(r#"{{"Code":"Success","AccessKeyId":5,"SecretAccessKey":"{MARKER}"}}"#).into(),
            format!("{role} are not a JSON credentials document"),
        ),
        (doc(r#","Token":"t""#).into(), format!("{role} have no Expiration")),
        (
            doc(&format!(r#","Expiration":"{MARKER}""#)).into(),
            format!("{role} have an Expiration that is not an RFC 3339 time"),
        ),
        (doc(r#","Expiration":"2001-01-01T00:00:00Z""#).into(), format!("{role} expired at 2001-01-01T00:00:00+00:00")),
        (format!(r#"{{"Code":"{MARKER}"}}"#).into(), format!("{role} are not available (their Code is not Success)")),
        (MARKER.repeat(100_000).into(), format!("{answer} is larger than 64 KiB")),
        (vec![0xff, 0xfe, 0x00], format!("{answer} is not UTF-8 text")),
    ];
    for (body, why) in cases {
        imds.set(Answer::Raw(body));
        let r = run(&mut ls(&s3, &imds.url, tmp.path()));
        assert_clear(&r, &imds.url, &why);
    }
}
