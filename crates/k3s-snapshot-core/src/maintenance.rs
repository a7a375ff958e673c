//! etcd maintenance through its own API (issue 30): every member's status (db size, what of it is
//! in use, leader, revision, raft index, alarms), defragmenting one member, moving leadership,
//! listing and disarming alarms, compaction, and a lease-backed lock in etcd that serialises
//! defragmentation across a cluster. The server's health loop and the CLI's `etcd` commands use
//! it; it never decides *when* (that is the server's), never prints and never sleeps for time.
//!
//! etcd does not report its quota (`--quota-backend-bytes`) over the API, so callers pass it: the
//! server knows its own `--etcd-arg`s, the CLI reads etcd's config file (see
//! [`crate::etcd_config::quota_backend_bytes`]) or takes a flag.

use std::time::{Duration, Instant};

use etcd_client::{AlarmAction, AlarmType, Client, LockOptions};
use serde::Serialize;

use crate::etcd::EtcdClientConfig;
use crate::{Error, Result};

/// etcd's default `--quota-backend-bytes` (2 GiB, in 3.4 and 3.5), used when it is 0 or unset.
pub const DEFAULT_QUOTA_BYTES: i64 = 2 << 30;
/// How long a member may take to answer `Status`, a `MoveLeader` or a lock's lease grant.
pub const MEMBER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one member's defragmentation may take before it is reported as stuck. etcd keeps
/// going on its side (a cancelled call does not stop it); it is never retried in a loop.
pub const DEFRAG_TIMEOUT: Duration = Duration::from_secs(600);
/// The lock key prefix that serialises defragmentation across the cluster (etcd's `Lock` API).
pub const DEFRAG_LOCK: &str = "k3s-snapshot/maintenance/defrag";
/// TTL of the lease behind a held lock: a holder that dies releases it within this.
const LOCK_TTL_SECS: i64 = 15;

/// One member as `etcd status` shows it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// Member id, lowercase hex as etcdctl prints it.
    pub id: String,
    #[serde(skip)]
    pub member_id: u64,
    pub name: String,
    pub endpoint: String,
    pub db_size: i64,
    pub db_size_in_use: i64,
    /// Share of the db file that is free pages: what a defragmentation gives back.
    pub free_percent: f64,
    /// `--quota-backend-bytes` as the caller knows it (etcd does not report it).
    pub quota: i64,
    pub leader: bool,
    pub learner: bool,
    pub revision: i64,
    pub raft_index: u64,
    pub raft_term: u64,
    pub version: String,
    /// Alarms raised on this member (`NOSPACE`, `CORRUPT`).
    pub alarms: Vec<String>,
    /// Why the member did not answer; the numbers are then zero.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl MemberStatus {
    /// Bytes a defragmentation would give back.
    pub fn free_bytes(&self) -> i64 {
        (self.db_size - self.db_size_in_use).max(0)
    }

    pub fn healthy(&self) -> bool {
        self.error.is_none()
    }
}

/// `100 * (size - in_use) / size`, 0 for an empty file.
pub fn free_percent(size: i64, in_use: i64) -> f64 {
    if size <= 0 {
        return 0.0;
    }
    100.0 * (size - in_use).max(0) as f64 / size as f64
}

/// The quota etcd applies for a configured value: 0 (or unset) is etcd's default, a negative one
/// turns the quota off (`None`).
pub fn effective_quota(configured: Option<i64>) -> Option<i64> {
    match configured.unwrap_or(0) {
        0 => Some(DEFAULT_QUOTA_BYTES),
        q if q < 0 => None,
        q => Some(q),
    }
}

fn etcd_err(endpoints: &str) -> impl FnOnce(etcd_client::Error) -> Error + '_ {
    move |cause| Error::Etcd { endpoints: endpoints.to_string(), cause }
}

async fn bounded<T>(
    what: &str,
    endpoints: &str,
    limit: Duration,
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r,
        Err(_) => Err(Error::Invalid(format!("etcd at {endpoints}: no answer to {what} within {}s", limit.as_secs()))),
    }
}

