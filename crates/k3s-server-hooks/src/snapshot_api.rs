//! `etcd-snapshot save|ls|delete|prune` done by a running server: `POST /db/snapshot` on the
//! supervisor API, and the client the CLI uses for `--etcd-server URL --etcd-token T`. An operator
//! then needs no etcd client certificate; the server works with its own etcd connection, snapshot
//! dir and S3 settings and answers what it did.
//!
//! The wire format is k3s's (pkg/etcd/snapshot_handler.go and pkg/cluster/managed, read for the
//! field names): a JSON [`SnapshotRequest`] `{"operation": "save"|"list"|"delete"|"prune", "name":
//! [..], "dir", "compress", "retention", "s3"}` with basic auth `server:<token>`; `list` answers the
//! [`SnapshotFileList`] that `ls -o json` prints, the others a [`SnapshotResult`] `{"created":
//! [..], "deleted": [..]}`, to which we add `locations` and `errors` (a k3s client ignores them).
//! Warnings travel as `Warning: 299 - "…"` headers, as k3s sends them.
//!
//! Where k3s lets the request override the server's settings, we do not: a request cannot point
//! the server at another directory or another S3 endpoint or bucket (those would let a token holder
//! write files anywhere the server can, or make it send data to any host). `dir` and S3 fields in
//! a request are ignored with a warning; asking for S3 from a server without S3 is refused.
//! `name` (the prefix of a save or prune), `compress` and `retention` are honoured.
//!
//! A save with S3 goes through the server's upload queue ([`crate::upload_queue`]): the snapshot
//! lock is held for the local save only. When S3 answered the last upload and nothing waits, the
//! save streams to S3 as it writes and the answer waits for that first attempt (and the file sent
//! again on a retryable error), as before the queue: `uploaded`, or an error saying it stays
//! queued. When other uploads wait or S3 is failing, the answer does not wait behind them: the
//! snapshot is `queued` (a location with that action), with a warning naming how many wait, or an
//! error with S3's last failure; the queue uploads it when S3 answers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use k3s_snapshot_core::etcd::EtcdClientConfig;
use k3s_snapshot_core::k3s_list::{self, S3Origin, SnapshotFileList};
use k3s_snapshot_core::list::list_snapshots;
use k3s_snapshot_core::name;
use k3s_snapshot_core::progress::NoProgress;
use k3s_snapshot_core::retention::{prune, RetentionPolicy};
use k3s_snapshot_core::save::{save, SaveOptions};
use k3s_snapshot_core::status::printable;
use k3s_snapshot_core::store::{LocalStore, SnapshotStore};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::https_client::{self, read_capped, Capped};
use crate::token::{ca_hash, Token};
use crate::upload_queue::UploadQueue;
use crate::{Error, Result};

/// The route.
pub const PATH: &str = "/db/snapshot";
/// The largest request body the server reads (a request is a few hundred bytes).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Names one delete request may carry.
pub const MAX_NAMES: usize = 1000;
/// The largest answer the client reads (a list of thousands of snapshots with their metadata).
const MAX_ANSWER_BYTES: usize = 64 << 20;
/// The prefix of a save or prune whose request names none (the CLI's `--name` default).
const DEFAULT_PREFIX: &str = "on-demand";

/// What the client asks (k3s's `SnapshotRequest`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SnapshotRequest {
    pub operation: String,
    /// The prefix of a save or prune, or the file names to delete.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub name: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<i64>,
    /// Present: the client wants S3 too. Its fields (k3s's `EtcdS3`) are not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<serde_json::Value>,
}

/// One file a request created or deleted, where it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Located {
    pub name: String,
    pub location: String,
    /// `saved`, `uploaded`, `queued` (for upload by the server's queue), `deleted` or `pruned`.
    pub action: String,
}

/// The answer of save, delete and prune (k3s's `SnapshotResult`, plus ours).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SnapshotResult {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub created: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub locations: Vec<Located>,
    /// What failed after something was done (an upload after the local save): the request as a
    /// whole failed, but `created` is real.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// The server's snapshot settings and the lock it shares with scheduled snapshots.
