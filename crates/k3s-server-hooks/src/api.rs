//! The supervisor API on `--https-listen-port`: TLS with a certificate from the cluster CA.
//!
//! | route | auth | answer |
//! | --- | --- | --- |
//! | `GET /ping` | none | `pong` |
//! | `GET /cacerts` | none | the cluster CA PEM (its SHA-256 is the hash in the token) |
//! | `GET /metrics` | none | Prometheus text: scheduled snapshots per store, the upload queue, etcd's health |
//! | `GET /db/info` | token | etcd members and leader as JSON ([`DbInfo`]) |
//! | `GET /db/ca-material` | token | the CAs with their keys, for a joining server ([`CaMaterial`]) |
//! | `POST /db/snapshot` | token | `etcd-snapshot save/ls/delete/prune` done here ([`snapshot_api`]) |
//!
//! "token" means `Authorization: Bearer <token>` or basic auth `server:<token>`; the token may be
//! given in full (`K10…::server:…`) or as the bare secret. Anything else is 401, logged with the
//! caller's address (never what it sent), and a source that keeps failing is answered 429 until
//! its window passes.
//!
//! Hostile clients: the TLS handshake must finish within [`HANDSHAKE_TIMEOUT`] and the request
//! head arrive within [`HEADER_READ_TIMEOUT`]; connections are not kept alive (a joiner makes a
//! handful of requests), so none sits idle; at most [`MAX_CONNECTIONS`] are open at once, and
//! more are closed as they arrive.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::DefaultBodyLimit;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine;
use k3s_snapshot_core::etcd::EtcdClientConfig;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::layout::DataDir;
use crate::metrics::SnapshotMetrics;
use crate::snapshot_api;
use crate::tls::{CaMaterial, TlsFiles};
use crate::token::Token;
use crate::{Error, Result};

/// How long a client has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to send a request's head once connected.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once; more are closed as they are accepted.
pub const MAX_CONNECTIONS: usize = 512;
/// Failed token checks a source may make per [`AUTH_WINDOW`] before it is answered 429.
pub const AUTH_FAILURES_ALLOWED: u32 = 10;
pub const AUTH_WINDOW: Duration = Duration::from_secs(60);
/// Sources remembered at most; the oldest windows are forgotten first.
const AUTH_SOURCES_KEPT: usize = 4096;

/// What the handlers need.
pub struct ApiState {
    pub data_dir: DataDir,
    pub token: Token,
    pub cluster_ca_pem: String,
    pub etcd: EtcdClientConfig,
    pub metrics: Arc<SnapshotMetrics>,
    pub auth_failures: AuthFailures,
    /// `POST /db/snapshot`
    pub snapshots: Arc<crate::snapshot_api::SnapshotService>,
    /// Continuous backup's counters, when it runs.
    pub deltas: Option<Arc<crate::deltas::DeltaMetrics>>,
    /// With `--etcd-snapshot-verify-schedule`: restore drills.
    pub drills: Option<Arc<crate::metrics::DrillMetrics>>,
    /// etcd's db size, quota, alarms, and our compactions and defragmentations.
    pub health: Arc<crate::health::HealthMetrics>,
}

/// Failed token checks per source address, in fixed windows.
#[derive(Default)]
pub struct AuthFailures {
    by_source: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl AuthFailures {
    /// Whether `ip` has used up its failures in the current window.
    fn blocked(&self, ip: IpAddr) -> bool {
        let map = self.by_source.lock().expect("auth failures");
        map.get(&ip).is_some_and(|(start, n)| start.elapsed() < AUTH_WINDOW && *n >= AUTH_FAILURES_ALLOWED)
    }

    /// Counts a failure; returns the count in the current window.
    fn record(&self, ip: IpAddr) -> u32 {
        let mut map = self.by_source.lock().expect("auth failures");
        if map.len() >= AUTH_SOURCES_KEPT && !map.contains_key(&ip) {
            map.retain(|_, (start, _)| start.elapsed() < AUTH_WINDOW);
            if map.len() >= AUTH_SOURCES_KEPT {
                let oldest = map.iter().min_by_key(|(_, (start, _))| *start).map(|(k, _)| *k);
                oldest.map(|k| map.remove(&k));
            }
        }
        let entry = map.entry(ip).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= AUTH_WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
        entry.1
    }
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/ping", get(|| async { "pong" }))
        .route("/cacerts", get(cacerts))
        .route("/metrics", get(metrics))
        .route("/db/info", get(db_info))
        .route("/db/ca-material", get(ca_material))
        .route(snapshot_api::PATH, post(snapshot_request).layer(DefaultBodyLimit::max(snapshot_api::MAX_REQUEST_BYTES)))
        .with_state(state)
}

/// Binds the port now, so that an occupied port is a start-up error before etcd starts.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let l =
        std::net::TcpListener::bind(addr).map_err(|cause| Error::Port { what: "--https-listen-port", addr, cause })?;
    l.set_nonblocking(true).map_err(|cause| Error::Port { what: "--https-listen-port", addr, cause })?;
    Ok(l)
}