/// Alarms of the whole cluster: (member id, alarm name).
pub async fn alarms(client: &mut Client, endpoints: &str) -> Result<Vec<(u64, String)>> {
    let r = bounded("an alarm list", endpoints, MEMBER_TIMEOUT, async {
        client.alarm(AlarmAction::Get, AlarmType::None, None).await.map_err(etcd_err(endpoints))
    })
    .await?;
    Ok(r.alarms().iter().map(|a| (a.member_id(), alarm_name(a.alarm()).to_string())).collect())
}

fn alarm_name(a: AlarmType) -> &'static str {
    match a {
        AlarmType::Nospace => "NOSPACE",
        AlarmType::Corrupt => "CORRUPT",
        AlarmType::None => "NONE",
    }
}

/// Disarms one alarm of one member.
pub async fn disarm(client: &mut Client, endpoints: &str, member_id: u64, alarm: &str) -> Result<()> {
    let kind = match alarm {
        "NOSPACE" => AlarmType::Nospace,
        "CORRUPT" => AlarmType::Corrupt,
        other => return Err(Error::Invalid(format!("unknown etcd alarm {other:?}; etcd raises NOSPACE and CORRUPT"))),
    };
    let mut opts = etcd_client::AlarmOptions::new();
    opts.with_member(member_id);
    bounded("an alarm disarm", endpoints, MEMBER_TIMEOUT, async {
        client.alarm(AlarmAction::Deactivate, kind, Some(opts)).await.map_err(etcd_err(endpoints))
    })
    .await?;
    Ok(())
}

/// The status of every member, each asked on its own client URLs (with `cfg`'s TLS files) in
/// parallel; a member that does not answer within [`MEMBER_TIMEOUT`] is listed with its error.
/// `quota` is `--quota-backend-bytes` as the caller knows it.
pub async fn cluster_status(cfg: &EtcdClientConfig, quota: i64) -> Result<Vec<MemberStatus>> {
    let mut conn = cfg.connect().await?;
    let endpoints = conn.endpoints.clone();
    let members = bounded("a member list", &endpoints, MEMBER_TIMEOUT, async {
        conn.client.member_list().await.map_err(etcd_err(&endpoints))
    })
    .await?;
    let raised = alarms(&mut conn.client, &endpoints).await?;
    let asks = members.members().iter().map(|m| {
        let (id, name, urls, learner) = (m.id(), m.name().to_string(), m.client_urls().to_vec(), m.is_learner());
        let alarms: Vec<String> = raised.iter().filter(|(mid, _)| *mid == id).map(|(_, a)| a.clone()).collect();
        async move {
            let mut s = MemberStatus {
                id: format!("{id:x}"),
                member_id: id,
                name,
                endpoint: urls.join(","),
                quota,
                learner,
                alarms,
                ..MemberStatus::default()
            };
            if urls.is_empty() {
                s.error = Some("not started yet (no client URL)".into());
                return s;
            }
            match member_status(&cfg.with_endpoints(urls)).await {
                Ok(own) => {
                    let (alarms, error) = (std::mem::take(&mut s.alarms), s.error.take());
                    s = MemberStatus { id: s.id, member_id: id, name: s.name, quota, alarms, error, ..own };
                }
                Err(e) => s.error = Some(e.to_string()),
            }
            s
        }
    });
    let mut out = futures::future::join_all(asks).await;
    out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
    Ok(out)
}