pub struct SnapshotService {
    pub local: LocalStore,
    pub remote: Option<Arc<dyn SnapshotStore>>,
    /// How `ls` shows the S3 rows' origin.
    pub remote_origin: Option<S3Origin>,
    pub node: String,
    /// `--etcd-snapshot-compress`, when the request does not say.
    pub compress: bool,
    /// `--etcd-snapshot-encryption-recipients-file`: requested snapshots are encrypted as
    /// scheduled ones are.
    pub encryption: Option<Arc<k3s_snapshot_core::encryption::Recipients>>,
    pub token_hash: String,
    /// `--etcd-snapshot-retention`, when a prune request does not say.
    pub retention: i64,
    /// `--etcd-s3-retention`.
    pub remote_retention: i64,
    /// With S3: saves are uploaded through the server's queue.
    pub queue: Option<Arc<UploadQueue>>,
    pub etcd: EtcdClientConfig,
    /// Held by whichever snapshot runs: a scheduled one skips while it is held, a requested one
    /// waits.
    pub lock: Arc<tokio::sync::Mutex<()>>,
    /// Requests run here, so that a client that goes away never interrupts a save half-way, and
    /// shutdown waits for them.
    pub tracker: TaskTracker,
    pub cancel: CancellationToken,
}

/// A refusal or failure: status and a one-line message.
struct Failure(StatusCode, String);

impl Failure {
    fn bad(msg: impl Into<String>) -> Failure {
        Failure(StatusCode::BAD_REQUEST, msg.into())
    }
}

/// `POST /db/snapshot` from `peer`, whose token the API checked.
pub async fn handle(service: Arc<SnapshotService>, peer: SocketAddr, body: Bytes) -> Response {
    let req: SnapshotRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return text(StatusCode::BAD_REQUEST, &format!("not a snapshot request: {e}"), &[]),
    };
    let mut warnings = Vec::new();
    if let Err(Failure(status, msg)) = service.check(&req, &mut warnings) {
        return text(status, &msg, &warnings);
    }
    tracing::info!(operation = %req.operation, source = %peer.ip(), "snapshot request");
    // Run to the end even if the client goes away.
    let task = {
        let service = service.clone();
        service.tracker.clone().spawn(async move { service.run(req).await })
    };
    let answer = match task.await {
        Ok(a) => a,
        Err(e) => Err(Failure(StatusCode::INTERNAL_SERVER_ERROR, format!("the snapshot request failed: {e}"))),
    };
    match answer {
        Ok((json, more)) => {
            warnings.extend(more);
            let mut resp = ([(header::CONTENT_TYPE, "application/json")], json).into_response();
            add_warnings(resp.headers_mut(), &warnings);
            resp
        }
        Err(Failure(status, msg)) => {
            tracing::warn!(error = %msg, "snapshot request failed");
            text(status, &msg, &warnings)
        }
    }
}

fn text(status: StatusCode, msg: &str, warnings: &[String]) -> Response {
    let mut resp = (status, format!("{msg}\n")).into_response();
    add_warnings(resp.headers_mut(), warnings);
    resp
}

/// `Warning: 299 - "text"` (RFC 7234), as k3s sends them; quotes and backslashes escaped.
fn add_warnings(headers: &mut HeaderMap, warnings: &[String]) {
    for w in warnings {
        // `printable` escapes control characters, quotes and backslashes, as a quoted-string needs.
        let escaped = printable(w);
        if let Ok(v) = HeaderValue::from_str(&format!("299 - \"{escaped}\"")) {
            headers.append(header::WARNING, v);
        }
    }
}

/// The text of `Warning` headers.
fn warnings_of(headers: &reqwest::header::HeaderMap) -> Vec<String> {
    headers
        .get_all(reqwest::header::WARNING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| {
            let quoted = v.split_once(" - ").map(|(_, q)| q).unwrap_or(v).trim();
            let inner = quoted.strip_prefix('"').and_then(|q| q.strip_suffix('"')).unwrap_or(quoted);
            inner.replace("\\\"", "\"").replace("\\\\", "\\")
        })
        .collect()
}

