//! A loopback credentials endpoint for the credential sources that are HTTP services: the
//! container credentials agent (ECS, EKS Pod Identity: a GET answered with a JSON credentials
//! document) and, for what moto's STS cannot show (a refresh within minutes), an STS answering
//! `AssumeRoleWithWebIdentity` with an XML document. It records every request's headers and
//! body, and can answer garbage (hostile tests; `s3::HangingEndpoint` is the one that hangs). Runs on its own threads until dropped.

use std::io::Read;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::imds::{read_head, respond};

/// How the endpoint answers.
#[derive(Clone, Debug)]
pub enum Answer {
    /// A container credentials document (`AccessKeyId`, `SecretAccessKey`, `Token`, `Expiration`
    /// `lifetime` from now), to requests that carry `Authorization: <auth>` (any, when `None`);
    /// others get 401.
    Container { access_key: String, secret_key: String, token: String, lifetime: Duration, auth: Option<String> },
    /// An `AssumeRoleWithWebIdentityResponse` with these credentials.
    Sts { access_key: String, secret_key: String, token: String, lifetime: Duration },
    /// This body with 200, as it is.
    Raw(Vec<u8>),
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

pub struct CredAgent {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    answer: Arc<Mutex<Answer>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

impl CredAgent {
    pub fn start(answer: Answer) -> CredAgent {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (answer, seen, stop) =
            (Arc::new(Mutex::new(answer)), Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let (a, sn, st) = (answer.clone(), seen.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        let (a, sn) = (a.clone(), sn.clone());
                        std::thread::spawn(move || {
                            conn.set_nonblocking(false).unwrap();
                            conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                            let Some(head) = read_head(&mut conn) else { return };
                            let len = head
                                .headers
                                .iter()
                                .find(|(k, _)| k == "content-length")
                                .and_then(|(_, v)| v.parse::<usize>().ok())
                                .unwrap_or(0);
                            let mut body = vec![0u8; len.min(1 << 20)];
                            if conn.read_exact(&mut body).is_err() {
                                return;
                            }
                            let seen = Seen {
                                method: head.method,
                                path: head.path,
                                headers: head.headers,
                                body: String::from_utf8_lossy(&body).into_owned(),
                            };
                            sn.lock().unwrap().push(seen.clone());
                            let answer = a.lock().unwrap().clone();
                            let now = chrono::Utc::now();
                            match answer {
                                Answer::Raw(b) => respond(&mut conn, "200 OK", &b),
                                Answer::Container { auth: Some(want), .. }
                                    if seen.header("authorization") != Some(want.as_str()) =>
                                {
                                    respond(&mut conn, "401 Unauthorized", b"")
                                }
                                Answer::Container { access_key, secret_key, token, lifetime, .. } => {
                                    let doc = serde_json::json!({
                                        "AccessKeyId": access_key,
                                        "SecretAccessKey": secret_key,
                                        "Token": token,
                                        "Expiration": rfc3339(now + chrono::Duration::from_std(lifetime).unwrap()),
                                    });
                                    respond(&mut conn, "200 OK", doc.to_string().as_bytes())
                                }
                                Answer::Sts { access_key, secret_key, token, lifetime } => {
                                    let expires = rfc3339(now + chrono::Duration::from_std(lifetime).unwrap());
                                    let doc = format!(
                                        "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>{access_key}</AccessKeyId><SecretAccessKey>{secret_key}</SecretAccessKey><SessionToken>{token}</SessionToken><Expiration>{expires}</Expiration></Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"
                                    );
                                    respond(&mut conn, "200 OK", doc.as_bytes())
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        CredAgent { url, answer, seen, stop }
    }

    pub fn set(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    /// The requests received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for CredAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
