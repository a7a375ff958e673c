//! Joining an existing cluster: `server --server https://HOST:PORT --token T` (SPEC §6).
//!
//! [`prepare`] talks to the supervisor API of a server of the cluster and writes nothing:
//!
//! 1. `GET /cacerts` over TLS *without* verification (the joiner has no CA yet). When the token is
//!    in the `K10<sha256>::server:<secret>` form, a CA whose SHA-256 differs is refused.
//! 2. `GET /db/info` with the token (Bearer), now verifying the API certificate with that CA: the
//!    members and the leader. A wrong token is a 401 and a clear error.
//! 3. With etcd data already here (`db/etcd/member`): its member id, read from the WAL
//!    ([`crate::wal`]), must be one of the members, and then the server simply starts from its
//!    own data ([`JoinPlan::Member`]). Otherwise the data is left from before a cluster reset or
//!    from another cluster, and the error says to delete `${data-dir}/server/db`.
//! 4. Without etcd data, `GET /db/ca-material` with the token: the CAs and their keys.
//!
//! Then [`Fresh::install`] writes the CAs and `server/token`; the server mints its own
//! certificates ([`crate::tls::ensure`]); [`add_member`] adds it as a learner with etcd's
//! `MemberAdd`, through the leader's client URL with a client certificate of the cluster's etcd
//! CA, and returns the `--initial-cluster` from the answer; etcd starts with
//! `--initial-cluster-state=existing`; [`promote`] makes the learner a voting member once it
//! has caught up. Joining as a learner keeps the cluster's quorum as it was until the new
//! member is ready, so that a joiner that fails half-way can always be removed again
//! ([`Added::undo`]: `MemberRemove` and its half-made data dir), and a retry starts clean.

use std::time::Duration;

use etcd_client::{Client, MemberAddOptions};
use k3s_snapshot_core::error::one_line;
use k3s_snapshot_core::etcd::EtcdClientConfig;
use tokio_util::sync::CancellationToken;

use crate::api::DbInfo;
use crate::config::ServerConfig;
use crate::https_client::{self, read_capped, Capped};
use crate::layout::DataDir;
use crate::tls::{CaMaterial, TlsFiles, CA_NAMES};
use crate::token::{ca_hash, Token};
use crate::{wal, Error, Result};

/// How long a fresh joiner keeps trying to reach `--server` (it may still be starting).
const REACH_SERVER_FOR: Duration = Duration::from_secs(60);
/// Bound of one HTTP request to the supervisor API.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound of one etcd cluster request (a cluster without quorum does not answer).
const ETCD_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `MemberAdd` is retried while the cluster refuses it for now (another learner
/// joining, a leader election).
const MEMBER_ADD_FOR: Duration = Duration::from_secs(120);
/// Pause between attempts of the retried steps.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// gRPC status codes (the protocol's numbers) that mean "not now": DEADLINE_EXCEEDED,
/// FAILED_PRECONDITION (a learner not in sync yet, too many learners), UNAVAILABLE (unhealthy
/// cluster, no leader).
const GRPC_RETRY_LATER: [i32; 3] = [4, 9, 14];
/// NOT_FOUND from `MemberAdd`: etcd derives a new member's id from its peer URLs and the current
/// second, and refuses an id it removed before, so re-adding a peer URL within the second it was
/// removed (a retry right after a failed join) works a second later.
const GRPC_NOT_FOUND: i32 = 5;

/// What the cluster said, and what this server does about it.
#[derive(Debug)]
pub enum JoinPlan {
    /// No etcd data here: become a new member.
    Fresh(Box<Fresh>),
    /// The etcd data here belongs to a member of the cluster: start from it, no `MemberAdd`.
    Member {
        member_id: u64,
        /// The cluster's members as `--server` listed them; `None` when it could not be reached.
        info: Option<DbInfo>,
    },
}

/// A new member's material, fetched and checked, not yet written.
pub struct Fresh {
    pub server: String,
    pub token: Token,
    pub ca_pem: String,
    pub material: CaMaterial,
    pub info: DbInfo,
}

impl std::fmt::Debug for Fresh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fresh")
            .field("server", &self.server)
            .field("members", &self.info.members.len())
            .finish_non_exhaustive()
    }
}