impl SnapshotService {
    /// Everything that can be refused, before anything is done.
    fn check(&self, req: &SnapshotRequest, warnings: &mut Vec<String>) -> std::result::Result<(), Failure> {
        match req.operation.as_str() {
            "save" | "prune" => {
                if let Some(prefix) = req.name.first() {
                    name::validate_prefix(prefix).map_err(|e| Failure::bad(format!("name: {e}")))?;
                }
            }
            "delete" => {
                if req.name.is_empty() {
                    return Err(Failure::bad("no snapshots given for removal"));
                }
                if req.name.len() > MAX_NAMES {
                    return Err(Failure::bad(format!("at most {MAX_NAMES} snapshots per delete request")));
                }
                for n in &req.name {
                    name::validate_file_name(n).map_err(|e| Failure::bad(e.to_string()))?;
                }
            }
            "list" => {}
            other => {
                return Err(Failure::bad(format!(
                    "invalid snapshot operation {:?}: use save, list, delete or prune",
                    printable(other)
                )))
            }
        }
        if let Some(dir) = &req.dir {
            if std::path::Path::new(dir) != self.local.dir() {
                warnings.push(format!(
                    "the snapshot dir {} in the request is ignored: this server uses its own, {}",
                    printable(dir),
                    self.local.dir().display()
                ));
            }
        }
        if let Some(s3) = &req.s3 {
            if self.remote.is_none() {
                return Err(Failure::bad(
                    "this server has no S3 configured: start it with --etcd-s3 and the --etcd-s3-* settings, or ask without --etcd-s3",
                ));
            }
            if names_a_destination(s3) {
                warnings.push(
                    "the S3 settings in the request are ignored: this server uploads with its own --etcd-s3-* settings"
                        .into(),
                );
            }
        }
        Ok(())
    }

    async fn run(&self, req: SnapshotRequest) -> std::result::Result<(Vec<u8>, Vec<String>), Failure> {
        match req.operation.as_str() {
            "save" => self.save(&req).await.map(|(r, w)| (to_json(&r), w)),
            "list" => self.list().await.map(|l| (to_json(&l), Vec::new())),
            "delete" => self.delete(&req.name).await.map(|(r, w)| (to_json(&r), w)),
            "prune" => self.prune(&req).await.map(|r| (to_json(&r), Vec::new())),
            _ => unreachable!("checked"),
        }
    }

    fn remote_ref(&self) -> Option<&dyn SnapshotStore> {
        self.remote.as_deref()
    }

