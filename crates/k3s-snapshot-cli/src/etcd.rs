//! `k3s-snapshot etcd status | defrag | alarm list | alarm disarm`: etcd's health by hand, through
//! the server's etcd config (`--data-dir`) or explicit endpoints and certificates, as
//! `etcd-snapshot` reaches etcd.

use std::io::Write;
use std::path::PathBuf;

use anyhow::bail;
use k3s_snapshot_core::etcd::EtcdClientConfig;
use k3s_snapshot_core::maintenance::{self, MemberStatus};
use serde::Serialize;

use crate::config;

#[derive(clap::Args, Debug)]
pub struct EtcdArgs {
    #[command(subcommand)]
    pub command: EtcdCommand,
    /// k3s data directory [default: /var/lib/rancher/k3s, or ~/.rancher/k3s when not root]
    #[arg(short = 'd', long, global = true, env = "K3S_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Config file
    #[arg(short = 'c', long, global = true, env = "K3S_CONFIG_FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub etcd: crate::args::EtcdConnArgs,
    /// etcd's --quota-backend-bytes, which etcd does not report [default: from
    /// ${data-dir}/server/db/etcd/config, else etcd's 2Gi]
    #[arg(long, global = true, value_name = "BYTES", value_parser = crate::server::parse_bytes)]
    pub quota_backend_bytes: Option<u64>,
    /// Output format
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value = "table")]
    pub output: crate::args::StatusFormat,
}