/// The status of the one member behind `cfg`'s endpoints (no alarms, quota 0).
pub async fn member_status(cfg: &EtcdClientConfig) -> Result<MemberStatus> {
    let endpoints = cfg.endpoints_display();
    bounded("a status request", &endpoints, MEMBER_TIMEOUT * 2, async {
        let mut conn = cfg.connect().await?;
        let st = conn.client.status().await.map_err(etcd_err(&endpoints))?;
        let id = st.header().map(|h| h.member_id()).unwrap_or_default();
        Ok(MemberStatus {
            id: format!("{id:x}"),
            member_id: id,
            name: String::new(),
            endpoint: endpoints.clone(),
            db_size: st.db_size(),
            db_size_in_use: st.raft_used_db_size(),
            free_percent: free_percent(st.db_size(), st.raft_used_db_size()),
            quota: 0,
            leader: id != 0 && st.leader() == id,
            learner: st.is_learner(),
            revision: st.header().map(|h| h.revision()).unwrap_or_default(),
            raft_index: st.raft_index(),
            raft_term: st.raft_term(),
            version: st.version().to_string(),
            alarms: Vec::new(),
            error: None,
        })
    })
    .await
}

/// Defragments the one member behind `cfg`'s endpoints; its duration. A member that takes longer
/// than [`DEFRAG_TIMEOUT`] is an error saying so (etcd goes on defragmenting on its side).
pub async fn defragment(cfg: &EtcdClientConfig) -> Result<Duration> {
    let endpoints = cfg.endpoints_display();
    let mut conn = cfg.connect().await?;
    let started = Instant::now();
    match tokio::time::timeout(DEFRAG_TIMEOUT, conn.client.defragment()).await {
        Ok(Ok(_)) => Ok(started.elapsed()),
        Ok(Err(cause)) => Err(Error::Etcd { endpoints, cause }),
        Err(_) => Err(Error::Invalid(format!(
            "etcd at {endpoints}: defragmentation did not finish within {}s (etcd goes on with it); it is not retried: look at the member's disk and its log",
            DEFRAG_TIMEOUT.as_secs()
        ))),
    }
}