    async fn save(&self, req: &SnapshotRequest) -> std::result::Result<(SnapshotResult, Vec<String>), Failure> {
        let opts = SaveOptions {
            prefix: req.name.first().cloned().unwrap_or_else(|| DEFAULT_PREFIX.into()),
            node: self.node.clone(),
            compress: req.compress.unwrap_or(self.compress),
            token_hash: Some(self.token_hash.clone()),
            encryption: self.encryption.clone(),
        };
        let held = {
            crate::drills::preempt();
            self.lock.clone().lock_owned().await
        };
        let unavailable = |e: &dyn std::fmt::Display| Failure(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
        let mut conn = self.etcd.connect().await.map_err(|e| unavailable(&e))?;
        let saved = match &self.queue {
            Some(q) => q.save(&mut conn, &opts, &self.cancel).await.map(|q| (q.saved.clone(), Some(q))),
            None => save(&mut conn, &self.local, &opts, None, &NoProgress, &self.cancel).await.map(|s| (s, None)),
        };
        // The lock covers the local save only; an upload is the queue's.
        drop(held);
        let (local, queued) = match saved {
            Ok(v) => v,
            Err(k3s_snapshot_core::Error::Cancelled) => {
                return Err(unavailable(&"the server is shutting down; nothing was kept"))
            }
            Err(e) => return Err(Failure(StatusCode::INTERNAL_SERVER_ERROR, format!("snapshot failed: {e}"))),
        };
        let name = local.metadata.name.clone();
        tracing::info!(snapshot = %name, size = local.metadata.size, "requested snapshot saved");
        let mut result = SnapshotResult { created: vec![name.clone()], ..Default::default() };
        result.locations.push(Located {
            name: name.clone(),
            location: self.local.location(&name),
            action: "saved".into(),
        });
        let mut warnings = Vec::new();
        if let (Some(q), Some(queued)) = (&self.queue, queued) {
            let remote = q.remote();
            let kept = |why: String| {
                format!(
                    "snapshot {name} is saved on the server at {}, but it is not in {} yet: {why}; it stays in the server's upload queue and is uploaded when s3 answers",
                    local.path.display(),
                    remote.describe()
                )
            };
            match queued.first_attempt {
                Some(rx) => match rx.await {
                    Ok(Ok(_)) => result.locations.push(Located {
                        name: name.clone(),
                        location: remote.location(&name),
                        action: "uploaded".into(),
                    }),
                    Ok(Err(e)) => {
                        tracing::warn!(snapshot = %name, error = %e, "requested snapshot upload failed; the local snapshot is kept and queued");
                        result.errors.push(kept(format!("the upload failed: {e}")));
                    }
                    Err(_) => result.errors.push(kept("the server is shutting down".into())),
                },
                None => {
                    result.locations.push(Located {
                        name: name.clone(),
                        location: remote.location(&name),
                        action: "queued".into(),
                    });
                    match queued.failing {
                        Some(e) => result.errors.push(kept(format!("uploads to s3 are failing ({e})"))),
                        None => warnings.push(format!(
                            "snapshot {name} is queued for upload to {} behind {} other snapshot(s); the server uploads them in order",
                            remote.describe(),
                            queued.ahead
                        )),
                    }
                }
            }
        }
        Ok((result, warnings))
    }

    async fn list(&self) -> std::result::Result<SnapshotFileList, Failure> {
        let failed =
            |e: k3s_snapshot_core::Error| Failure(StatusCode::BAD_GATEWAY, format!("cannot list snapshots: {e}"));
        let local = list_snapshots(&self.local, true).await.map_err(failed)?;
        let remote = match self.remote_ref() {
            Some(r) => list_snapshots(r, true).await.map_err(failed)?,
            None => Vec::new(),
        };
        let rows = k3s_list::rows(local, remote, self.remote_origin.as_ref());
        let mut list = SnapshotFileList::new(&rows, &self.node);
        let mut stores: Vec<&dyn SnapshotStore> = vec![&self.local];
        stores.extend(self.remote_ref());
        list.delta_chains = k3s_snapshot_core::delta::chains_in(&stores).await.map_err(failed)?;
        Ok(list)
    }

    async fn delete(&self, names: &[String]) -> std::result::Result<(SnapshotResult, Vec<String>), Failure> {
        let mut stores: Vec<&dyn SnapshotStore> = vec![&self.local];
        stores.extend(self.remote_ref());
        let (mut result, mut warnings) = (SnapshotResult::default(), Vec::new());
        let failed = |e: k3s_snapshot_core::Error| Failure(StatusCode::BAD_GATEWAY, e.to_string());
        for n in names {
            let mut found = false;
            for store in &stores {
                if store.head(n).await.map_err(failed)?.is_some() {
                    found = true;
                    let held = k3s_snapshot_core::retention::delete_unless_held(*store, n).await.map_err(failed)?;
                    if let Some(hold) = held {
                        let w = format!("{} is under {hold}; not deleted", store.location(n));
                        tracing::warn!(snapshot = %n, "{w}");
                        warnings.push(w);
                        continue;
                    }
                    tracing::info!(snapshot = %n, location = %store.location(n), "deleted snapshot on request");
                    result.locations.push(Located {
                        name: n.clone(),
                        location: store.location(n),
                        action: "deleted".into(),
                    });
                }
            }
            if found {
                result.deleted.push(n.clone());
            } else {
                let places: Vec<String> = stores.iter().map(|s| s.describe()).collect();
                warnings.push(format!("snapshot {n} not found in {}; nothing deleted for it", places.join(" or ")));
            }
        }
        if let Some(q) = &self.queue {
            q.forget_vanished();
        }
        Ok((result, warnings))
    }

    async fn prune(&self, req: &SnapshotRequest) -> std::result::Result<SnapshotResult, Failure> {
        let prefix = req.name.first().map(String::as_str).unwrap_or(DEFAULT_PREFIX);
        let failed = |e: k3s_snapshot_core::Error| Failure(StatusCode::BAD_GATEWAY, format!("prune failed: {e}"));
        let mut result = SnapshotResult::default();
        let _held = {
            crate::drills::preempt();
            self.lock.clone().lock_owned().await
        };
        let keep = req.retention.unwrap_or(self.retention);
        let mut stores: Vec<(&dyn SnapshotStore, i64)> = vec![(&self.local, keep)];
        stores.extend(self.remote_ref().map(|r| (r, self.remote_retention)));
        for (store, keep) in stores {
            for d in prune(store, &RetentionPolicy { prefix, keep }).await.map_err(failed)? {
                result.locations.push(Located {
                    location: store.location(&d),
                    name: d.clone(),
                    action: "pruned".into(),
                });
                result.deleted.push(d);
            }
        }
        if let Some(q) = &self.queue {
            q.forget_vanished();
        }
        Ok(result)
    }
}

/// Whether k3s's `EtcdS3` object names a destination or credentials (any non-empty string field);
/// its defaults (`timeout`, `retention`) and switches are not destinations.
fn names_a_destination(s3: &serde_json::Value) -> bool {
    const DESTINATION: [&str; 9] =
        ["endpoint", "bucket", "folder", "region", "accessKey", "secretKey", "sessionToken", "endpointCA", "proxy"];
    let Some(obj) = s3.as_object() else { return false };
    DESTINATION.iter().any(|k| obj.get(*k).and_then(|v| v.as_str()).is_some_and(|v| !v.is_empty()))
}

fn to_json(v: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(v).expect("snapshot answers always serialise")
}

/// A server's answer, with the warnings it sent.
#[derive(Debug)]
pub struct Answer<T> {
    pub value: T,
    pub warnings: Vec<String>,
}

/// The client side: talks to the supervisor API of a server at `server` with `token`.
pub struct Client {
    server: String,
    token: String,
    http: reqwest::Client,
}

/// How long one request may take: a save of a large db with its upload takes minutes.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3600);

impl Client {
    /// Checks who `server` is before the token is sent: with a full `K10<hash>::…` token, the
    /// CA it serves must hash to the token's; with a bare secret, `local_ca` (the cluster CA of a
    /// server's data dir, when this runs on one) is trusted; without either the client refuses,
    /// rather than send the token to a server it cannot verify.
    pub async fn connect(server: &str, token: &str, local_ca: Option<&std::path::Path>) -> Result<Client> {
        let server = server.trim_end_matches('/').to_string();
        let err = |m: String| Error::Api(m);
        if !server.starts_with("https://") {
            return Err(err(format!("--etcd-server {server} must be an https:// URL of a server's supervisor port")));
        }
        let parsed = Token::parse(token);
        let ca_pem = match parsed.ca_hash() {
            Some(want) => {
                let probe = https_client::client(None, Duration::from_secs(30)).map_err(err)?;
                let (status, pem) = send(probe.get(format!("{server}/cacerts")), &server, 1 << 20).await?;
                if !status.is_success() {
                    return Err(err(format!(
                        "{server}/cacerts answered {status}; is --etcd-server the supervisor port of a server?"
                    )));
                }
                let got = ca_hash(pem.as_bytes());
                if got != want {
                    return Err(err(format!(
                        "the CA served by {server} hashes to {got}, but the token expects {want}: it is not a server of the token's cluster (or the connection is intercepted); check --etcd-server and --etcd-token"
                    )));
                }
                pem
            }
            None => match local_ca.filter(|p| p.is_file()) {
                Some(p) => std::fs::read_to_string(p).map_err(Error::io("read", p))?,
                None => {
                    return Err(err(
                        "the token is a bare secret and no cluster CA is at hand to verify --etcd-server: give --etcd-token the full K10… token (server/token on a server), or run on a server with its --data-dir"
                            .into(),
                    ))
                }
            },
        };
        let http = https_client::client(Some(&ca_pem), REQUEST_TIMEOUT).map_err(err)?;
        Ok(Client { server, token: parsed.secret().to_string(), http })
    }