impl Fresh {
    /// Writes the cluster's CAs and `server/token` (the token given, bound to the cluster's CA).
    pub fn install(&self, dd: &DataDir) -> Result<()> {
        self.material.install(dd)?;
        self.token.bound_to(self.ca_pem.as_bytes()).store(dd)?;
        tracing::info!(server = %self.server, "installed the cluster's certificate authorities and token");
        Ok(())
    }
}

fn base_url(url: &str) -> String {
    url.trim_end_matches('/').to_string()
}

/// The error the user gets for etcd data that does not belong to the cluster.
fn stale_data(dd: &DataDir, server: &str, detail: &str) -> Error {
    Error::Join(format!(
        "the etcd data in {} {detail}, so it cannot rejoin the cluster at {server}: it is left from before a cluster reset, or from another cluster; back it up, then delete {} and start again to join as a new member",
        dd.etcd().display(),
        dd.db().display()
    ))
}

/// Why talking to the supervisor API failed.
enum Fetch {
    /// No answer at all (connection refused, timeout): worth another try.
    Unreachable(String),
    /// An answer that settles it (401, a CA that does not match): never retried.
    Refused(Error),
}

fn http_client(ca_pem: Option<&str>) -> Result<reqwest::Client> {
    https_client::client(ca_pem, HTTP_TIMEOUT).map_err(|e| Error::Join(format!("{e}; check --server")))
}

async fn get(
    http: &reqwest::Client,
    server: &str,
    path: &str,
    token: Option<&str>,
) -> std::result::Result<String, Fetch> {
    let url = format!("{server}{path}");
    let mut req = http.get(&url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) if e.is_connect() || e.is_timeout() => {
            return Err(Fetch::Unreachable(format!("cannot reach {url}: {}", one_line(&e))))
        }
        Err(e) => {
            return Err(Fetch::Refused(Error::Join(format!("GET {url} failed: {}; check --server", one_line(&e)))))
        }
    };
    let status = resp.status();
    if status == reqwest::StatusCode::UNAUTHORIZED {
        return Err(Fetch::Refused(Error::Join(format!(
            "{server} refused the token (401 unauthorized for {path}); give --token the cluster's token, from server/token on a server of the cluster; nothing was changed"
        ))));
    }
    if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
        // The server is not verified yet when this is /cacerts: what it says is shown escaped
        // and short.
        let body = read_capped(resp, 4096).await.unwrap_or_default();
        return Err(Fetch::Unreachable(format!(
            "{url} answered 503: {}",
            k3s_snapshot_core::status::printable(body.trim())
        )));
    }
    if !status.is_success() {
        return Err(Fetch::Refused(Error::Join(format!(
            "GET {url} answered {status}; is --server the supervisor port (--https-listen-port) of a server?"
        ))));
    }
    read_capped(resp, MAX_BODY).await.map_err(|e| match e {
        Capped::TooLarge => Fetch::Refused(Error::Join(format!(
            "{url} answered more than {MAX_BODY} bytes; is --server the supervisor port of a server? nothing was changed"
        ))),
        Capped::Read(e) => Fetch::Unreachable(format!("reading {url}: {}", one_line(&e))),
    })
}

/// The largest answer a joiner reads from the supervisor API (a CA bundle, the CA material or
/// the member list are a few KiB).
const MAX_BODY: usize = 1 << 20;