/// A rustls server config (ring provider) for the supervisor certificate.
pub fn rustls_config(tls: &TlsFiles) -> Result<Arc<rustls::ServerConfig>> {
    let api_err =
        |what: &str, e: &dyn std::fmt::Display| Error::Tls { action: what.to_string(), detail: e.to_string() };
    let cert_pem = std::fs::read(&tls.supervisor_cert).map_err(Error::io("read", &tls.supervisor_cert))?;
    let key_pem = std::fs::read(&tls.supervisor_key).map_err(Error::io("read", &tls.supervisor_key))?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| api_err("read the supervisor certificate", &e))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| api_err("read the supervisor key", &e))?
        .ok_or_else(|| api_err("read the supervisor key", &"no key in file"))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| api_err("configure tls", &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| api_err("use the supervisor certificate", &e))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Serves until `cancel`, then shuts down gracefully (5 s for requests in flight).
pub async fn serve(
    listener: std::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<ApiState>,
    cancel: CancellationToken,
) -> Result<()> {
    let addr = listener.local_addr().ok();
    let handle = axum_server::Handle::new();
    let acceptor =
        axum_server::tls_rustls::RustlsAcceptor::new(axum_server::tls_rustls::RustlsConfig::from_config(tls))
            .handshake_timeout(HANDSHAKE_TIMEOUT)
            .acceptor(LimitAcceptor { open: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)) });
    let mut server = axum_server::from_tcp(listener)
        .map_err(|e| Error::Api(format!("cannot serve: {e}")))?
        .acceptor(acceptor)
        .handle(handle.clone());
    server
        .http_builder()
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(false);
    let shutdown = {
        let handle = handle.clone();
        let cancel = cancel.clone();
        async move {
            cancel.cancelled().await;
            handle.graceful_shutdown(Some(Duration::from_secs(5)));
        }
    };
    tokio::spawn(shutdown);
    tracing::info!(addr = ?addr, "supervisor api listening");
    server
        .serve(router(state).into_make_service_with_connect_info::<SocketAddr>())
        .await
        .map_err(|e| Error::Api(format!("server failed: {e}")))
}

/// Holds one of [`MAX_CONNECTIONS`] permits for as long as the connection lives; a connection
/// beyond the cap is closed at once.
#[derive(Clone)]
struct LimitAcceptor {
    open: Arc<tokio::sync::Semaphore>,
}

impl<S> axum_server::accept::Accept<tokio::net::TcpStream, S> for LimitAcceptor {
    type Stream = Permitted;
    type Service = S;
    type Future = std::future::Ready<std::io::Result<(Permitted, S)>>;

    fn accept(&self, stream: tokio::net::TcpStream, service: S) -> Self::Future {
        std::future::ready(match self.open.clone().try_acquire_owned() {
            Ok(permit) => Ok((Permitted { stream, _permit: permit }, service)),
            Err(_) => {
                tracing::warn!(peer = ?stream.peer_addr().ok(), limit = MAX_CONNECTIONS,
                    "supervisor api: too many open connections; closing a new one");
                Err(std::io::Error::other("connection limit reached"))
            }
        })
    }
}

/// A connection and its permit.
struct Permitted {
    stream: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl tokio::io::AsyncRead for Permitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Permitted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Checks the token; a failure is logged with the source and counted, and a source over its
/// allowance gets 429 without its credential being looked at.
fn check_auth(state: &ApiState, peer: SocketAddr, path: &str, headers: &HeaderMap) -> Option<Response> {
    let ip = peer.ip();
    if state.auth_failures.blocked(ip) {
        return Some(
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, AUTH_WINDOW.as_secs().to_string())],
                "too many failed token checks\n",
            )
                .into_response(),
        );
    }
    if authorized(state, headers) {
        return None;
    }
    let failures = state.auth_failures.record(ip);
    let presented = if headers.contains_key(header::AUTHORIZATION) { "a wrong token" } else { "no token" };
    tracing::warn!(source = %ip, path, failures_in_window = failures, "supervisor api: refused a request with {presented}");
    Some(unauthorized())
}