    async fn post(&self, req: &SnapshotRequest) -> Result<(String, Vec<String>)> {
        let url = format!("{}{PATH}", self.server);
        let builder = self.http.post(&url).basic_auth("server", Some(&self.token)).json(req);
        let resp = builder.send().await.map_err(|e| reach_error(&url, &e))?;
        let status = resp.status();
        let warnings = warnings_of(resp.headers());
        let body = read_answer(resp, &url).await?;
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(Error::Api(format!(
                "{} refused the token (401): give --etcd-token the cluster's token, from server/token on a server",
                self.server
            )));
        }
        if !status.is_success() {
            for w in &warnings {
                tracing::warn!("{w}");
            }
            return Err(Error::Api(format!("{} answered {status}: {}", self.server, printable(body.trim()))));
        }
        Ok((body, warnings))
    }

    /// save, delete or prune.
    pub async fn change(&self, req: &SnapshotRequest) -> Result<Answer<SnapshotResult>> {
        let (body, warnings) = self.post(req).await?;
        let value = serde_json::from_str(&body).map_err(|e| self.not_ours(e))?;
        Ok(Answer { value, warnings })
    }

    pub async fn list(&self, req: &SnapshotRequest) -> Result<Answer<SnapshotFileList>> {
        let (body, warnings) = self.post(req).await?;
        let value = serde_json::from_str(&body).map_err(|e| self.not_ours(e))?;
        Ok(Answer { value, warnings })
    }

