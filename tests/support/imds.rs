//! A loopback instance metadata service that speaks IMDSv2 as EC2's does with IMDSv1 turned off:
//! `PUT /latest/api/token` (with `X-aws-ec2-metadata-token-ttl-seconds`) hands out a session
//! token, and every `GET` under `/latest/meta-data/` without that token is answered 401. It serves
//! one role and its credentials document (`Code`, `AccessKeyId`, `SecretAccessKey`, `Token`,
//! `Expiration`), which the test can change while it runs, or a broken answer for hostile tests.
//! Counts what it was asked. Runs on its own thread until dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The role the responder serves.
pub const ROLE: &str = "k3s-snapshot-test-role";

/// What the credentials URL answers.
#[derive(Clone, Debug)]
pub enum Answer {
    /// A credentials document with these values, expiring `lifetime` after each request.
    Credentials { access_key: String, secret_key: String, token: String, lifetime: Duration },
    /// This body, as it is (garbage for hostile tests).
    Raw(Vec<u8>),
}

#[derive(Default)]
struct Counts {
    tokens: AtomicUsize,
    credentials: AtomicUsize,
    refused: AtomicUsize,
}

/// The running responder.
pub struct ImdsResponder {
    /// `http://127.0.0.1:PORT`, for `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
    pub url: String,
    answer: Arc<Mutex<Answer>>,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
}

impl ImdsResponder {
    /// Serves [`ROLE`] with `answer` on a free loopback port.
    pub fn start(answer: Answer) -> ImdsResponder {
        Self::start_on(TcpListener::bind("127.0.0.1:0").unwrap(), answer)
    }

    /// Serves on `port` (one that was free, for a service that comes up after its clients).
    pub fn start_on_port(port: u16, answer: Answer) -> ImdsResponder {
        Self::start_on(TcpListener::bind(("127.0.0.1", port)).unwrap(), answer)
    }

    fn start_on(listener: TcpListener, answer: Answer) -> ImdsResponder {
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let answer = Arc::new(Mutex::new(answer));
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let token = format!("imds-session-{}", std::process::id());
        let (a, c, s) = (answer.clone(), counts.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (a, c, token) = (a.clone(), c.clone(), token.clone());
                        std::thread::spawn(move || serve(conn, &a, &c, &token));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        ImdsResponder { url, answer, counts, stop }
    }

    /// Changes what the credentials URL answers from now on.
    pub fn set(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    /// Session tokens handed out.
    pub fn tokens(&self) -> usize {
        self.counts.tokens.load(Ordering::SeqCst)
    }

    /// Credentials documents served.
    pub fn credentials_served(&self) -> usize {
        self.counts.credentials.load(Ordering::SeqCst)
    }

    /// Requests refused for a missing or wrong session token (IMDSv1 style requests).
    pub fn refused(&self) -> usize {
        self.counts.refused.load(Ordering::SeqCst)
    }
}

impl Drop for ImdsResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A request head: method, path, headers (names lowercased).
pub(super) struct Head {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

pub(super) fn read_head(conn: &mut TcpStream) -> Option<Head> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if buf.len() > 16 << 10 || conn.read(&mut byte).ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    let text = String::from_utf8(buf).ok()?;
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path) = (first.next()?.to_string(), first.next()?.to_string());
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(Head { method, path, headers })
}

pub(super) fn respond(conn: &mut TcpStream, status: &str, body: &[u8]) {
    let head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(body);
    let _ = conn.flush();
}

fn serve(mut conn: TcpStream, answer: &Mutex<Answer>, counts: &Counts, token: &str) {
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let Some(Head { method, path, headers }) = read_head(&mut conn) else { return };
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
    match (method.as_str(), path.as_str()) {
        ("PUT", "/latest/api/token") => match header("x-aws-ec2-metadata-token-ttl-seconds") {
            Some(ttl) if ttl.parse::<u32>().is_ok_and(|t| (1..=21600).contains(&t)) => {
                counts.tokens.fetch_add(1, Ordering::SeqCst);
                respond(&mut conn, "200 OK", token.as_bytes());
            }
            _ => respond(&mut conn, "400 Bad Request", b""),
        },
        ("GET", p) if p.starts_with("/latest/meta-data/") && header("x-aws-ec2-metadata-token") != Some(token) => {
            counts.refused.fetch_add(1, Ordering::SeqCst);
            respond(&mut conn, "401 Unauthorized", b"");
        }
        ("GET", CREDS) => respond(&mut conn, "200 OK", ROLE.as_bytes()),
        ("GET", p) if p.strip_prefix(CREDS) == Some(ROLE) => {
            counts.credentials.fetch_add(1, Ordering::SeqCst);
            let body = match answer.lock().unwrap().clone() {
                Answer::Credentials { access_key, secret_key, token, lifetime } => {
                    let now = chrono::Utc::now();
                    let expires = now + chrono::Duration::from_std(lifetime).unwrap();
                    serde_json::json!({
                        "Code": "Success",
                        "LastUpdated": now.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                        "Type": "AWS-HMAC",
                        "AccessKeyId": access_key,
                        "SecretAccessKey": secret_key,
                        "Token": token,
                        "Expiration": expires.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                    })
                    .to_string()
                    .into_bytes()
                }
                Answer::Raw(body) => body,
            };
            respond(&mut conn, "200 OK", &body);
        }
        _ => respond(&mut conn, "404 Not Found", b""),
    }
}