/// `POST /db/snapshot`: the token checked here, the request done by [`snapshot_api::handle`].
async fn snapshot_request(
    State(s): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(refused) = check_auth(&s, peer, snapshot_api::PATH, &headers) {
        return refused;
    }
    snapshot_api::handle(s.snapshots.clone(), peer, body).await
}

fn authorized(state: &ApiState, headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    if let Some(bearer) = value.strip_prefix("Bearer ") {
        return state.token.matches(bearer.trim());
    }
    if let Some(basic) = value.strip_prefix("Basic ") {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(basic.trim()) else {
            return false;
        };
        let Ok(decoded) = String::from_utf8(decoded) else {
            return false;
        };
        return match decoded.split_once(':') {
            Some(("server", password)) => state.token.matches(password),
            _ => false,
        };
    }
    false
}

fn unauthorized() -> Response {
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Basic realm=\"k3s-snapshot\"")], "unauthorized\n")
        .into_response()
}

async fn cacerts(State(s): State<Arc<ApiState>>) -> Response {
    ([(header::CONTENT_TYPE, "application/x-pem-file")], s.cluster_ca_pem.clone()).into_response()
}

async fn metrics(State(s): State<Arc<ApiState>>) -> Response {
    let mut text = s.metrics.render();
    if let Some(d) = &s.deltas {
        text.push_str(&d.render());
    }
    if let Some(d) = &s.drills {
        text.push_str(&d.render());
    }
    text.push_str(&crate::upload_queue::UploadQueue::render(s.snapshots.queue.as_deref()));
    text.push_str(&s.health.render());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// One etcd member as `/db/info` lists it (ids in lowercase hex, as etcdctl prints them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: String,
    /// Empty for a member that was added and has not started yet.
    pub name: String,
    #[serde(rename = "peerURLs")]
    pub peer_urls: Vec<String>,
    #[serde(rename = "clientURLs")]
    pub client_urls: Vec<String>,
    #[serde(rename = "isLearner", default)]
    pub is_learner: bool,
}

impl MemberInfo {
    /// The id as a number; 0 when it does not parse.
    pub fn id_u64(&self) -> u64 {
        u64::from_str_radix(&self.id, 16).unwrap_or(0)
    }
}

/// The answer of `/db/info`: the members, and the leader as this server's etcd sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DbInfo {
    pub members: Vec<MemberInfo>,
    /// Hex id of the leader; absent when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}

impl DbInfo {
    pub fn leader(&self) -> Option<&MemberInfo> {
        self.leader.as_ref().and_then(|l| self.members.iter().find(|m| &m.id == l))
    }
}

/// The members and leader of the cluster, through this server's etcd.
pub async fn db_info_of(etcd: &EtcdClientConfig) -> k3s_snapshot_core::Result<DbInfo> {
    let mut conn = etcd.connect().await?;
    let err = |endpoints: &String| {
        let endpoints = endpoints.clone();
        move |cause| k3s_snapshot_core::Error::Etcd { endpoints, cause }
    };
    let resp = conn.client.member_list().await.map_err(err(&conn.endpoints))?;
    let leader = conn.client.status().await.map_err(err(&conn.endpoints))?.leader();
    Ok(DbInfo {
        members: resp
            .members()
            .iter()
            .map(|m| MemberInfo {
                id: format!("{:x}", m.id()),
                name: m.name().to_string(),
                peer_urls: m.peer_urls().to_vec(),
                client_urls: m.client_urls().to_vec(),
                is_learner: m.is_learner(),
            })
            .collect(),
        leader: (leader != 0).then(|| format!("{leader:x}")),
    })
}

async fn db_info(
    State(s): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = check_auth(&s, peer, "/db/info", &headers) {
        return refused;
    }
    match db_info_of(&s.etcd).await {
        Ok(info) => axum::Json(info).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

async fn ca_material(
    State(s): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = check_auth(&s, peer, "/db/ca-material", &headers) {
        return refused;
    }
    match CaMaterial::load(&s.data_dir) {
        Ok(m) => axum::Json(m).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot read CA material");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot read CA material\n").into_response()
        }
    }
}