    fn not_ours(&self, e: serde_json::Error) -> Error {
        Error::Api(format!("{}{PATH} answered something that is not a snapshot answer ({e})", self.server))
    }
}

fn reach_error(url: &str, e: &reqwest::Error) -> Error {
    Error::Api(format!("cannot reach {url}: {}; check --etcd-server", k3s_snapshot_core::error::one_line(e)))
}

async fn read_answer(resp: reqwest::Response, url: &str) -> Result<String> {
    read_capped(resp, MAX_ANSWER_BYTES).await.map_err(|e| match e {
        Capped::TooLarge => Error::Api(format!("{url} answered more than {MAX_ANSWER_BYTES} bytes; refused")),
        Capped::Read(e) => reach_error(url, &e),
    })
}

async fn send(req: reqwest::RequestBuilder, server: &str, limit: usize) -> Result<(reqwest::StatusCode, String)> {
    let resp = req.send().await.map_err(|e| reach_error(server, &e))?;
    let status = resp.status();
    let body = read_capped(resp, limit).await.map_err(|e| match e {
        Capped::TooLarge => Error::Api(format!("{server} answered more than {limit} bytes; refused")),
        Capped::Read(e) => reach_error(server, &e),
    })?;
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_round_trip_through_headers() {
        let mut h = HeaderMap::new();
        let sent = vec!["snapshot \"a\" not found".to_string(), "back\\slash".to_string()];
        add_warnings(&mut h, &sent);
        let mut r = reqwest::header::HeaderMap::new();
        for v in h.get_all(header::WARNING) {
            r.append(reqwest::header::WARNING, v.to_str().unwrap().parse().unwrap());
        }
        assert_eq!(warnings_of(&r), sent);
    }

    #[test]
    fn k3s_s3_defaults_are_not_a_destination() {
        assert!(!names_a_destination(&serde_json::json!({"timeout": "5m0s", "retention": 5, "insecure": false})));
        assert!(!names_a_destination(&serde_json::json!({"endpoint": ""})));
        assert!(names_a_destination(&serde_json::json!({"endpoint": "evil.example:9000"})));
        assert!(names_a_destination(&serde_json::json!({"bucket": "b"})));
    }

    #[test]
    fn requests_read_like_k3s_writes_them() {
        // As k3s's CLI marshals its SnapshotRequest (pkg/etcd/snapshot_handler.go field tags).
        let r: SnapshotRequest = serde_json::from_str(
            r#"{"operation":"save","name":["on-demand"],"compress":true,"s3":{"endpoint":"s3.amazonaws.com","timeout":"5m0s"}}"#,
        )
        .unwrap();
        assert_eq!(r.operation, "save");
        assert_eq!(r.name, ["on-demand"]);
        assert_eq!(r.compress, Some(true));
        assert!(r.s3.is_some());
    }
}