/// Steps 1 and 2: the CA, checked against the token, and the members, with the token.
async fn discover(server: &str, token: &Token, given: &str) -> std::result::Result<(String, DbInfo), Fetch> {
    let ca_pem = get(&http_client(None).map_err(Fetch::Refused)?, server, "/cacerts", None).await?;
    let got = ca_hash(ca_pem.as_bytes());
    match token.ca_hash() {
        Some(want) if want != got => {
            return Err(Fetch::Refused(Error::Join(format!(
                "the CA served by {server} hashes to {got}, but the token expects {want}: {server} is not a server of the token's cluster (or the connection is intercepted); check --server and --token; nothing was changed"
            ))));
        }
        Some(_) => tracing::info!(server, "the cluster CA matches the token's hash"),
        None => tracing::warn!(
            server,
            ca_hash = %got,
            "the token is a bare secret without a CA hash, so the CA served by --server is trusted as it is; give the full K10… token to have it checked"
        ),
    }
    let http = http_client(Some(&ca_pem)).map_err(Fetch::Refused)?;
    let body = get(&http, server, "/db/info", Some(given)).await?;
    let info: DbInfo = serde_json::from_str(&body).map_err(|e| {
        Fetch::Refused(Error::Join(format!("{server}/db/info is not what a server answers ({e}); check --server")))
    })?;
    if info.members.is_empty() {
        return Err(Fetch::Unreachable(format!("{server}/db/info lists no etcd member")));
    }
    Ok((ca_pem, info))
}

/// Looks at the cluster behind `--server` and at this server's data, and decides; writes nothing.
pub async fn prepare(cfg: &ServerConfig, cancel: &CancellationToken) -> Result<JoinPlan> {
    let dd = &cfg.data_dir;
    let server = base_url(cfg.server_url.as_deref().expect("prepare is called with --server"));
    let given = match &cfg.token {
        Some(t) => t.trim().to_string(),
        None => match std::fs::read_to_string(dd.token()) {
            Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
            _ => return Err(Error::Config(
                "--server needs --token (K3S_TOKEN): the cluster's token, from server/token on a server of the cluster"
                    .into(),
            )),
        },
    };
    let token = Token::parse(&given);
    if token.is_empty() {
        return Err(Error::Config(
            "--token has no secret (it ends in '::server:' with nothing after it): give the whole token of the cluster"
                .into(),
        ));
    }

    if dd.etcd().join("member").is_dir() {
        let local = wal::member_of(&dd.etcd())
            .map_err(|e| stale_data(dd, &server, &format!("cannot be matched to a member of the cluster ({e})")))?;
        return match discover(&server, &token, &given).await {
            Ok((_, info)) => {
                if info.members.iter().any(|m| m.id_u64() == local.member_id) {
                    tracing::info!(server = %server, member_id = %format!("{:x}", local.member_id),
                        "already a member of the cluster; starting from the local data without joining again");
                    Ok(JoinPlan::Member { member_id: local.member_id, info: Some(info) })
                } else {
                    let names: Vec<String> = info.members.iter().map(|m| format!("{}={}", m.name, m.id)).collect();
                    Err(stale_data(
                        dd,
                        &server,
                        &format!(
                            "belongs to member {:x}, which is not among the cluster's members ({})",
                            local.member_id,
                            names.join(", ")
                        ),
                    ))
                }
            }
            Err(Fetch::Refused(e)) => Err(e),
            Err(Fetch::Unreachable(why)) => {
                tracing::warn!(server = %server, reason = %why, member_id = %format!("{:x}", local.member_id),
                    "cannot ask --server whether this server is still a member; starting from the local data");
                Ok(JoinPlan::Member { member_id: local.member_id, info: None })
            }
        };
    }

    let started = tokio::time::Instant::now();
    let (ca_pem, info) = loop {
        match discover(&server, &token, &given).await {
            Ok(found) => break found,
            Err(Fetch::Refused(e)) => return Err(e),
            Err(Fetch::Unreachable(why)) => {
                if started.elapsed() > REACH_SERVER_FOR {
                    return Err(Error::Join(format!(
                        "{why}; gave up after {}s: start a server of the cluster first, and check --server; nothing was changed",
                        REACH_SERVER_FOR.as_secs()
                    )));
                }
                tracing::info!(server = %server, reason = %why, "waiting for --server to answer");
                pause(cancel).await?;
            }
        }
    };
    let http = http_client(Some(&ca_pem))?;
    let body = match get(&http, &server, "/db/ca-material", Some(&given)).await {
        Ok(b) => b,
        Err(Fetch::Refused(e)) => return Err(e),
        Err(Fetch::Unreachable(why)) => return Err(Error::Join(format!("{why}; nothing was changed"))),
    };
    let material: CaMaterial = serde_json::from_str(&body).map_err(|e| {
        Error::Join(format!("{server}/db/ca-material is not what a server answers ({e}); nothing was changed"))
    })?;
    material.validate()?;
    if material.cert(CA_NAMES[0]) != Some(ca_pem.as_str()) {
        return Err(Error::Join(format!(
            "{server} hands out a cluster CA that differs from its /cacerts; nothing was changed"
        )));
    }
    let names: Vec<&str> = info.members.iter().map(|m| m.name.as_str()).collect();
    tracing::info!(server = %server, members = ?names, "fetched the cluster's certificate authorities; joining");
    Ok(JoinPlan::Fresh(Box::new(Fresh { server, token, ca_pem, material, info })))
}