/// Moves leadership from the member behind `leader` (it must be the leader) to `target`, and
/// waits until that member no longer leads.
pub async fn move_leader(leader: &EtcdClientConfig, target: u64) -> Result<()> {
    let endpoints = leader.endpoints_display();
    let mut conn = leader.connect().await?;
    bounded("a leadership move", &endpoints, MEMBER_TIMEOUT * 2, async {
        conn.client.move_leader(target).await.map_err(etcd_err(&endpoints))
    })
    .await?;
    let deadline = Instant::now() + MEMBER_TIMEOUT * 2;
    loop {
        let st = member_status(leader).await?;
        if !st.leader {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Invalid(format!(
                "etcd at {endpoints} still leads after moving leadership to {target:x}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The healthy voting follower best placed to take over: the one with the highest raft index.
pub fn successor(members: &[MemberStatus]) -> Option<&MemberStatus> {
    members.iter().filter(|m| m.healthy() && !m.leader && !m.learner).max_by_key(|m| m.raft_index)
}

/// Defragments `target` (reached through `cfg`, its own endpoints) the safe way: when it leads,
/// leadership first goes to [`successor`] (a member alone in its cluster is defragmented as the
/// leader: there is no one to hand over to). Returns the member leadership moved to.
pub async fn defragment_member(
    cfg: &EtcdClientConfig,
    members: &[MemberStatus],
    target: &MemberStatus,
) -> Result<Option<u64>> {
    let mut moved = None;
    if target.leader {
        if let Some(next) = successor(members) {
            move_leader(cfg, next.member_id).await?;
            moved = Some(next.member_id);
        }
    }
    defragment(cfg).await?;
    Ok(moved)
}

/// Compacts etcd's history up to `revision` (physical: etcd waits until it is applied). A
/// revision already compacted is not an error: `Ok(false)`.
pub async fn compact(client: &mut Client, endpoints: &str, revision: i64) -> Result<bool> {
    let opts = etcd_client::CompactionOptions::new().with_physical();
    match client.compact(revision, Some(opts)).await {
        Ok(_) => Ok(true),
        Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("required revision has been compacted") => {
            Ok(false)
        }
        Err(cause) => Err(Error::Etcd { endpoints: endpoints.to_string(), cause }),
    }
}

/// A held lock in etcd (`Lock` API on a lease kept alive while held). Dropping it without
/// [`ClusterLock::release`] revokes the lease in the background; a holder that dies releases it
/// when the lease expires.
pub struct ClusterLock {
    client: Client,
    key: Vec<u8>,
    lease: i64,
    keep_alive: tokio::task::JoinHandle<()>,
}

impl ClusterLock {
    /// Waits up to `wait` for the lock `name`; `None` when someone else held it all that time.
    /// Waiters are served in the order they asked.
    pub async fn acquire(client: &Client, endpoints: &str, name: &str, wait: Duration) -> Result<Option<ClusterLock>> {
        let mut client = client.clone();
        let lease = bounded("a lease grant", endpoints, MEMBER_TIMEOUT, async {
            client.lease_grant(LOCK_TTL_SECS, None).await.map_err(etcd_err(endpoints))
        })
        .await?
        .id();
        let keep_alive = {
            let mut c = client.clone();
            tokio::spawn(async move {
                let Ok((mut keeper, _stream)) = c.lease_keep_alive(lease).await else { return };
                loop {
                    tokio::time::sleep(Duration::from_secs((LOCK_TTL_SECS / 3) as u64)).await;
                    if keeper.keep_alive().await.is_err() {
                        return;
                    }
                }
            })
        };
        let locked = tokio::time::timeout(wait, client.lock(name, Some(LockOptions::new().with_lease(lease)))).await;
        match locked {
            Ok(Ok(r)) => Ok(Some(ClusterLock { key: r.key().to_vec(), client, lease, keep_alive })),
            other => {
                keep_alive.abort();
                // Revoking the lease takes our place in the queue away too.
                let _ = tokio::time::timeout(MEMBER_TIMEOUT, client.lease_revoke(lease)).await;
                match other {
                    Ok(Err(cause)) => Err(Error::Etcd { endpoints: endpoints.to_string(), cause }),
                    _ => Ok(None),
                }
            }
        }
    }

    pub async fn release(mut self) {
        self.keep_alive.abort();
        let _ = tokio::time::timeout(MEMBER_TIMEOUT, self.client.unlock(self.key.clone())).await;
        let _ = tokio::time::timeout(MEMBER_TIMEOUT, self.client.lease_revoke(self.lease)).await;
        self.lease = 0;
    }
}

impl Drop for ClusterLock {
    fn drop(&mut self) {
        self.keep_alive.abort();
        if self.lease != 0 {
            let (mut c, lease) = (self.client.clone(), self.lease);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = tokio::time::timeout(MEMBER_TIMEOUT, c.lease_revoke(lease)).await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_percent_and_quota_rules() {
        assert_eq!(free_percent(0, 0), 0.0);
        assert_eq!(free_percent(200, 50), 75.0);
        assert_eq!(free_percent(100, 150), 0.0);
        assert_eq!(effective_quota(None), Some(DEFAULT_QUOTA_BYTES));
        assert_eq!(effective_quota(Some(0)), Some(DEFAULT_QUOTA_BYTES));
        assert_eq!(effective_quota(Some(-1)), None);
        assert_eq!(effective_quota(Some(16 << 20)), Some(16 << 20));
    }

    #[test]
    fn the_successor_is_the_most_caught_up_healthy_voting_follower() {
        let m = |id: u64, leader, learner, idx, err: Option<&str>| MemberStatus {
            member_id: id,
            leader,
            learner,
            raft_index: idx,
            error: err.map(str::to_string),
            ..MemberStatus::default()
        };
        let ms = [
            m(1, true, false, 99, None),
            m(2, false, false, 90, None),
            m(3, false, false, 95, Some("down")),
            m(4, false, true, 98, None),
            m(5, false, false, 91, None),
        ];
        assert_eq!(successor(&ms).map(|s| s.member_id), Some(5));
        assert!(successor(&ms[..1]).is_none());
    }
}
