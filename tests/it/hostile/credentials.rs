//! Hostile credential services beyond the instance role (issue 29): a container credentials
//! endpoint that hangs or answers garbage, an STS that answers garbage. Either way the command
//! ends within a bound, with one line that names the source and quotes nothing it was sent.

use std::process::Command;
use std::time::{Duration, Instant};

use tests::support::bin::{self, run, Run};
use tests::support::cred_agent::{Answer, CredAgent};
use tests::support::s3::{HangingEndpoint, S3Server};

/// Stands for a secret inside a garbage answer: it must never be shown.
const MARKER: &str = "garbage-Secret-Hq2Zt8";

/// `etcd-snapshot ls --s3` with no keys; the caller adds the credential source's variables.
fn ls(s3: &S3Server, dir: &std::path::Path) -> Command {
    let mut c = bin::cmd();
    c.args(["etcd-snapshot", "ls", "--node-name", "n1", "--dir"]).arg(dir).args([
        "--s3",
        "--s3-insecure",
        "--s3-endpoint",
        &s3.endpoint,
        "--s3-bucket",
        "snaps",
    ]);
    c
}

#[track_caller]
fn assert_clear(r: &Run, source: &str, why: &str) {
    r.assert_fails_with(&format!("{source}: {why}"));
    assert_eq!(r.code, Some(1));
    assert_eq!(r.stderr.lines().filter(|l| l.starts_with("error:")).count(), 1, "{}", r.stderr);
    assert!(!r.stderr.contains(MARKER) && !r.stdout.contains(MARKER), "quoted the answer:\n{}", r.stderr);
}

#[test]
fn a_container_credentials_endpoint_that_never_answers_gives_a_bounded_clear_error() {
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let hang = HangingEndpoint::start();
    let url = format!("http://{}/v1/credentials", hang.endpoint);
    let tmp = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let r = run(ls(&s3, tmp.path()).env("AWS_CONTAINER_CREDENTIALS_FULL_URI", &url));
    // One request bounded by s3_backend::CONTAINER_TIMEOUT, then the failure is remembered.
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    assert_clear(&r, &format!("container credentials at {url}"), "no answer to the credentials request within 5s");
}

#[test]
fn a_container_credentials_endpoint_that_answers_garbage_gives_a_clear_error_quoting_none_of_it() {
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let tmp = tempfile::tempdir().unwrap();
    for (garbage, why) in [
        (format!("<html>{MARKER}</html>"), "the container credentials are not a JSON credentials document"),
        (format!("{{\"AccessKeyId\": \"{MARKER}\"}}"), "the container credentials have no SecretAccessKey"),
        (
            format!("{{\"AccessKeyId\": \"A\", \"SecretAccessKey\": \"{MARKER}\", \"Expiration\": \"soon\"}}"),
            "the container credentials have an Expiration that is not an RFC 3339 time",
        ),
    ] {
        let agent = CredAgent::start(Answer::Raw(garbage.into_bytes()));
        let url = format!("{}/v1/credentials", agent.url);
        let r = run(ls(&s3, tmp.path()).env("AWS_CONTAINER_CREDENTIALS_FULL_URI", &url));
        assert_clear(&r, &format!("container credentials at {url}"), why);
    }
}

#[test]
fn an_sts_that_answers_garbage_gives_a_clear_error_quoting_none_of_it() {
    let s3 = S3Server::start();
    s3.create_bucket("snaps");
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.web-identity.token").unwrap();
    let agent = CredAgent::start(Answer::Raw(format!("{{\"oops\": \"{MARKER}\"}}").into_bytes()));
    let r = run(ls(&s3, tmp.path())
        .env("AWS_WEB_IDENTITY_TOKEN_FILE", &token)
        .env("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/backup")
        .env("AWS_ENDPOINT_URL_STS", &agent.url));
    assert_clear(
        &r,
        &format!("STS at {}/)", agent.url),
        "STS did not answer with an XML document; check AWS_ENDPOINT_URL_STS",
    );
    assert!(!r.stderr.contains("web-identity.token"), "the token was shown:\n{}", r.stderr);
}