async fn pause(cancel: &CancellationToken) -> Result<()> {
    tokio::select! {
        _ = tokio::time::sleep(RETRY_PAUSE) => Ok(()),
        _ = cancel.cancelled() => Err(Error::Cancelled),
    }
}

/// Whether an etcd error means "not now" rather than "no"; `also` are more gRPC codes that do.
fn retry_later(e: &etcd_client::Error, also: &[i32]) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            let code = s.code() as i32;
            GRPC_RETRY_LATER.contains(&code) || also.contains(&code)
        }
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

/// One etcd call, bounded so that a cluster without quorum is an error and not a hang. The error
/// comes with whether to try again later.
async fn call<T>(
    endpoints: &str,
    what: &str,
    f: impl std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> std::result::Result<T, (bool, Error)> {
    call_retrying(endpoints, what, &[], f).await
}

async fn call_retrying<T>(
    endpoints: &str,
    what: &str,
    also: &[i32],
    f: impl std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> std::result::Result<T, (bool, Error)> {
    match tokio::time::timeout(ETCD_CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            let later = retry_later(&e, also);
            Err((later, Error::Join(format!("etcd {what} at {endpoints} failed: {}", one_line(&e)))))
        }
        Err(_) => Err((
            true,
            Error::Join(format!("etcd {what} at {endpoints} did not answer within {}s", ETCD_CALL_TIMEOUT.as_secs())),
        )),
    }
}

/// A client of the cluster's etcd: the given members' client URLs, this server's client
/// certificate (issued from the cluster's etcd CA).
fn cluster_client_config(urls: Vec<String>, tls: &TlsFiles) -> EtcdClientConfig {
    EtcdClientConfig {
        endpoints: urls,
        cacert: Some(tls.etcd_server_ca.clone()),
        cert: Some(tls.etcd_client_cert.clone()),
        key: Some(tls.etcd_client_key.clone()),
    }
}

/// Client URLs to reach the cluster through: the leader's first, then the other voters'.
fn cluster_urls(info: &DbInfo, except_member: Option<u64>) -> Vec<String> {
    let mut urls: Vec<String> = info.leader().map(|l| l.client_urls.clone()).unwrap_or_default();
    for m in &info.members {
        if !m.is_learner && Some(m.id_u64()) != except_member {
            for u in &m.client_urls {
                if !urls.contains(u) {
                    urls.push(u.clone());
                }
            }
        }
    }
    urls
}

/// This server's membership, added and not yet confirmed healthy.
#[derive(Debug)]
pub struct Added {
    pub member_id: u64,
    /// `--initial-cluster` for etcd: every member's `name=peer-url`.
    pub initial_cluster: String,
    cluster: EtcdClientConfig,
    data_dir: DataDir,
}

impl Added {
    /// Undoes a join that failed half-way: `MemberRemove`, and the etcd data this attempt made
    /// (there was none before it). Call with etcd stopped. Logs the outcome; never fails.
    pub async fn undo(&self) {
        let id = format!("{:x}", self.member_id);
        let removed = async {
            let started = tokio::time::Instant::now();
            loop {
                let attempt = async {
                    let mut conn = self.cluster.connect().await.map_err(|e| (true, Error::from(e)))?;
                    call(&conn.endpoints.clone(), "MemberRemove", conn.client.member_remove(self.member_id)).await
                };
                match attempt.await {
                    Ok(_) => return Ok(()),
                    Err((true, e)) if started.elapsed() < Duration::from_secs(30) => {
                        tracing::debug!(error = %e, "retrying MemberRemove");
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                    Err((_, e)) => return Err(e),
                }
            }
        }
        .await;
        match removed {
            Ok(()) => {
                tracing::warn!(member_id = %id, "the join failed: removed this server's member from the cluster again, so that a retry can join anew")
            }
            Err(e) => tracing::error!(member_id = %id, error = %e,
                "the join failed and this server's member could not be removed from the cluster; remove it with `etcdctl member remove {id}` before retrying"),
        }
        let member = self.data_dir.etcd().join("member");
        match std::fs::remove_dir_all(&member) {
            Ok(()) => tracing::info!(dir = %member.display(), "removed the etcd data of the failed join"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(dir = %member.display(), error = %e, "cannot remove the etcd data of the failed join; delete it before retrying")
            }
        }
    }
}

/// Adds this server to the cluster as a learner (`MemberAdd`), after clearing what an earlier
/// attempt of this same server left (a member with its peer URL that never started, or this
/// server's own old membership), and returns the `--initial-cluster` to start etcd with.
pub async fn add_member(
    cfg: &ServerConfig,
    fresh: &Fresh,
    tls: &TlsFiles,
    cancel: &CancellationToken,
) -> Result<Added> {
    let peer_url = cfg.peer_url();
    let me = cfg.node_name.as_str();
    let urls = cluster_urls(&fresh.info, None);
    let cluster = cluster_client_config(urls, tls);
    let mut conn = cluster.connect().await?;
    let endpoints = conn.endpoints.clone();
    let client: &mut Client = &mut conn.client;
    let started = tokio::time::Instant::now();
    let resp = loop {
        let attempt = async {
            let members = call(&endpoints, "MemberList", client.member_list()).await?;
            for m in members.members() {
                let mine = m.peer_urls().iter().any(|u| u == &peer_url);
                if mine && (m.name().is_empty() || m.name() == me) {
                    tracing::warn!(member_id = %format!("{:x}", m.id()), name = m.name(), peer_url = %peer_url,
                        "removing a member with this server's peer URL: left by an earlier attempt to join, or by this server before its data was deleted");
                    call(&endpoints, "MemberRemove", client.member_remove(m.id())).await?;
                } else if mine {
                    return Err((false, Error::Join(format!(
                        "peer URL {peer_url} is already used by member {} ({:x}); give this server another --advertise-address or --etcd-peer-port, or remove that member; nothing was changed in the cluster",
                        m.name(), m.id()
                    ))));
                } else if m.name() == me {
                    return Err((false, Error::Join(format!(
                        "the cluster already has a member named {me} ({:x}, peer URLs {}); give this server another --node-name, or remove that member (etcdctl member remove {:x}) if it is this server's old membership; nothing was changed in the cluster",
                        m.id(), m.peer_urls().join(","), m.id()
                    ))));
                }
            }
            let add = client.member_add([peer_url.as_str()], Some(MemberAddOptions::new().with_is_learner()));
            call_retrying(&endpoints, "MemberAdd", &[GRPC_NOT_FOUND], add).await
        };
        match attempt.await {
            Ok(r) => break r,
            Err((true, e)) if started.elapsed() < MEMBER_ADD_FOR => {
                tracing::info!(reason = %e, "the cluster cannot add a member yet; retrying");
                pause(cancel).await?;
            }
            Err((_, e)) => return Err(e),
        }
    };
    let id =
        resp.member().map(|m| m.id()).ok_or_else(|| Error::Join("MemberAdd answered without the new member".into()))?;
    let mut entries = Vec::new();
    for m in resp.member_list() {
        let name = if m.id() == id {
            me.to_string()
        } else if m.name().is_empty() {
            // Another member that has not started yet; etcd matches members by peer URL.
            format!("pending-{:x}", m.id())
        } else {
            m.name().to_string()
        };
        for u in m.peer_urls() {
            entries.push(format!("{name}={u}"));
        }
    }
    let initial_cluster = entries.join(",");
    tracing::info!(member_id = %format!("{id:x}"), initial_cluster = %initial_cluster, "added this server to the cluster as a learner");
    Ok(Added { member_id: id, initial_cluster, cluster, data_dir: cfg.data_dir.clone() })
}

/// Promotes this server's member to a voting member once etcd accepts (the learner has caught
/// up with the leader); returns at once when it is not a learner. Bounded by `timeout`.
pub async fn promote(
    cluster: &EtcdClientConfig,
    member_id: u64,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<()> {
    let id = format!("{member_id:x}");
    let started = tokio::time::Instant::now();
    let mut last;
    loop {
        let attempt = async {
            let mut conn = cluster.connect().await.map_err(|e| (true, Error::from(e)))?;
            let endpoints = conn.endpoints.clone();
            let members = call(&endpoints, "MemberList", conn.client.member_list()).await?;
            match members.members().iter().find(|m| m.id() == member_id) {
                None => Err((
                    false,
                    Error::Join(format!("member {id} is no longer in the cluster; it was removed while joining")),
                )),
                Some(m) if !m.is_learner() => Ok(()),
                Some(_) => call(&endpoints, "MemberPromote", conn.client.member_promote(member_id)).await.map(drop),
            }
        };
        match attempt.await {
            Ok(()) => {
                tracing::info!(member_id = %id, "this server is a voting member of the cluster");
                return Ok(());
            }
            Err((false, e)) => return Err(e),
            Err((true, e)) => {
                last = e.to_string();
                tracing::debug!(error = %last, "the learner cannot be promoted yet");
            }
        }
        if started.elapsed() > timeout {
            return Err(Error::Join(format!(
                "this server's etcd member {id} was not promoted from learner within {}s: {last}",
                timeout.as_secs()
            )));
        }
        pause(cancel).await?;
    }
}

/// The cluster client and member to promote after a restart of a member that was still a
/// learner (a joiner stopped before its promotion); `None` when `--server` could not be asked.
pub fn restart_promotion(info: &DbInfo, member_id: u64, tls: &TlsFiles) -> Option<EtcdClientConfig> {
    let me = info.members.iter().find(|m| m.id_u64() == member_id)?;
    me.is_learner.then(|| cluster_client_config(cluster_urls(info, Some(member_id)), tls))
}

impl Added {
    /// The cluster client this join used (for [`promote`]).
    pub fn cluster(&self) -> &EtcdClientConfig {
        &self.cluster
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::MemberInfo;

    fn member(id: &str, name: &str, client: &str, learner: bool) -> MemberInfo {
        MemberInfo {
            id: id.into(),
            name: name.into(),
            peer_urls: vec![format!("https://{client}:2380")],
            client_urls: vec![format!("https://{client}:2379")],
            is_learner: learner,
        }
    }

    #[test]
    fn the_leader_comes_first_and_learners_are_skipped() {
        let info = DbInfo {
            members: vec![
                member("1", "a", "10.0.0.1", false),
                member("2", "b", "10.0.0.2", false),
                member("3", "", "10.0.0.3", true),
            ],
            leader: Some("2".into()),
        };
        assert_eq!(cluster_urls(&info, None), ["https://10.0.0.2:2379", "https://10.0.0.1:2379"]);
        assert_eq!(cluster_urls(&info, Some(1)), ["https://10.0.0.2:2379"]);
        let no_leader = DbInfo { leader: None, ..info };
        assert_eq!(cluster_urls(&no_leader, None), ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]);
    }

    #[test]
    fn the_stale_data_error_says_to_delete_the_db_dir() {
        let dd = DataDir::new("/var/lib/rancher/k3s");
        let e = stale_data(&dd, "https://s1:6443", "belongs to member 1").to_string();
        assert!(e.contains("delete /var/lib/rancher/k3s/server/db"), "{e}");
        assert!(e.starts_with("join: "), "{e}");
    }
}