#[derive(clap::Subcommand, Debug)]
pub enum EtcdCommand {
    /// Per member: db size, in use, free %, quota, leader, revision, raft index, alarms
    Status,
    /// Defragment every member, one at a time, the leader last after moving leadership away
    Defrag,
    /// List or disarm etcd's alarms (NOSPACE, CORRUPT)
    Alarm {
        #[command(subcommand)]
        action: AlarmCommand,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum AlarmCommand {
    /// List the alarms raised in the cluster
    List,
    /// Disarm every alarm (a NOSPACE comes back at the next write while the db is over the quota)
    Disarm,
}

impl EtcdArgs {
    fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(config::default_data_dir)
    }

    fn client(&self) -> anyhow::Result<EtcdClientConfig> {
        self.etcd.client_config(&self.data_dir())
    }

    /// The quota etcd applies (0 when it is off).
    fn quota(&self) -> i64 {
        let configured = match self.quota_backend_bytes {
            Some(q) => Some(q as i64),
            None if self.etcd.etcd_endpoints.is_empty() => {
                k3s_snapshot_core::etcd_config::quota_backend_bytes(&self.data_dir())
            }
            None => None,
        };
        maintenance::effective_quota(configured).unwrap_or(0)
    }

    fn json(&self) -> bool {
        self.output == crate::args::StatusFormat::Json
    }
}

pub async fn run(args: EtcdArgs) -> anyhow::Result<()> {
    let cfg = args.client()?;
    match &args.command {
        EtcdCommand::Status => status(&args, &cfg).await,
        EtcdCommand::Defrag => defrag(&args, &cfg).await,
        EtcdCommand::Alarm { action } => alarm(&args, &cfg, action).await,
    }
}

fn mib(n: i64) -> String {
    format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
}

fn print_json(v: &impl Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

async fn status(args: &EtcdArgs, cfg: &EtcdClientConfig) -> anyhow::Result<()> {
    let members = maintenance::cluster_status(cfg, args.quota()).await?;
    if args.json() {
        return print_json(&members);
    }
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            let quota = if m.quota > 0 { mib(m.quota) } else { "none".into() };
            if let Some(e) = &m.error {
                return vec![m.name.clone(), m.id.clone(), m.endpoint.clone(), format!("error: {e}")];
            }
            vec![
                m.name.clone(),
                m.id.clone(),
                m.endpoint.clone(),
                mib(m.db_size),
                mib(m.db_size_in_use),
                format!("{:.1}", m.free_percent),
                quota,
                if m.leader {
                    "leader"
                } else if m.learner {
                    "learner"
                } else {
                    "follower"
                }
                .into(),
                m.revision.to_string(),
                m.raft_index.to_string(),
                if m.alarms.is_empty() { "none".into() } else { m.alarms.join(",") },
            ]
        })
        .collect();
    let header =
        ["NAME", "ID", "ENDPOINT", "DB SIZE", "IN USE", "FREE %", "QUOTA", "ROLE", "REVISION", "RAFT INDEX", "ALARMS"];
    crate::ls::print_aligned(&mut std::io::stdout().lock(), &header, &rows)?;
    Ok(())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Defragmented {
    name: String,
    id: String,
    before: i64,
    after: i64,
    seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    moved_leadership_to: Option<String>,
}

/// Every voting member in turn (followers by id, the leader last), under the cluster's
/// defragmentation lock so that no server's own defragmentation overlaps. Under NOSPACE etcd
/// refuses the lock's lease: then it goes ahead in the same order, and says so.
async fn defrag(args: &EtcdArgs, cfg: &EtcdClientConfig) -> anyhow::Result<()> {
    let quota = args.quota();
    let conn = cfg.connect().await?;
    let lock = match maintenance::ClusterLock::acquire(
        &conn.client,
        &conn.endpoints,
        maintenance::DEFRAG_LOCK,
        std::time::Duration::from_secs(60),
    )
    .await
    {
        Ok(Some(l)) => Some(l),
        Ok(None) => bail!("another defragmentation held the cluster's lock for 60s; try again when it is done"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot take the cluster's defragmentation lock; going ahead one member at a time, the leader last");
            None
        }
    };
    let outcome = defrag_all(cfg, quota).await;
    if let Some(l) = lock {
        l.release().await;
    }
    let done = outcome?;
    if args.json() {
        return print_json(&done);
    }
    for d in &done {
        let moved =
            d.moved_leadership_to.as_ref().map(|m| format!(" (leadership moved to {m} first)")).unwrap_or_default();
        println!(
            "defragmented {} ({}): {} -> {} in {:.2}s{moved}",
            d.name,
            d.id,
            mib(d.before),
            mib(d.after),
            d.seconds
        );
    }
    Ok(())
}

async fn defrag_all(cfg: &EtcdClientConfig, quota: i64) -> anyhow::Result<Vec<Defragmented>> {
    let first = maintenance::cluster_status(cfg, quota).await?;
    if let Some(sick) = first.iter().find(|m| !m.learner && !m.healthy()) {
        bail!(
            "member {} ({}) is unhealthy ({}); defragmenting another now would leave the cluster with fewer working members: fix it first",
            sick.name,
            sick.id,
            sick.error.as_deref().unwrap_or("")
        );
    }
    let mut order: Vec<&MemberStatus> = first.iter().filter(|m| !m.learner).collect();
    order.sort_by_key(|m| (m.leader, m.member_id));
    let mut done = Vec::new();
    for target in order.iter().map(|m| m.member_id) {
        // Fresh numbers each time: leadership may have moved.
        let members = maintenance::cluster_status(cfg, quota).await?;
        let Some(m) = members.iter().find(|m| m.member_id == target) else { continue };
        let own = cfg.with_endpoints(m.endpoint.split(',').map(str::to_string).collect());
        let started = std::time::Instant::now();
        let moved = maintenance::defragment_member(&own, &members, m)
            .await
            .map_err(|e| anyhow::anyhow!("defragmenting member {} ({}): {e}", m.name, m.id))?;
        let after = maintenance::member_status(&own).await.map(|s| s.db_size).unwrap_or_default();
        done.push(Defragmented {
            name: m.name.clone(),
            id: m.id.clone(),
            before: m.db_size,
            after,
            seconds: started.elapsed().as_secs_f64(),
            moved_leadership_to: moved
                .and_then(|id| members.iter().find(|x| x.member_id == id))
                .map(|x| x.name.clone()),
        });
    }
    Ok(done)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Alarm {
    member_id: String,
    member: String,
    alarm: String,
}

async fn alarm(args: &EtcdArgs, cfg: &EtcdClientConfig, action: &AlarmCommand) -> anyhow::Result<()> {
    let mut conn = cfg.connect().await?;
    let raised = maintenance::alarms(&mut conn.client, &conn.endpoints).await?;
    let names = conn.client.member_list().await.map(|r| r.members().to_vec()).unwrap_or_default();
    let listed: Vec<Alarm> = raised
        .iter()
        .map(|(id, a)| Alarm {
            member_id: format!("{id:x}"),
            member: names.iter().find(|m| m.id() == *id).map(|m| m.name().to_string()).unwrap_or_default(),
            alarm: a.clone(),
        })
        .collect();
    if let AlarmCommand::Disarm = action {
        for (id, a) in &raised {
            maintenance::disarm(&mut conn.client, &conn.endpoints, *id, a).await?;
        }
        let quota = args.quota();
        if quota > 0 && raised.iter().any(|(_, a)| a == "NOSPACE") {
            for m in maintenance::cluster_status(cfg, quota).await? {
                if m.healthy() && m.db_size >= quota {
                    tracing::warn!(member = %m.name, db_size = m.db_size, quota, "the db is still over the quota: NOSPACE comes back at the next write; run `k3s-snapshot etcd defrag` after deleting data, or raise quota-backend-bytes");
                }
            }
        }
    }
    if args.json() {
        return print_json(&listed);
    }
    let verb = if matches!(action, AlarmCommand::Disarm) { "disarmed " } else { "" };
    if listed.is_empty() {
        println!("no alarms");
    }
    for a in &listed {
        println!("{verb}memberID:{} ({}) alarm:{}", a.member_id, a.member, a.alarm);
    }
    Ok(())
}
