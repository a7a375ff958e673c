//! The supervisor API on `--https-listen-port`: TLS with a certificate from the cluster CA.
//!
//! | route | auth | answer |
//! | --- | --- | --- |
//! | `GET /ping` | none | `pong` |
//! | `GET /cacerts` | none | the cluster CA PEM (its SHA-256 is the hash in the token) |
//! | `GET /metrics` | none | Prometheus text: scheduled snapshots per store |
//! | `GET /db/info` | token | etcd members and leader as JSON ([`DbInfo`]) |
//! | `GET /db/ca-material` | token | the CAs with their keys, for a joining server ([`CaMaterial`]) |
//!
//! "token" means `Authorization: Bearer <token>` or basic auth `server:<token>`; the token may be
//! given in full (`K10…::server:…`) or as the bare secret. Anything else is 401.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine;
use k3s_snapshot_core::etcd::EtcdClientConfig;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::layout::DataDir;
use crate::metrics::SnapshotMetrics;
use crate::tls::{CaMaterial, TlsFiles};
use crate::token::Token;
use crate::{Error, Result};

/// What the handlers need.
pub struct ApiState {
    pub data_dir: DataDir,
    pub token: Token,
    pub cluster_ca_pem: String,
    pub etcd: EtcdClientConfig,
    pub metrics: Arc<SnapshotMetrics>,
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/ping", get(|| async { "pong" }))
        .route("/cacerts", get(cacerts))
        .route("/metrics", get(metrics))
        .route("/db/info", get(db_info))
        .route("/db/ca-material", get(ca_material))
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
    let server = axum_server::from_tcp_rustls(listener, axum_server::tls_rustls::RustlsConfig::from_config(tls))
        .map_err(|e| Error::Api(format!("cannot serve: {e}")))?
        .handle(handle.clone());
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
    server.serve(router(state).into_make_service()).await.map_err(|e| Error::Api(format!("server failed: {e}")))
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
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render()).into_response()
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

async fn db_info(State(s): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if !authorized(&s, &headers) {
        return unauthorized();
    }
    match db_info_of(&s.etcd).await {
        Ok(info) => axum::Json(info).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

async fn ca_material(State(s): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if !authorized(&s, &headers) {
        return unauthorized();
    }
    match CaMaterial::load(&s.data_dir) {
        Ok(m) => axum::Json(m).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot read CA material");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot read CA material\n").into_response()
        }
    }
}
