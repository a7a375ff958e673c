//! `k3s-snapshot server`: the flags of k3s's server that concern etcd and its snapshots, turned
//! into a validated [`ServerConfig`] for `k3s_server_hooks::server::run`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use k3s_server_hooks::config::{RemoteFetch, RestoreDeltas, ServerConfig, SnapshotSettings};
use k3s_server_hooks::layout::DataDir;
use k3s_server_hooks::schedule::Schedule;
use k3s_snapshot_core::encryption::{Identities, Recipients};
use k3s_snapshot_core::store::{create_private_dir, write_file_atomic, LocalStore, SnapshotStore};

/// `--cluster-reset-restore-replay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplayArg {
    Auto,
    Native,
    Etcd,
}
use tokio_util::sync::CancellationToken;

use crate::config;

#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// k3s data directory [default: /var/lib/rancher/k3s, or ~/.rancher/k3s when not root]
    #[arg(short = 'd', long, env = "K3S_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Node name, used for the etcd member and in snapshot names [default: the host name]
    #[arg(long, env = "K3S_NODE_NAME")]
    pub node_name: Option<String>,
    /// Config file
    #[arg(short = 'c', long, env = "K3S_CONFIG_FILE")]
    pub config: Option<PathBuf>,
    /// Cluster token (shared secret); generated on first start when not given
    #[arg(short = 't', long, env = "K3S_TOKEN", hide_env_values = true)]
    pub token: Option<crate::secret::Secret>,
    /// File holding the cluster token (read when --token is not given)
    #[arg(long, env = "K3S_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Server to join, https://HOST:6443: fetch the cluster's CAs with --token and become a new etcd member
    /// (a server that is already a member starts from its own data)
    #[arg(short = 's', long, env = "K3S_URL")]
    pub server: Option<String>,
    /// Initialize a new cluster with embedded etcd; accepted for k3s compatibility: a server
    /// without --server always starts a new cluster (or its existing one)
    #[arg(long, env = "K3S_CLUSTER_INIT")]
    pub cluster_init: bool,
    /// Forget all peers and become the sole member of a new cluster, then exit
    #[arg(long, env = "K3S_CLUSTER_RESET")]
    pub cluster_reset: bool,
    /// Snapshot to restore during --cluster-reset: a file, or with --etcd-s3 a snapshot name in the bucket
    #[arg(long)]
    pub cluster_reset_restore_path: Option<String>,
    /// Move a restored snapshot's revision forward by this much and mark every earlier revision
    /// compacted, so Kubernetes clients relist instead of trusting caches newer than the snapshot
    /// (0: keep the snapshot's revision)
    #[arg(long, default_value_t = k3s_snapshot_core::revision::DEFAULT_BUMP)]
    pub cluster_reset_restore_bump_revision: u64,
    /// After the snapshot, replay every contiguous delta segment (continuous backup)
    #[arg(long)]
    pub cluster_reset_restore_deltas: bool,
    /// Replay delta segments up to and including this revision, exactly (with `latest`, the
    /// newest full snapshot at or below it is the base)
    #[arg(long)]
    pub cluster_reset_restore_to_revision: Option<i64>,
    /// Restore the state before this time (RFC 3339): the newest snapshot taken before it and the
    /// delta segments closed before it (with `latest`)
    #[arg(long, value_parser = parse_rfc3339)]
    pub cluster_reset_restore_to_time: Option<i64>,
    /// How delta segments are replayed: `auto` writes them straight into the restored db and
    /// falls back to a private etcd for a db it cannot write into; `native` never falls back;
    /// `etcd` replays on a private etcd, one transaction per revision (slower)
    #[arg(long, value_enum, default_value_t = ReplayArg::Auto)]
    pub cluster_reset_restore_replay: ReplayArg,
    /// Address the supervisor API listens on
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_address: IpAddr,
    /// Address etcd listens on and advertises [default: --bind-address when specific, else 127.0.0.1]
    #[arg(long)]
    pub advertise_address: Option<IpAddr>,
    /// Port of the supervisor API (https)
    #[arg(long, default_value_t = 6443)]
    pub https_listen_port: u16,
    /// etcd client port
    #[arg(long, default_value_t = 2379)]
    pub etcd_client_port: u16,
    /// etcd peer port
    #[arg(long, default_value_t = 2380)]
    pub etcd_peer_port: u16,
    /// Directory holding etcd (and etcdutl or etcdctl) [default: where etcd is on PATH]
    #[arg(long, env = "K3S_ETCD_BIN_DIR")]
    pub etcd_bin_dir: Option<PathBuf>,
    /// Extra etcd flag as key=value (repeatable)
    #[arg(long = "etcd-arg", allow_hyphen_values = true)]
    pub etcd_arg: Vec<String>,
    /// Expose etcd metrics over plain http on ADVERTISE:2381
    #[arg(long)]
    pub etcd_expose_metrics: bool,
    /// Disable scheduled snapshots
    #[arg(long)]
    pub etcd_disable_snapshots: bool,
    /// Name prefix of scheduled snapshots
    #[arg(long, default_value = "etcd-snapshot")]
    pub etcd_snapshot_name: String,
    /// Snapshot schedule: 5-field cron, @hourly/@daily/..., or @every <duration>
    #[arg(long, default_value = "0 */12 * * *")]
    pub etcd_snapshot_schedule_cron: String,
    /// Number of scheduled snapshots to keep (< 1 keeps all)
    #[arg(long, default_value_t = 5, allow_negative_numbers = true)]
    pub etcd_snapshot_retention: i64,
    /// Snapshot directory [default: ${data-dir}/server/db/snapshots]
    #[arg(long)]
    pub etcd_snapshot_dir: Option<PathBuf>,
    /// Compress snapshots into zips
    #[arg(long)]
    pub etcd_snapshot_compress: bool,
    /// Continuous backup: ship etcd's changes as delta segments this often (e.g. 10s), between
    /// full snapshots, to the snapshot dir and S3 [default: off]
    #[arg(long, value_parser = config::parse_duration)]
    pub etcd_snapshot_delta_interval: Option<Duration>,
    /// Continuous backup: take a new full snapshot and start a new delta chain once the current
    /// one holds more than this many revisions since its base, which bounds what a restore
    /// replays (0: no limit)
    #[arg(long, default_value = "1000000", value_name = "REVISIONS", value_parser = parse_max_revisions)]
    pub etcd_snapshot_delta_max_revisions: u64,
    /// Continuous backup: take a new full snapshot and start a new delta chain once the current
    /// one's base is this old and it holds a change (0: no limit)
    #[arg(long, default_value = "1h", value_parser = config::parse_duration)]
    pub etcd_snapshot_delta_max_age: Duration,
    /// Continuous backup: record etcd's hashkv at a closed segment's end (what a restore drill
    /// compares the replayed content with) at most this often; hashkv reads the whole key space,
    /// so every segment would cost etcd a full read per interval (0: every segment)
    #[arg(long, default_value = "1m", value_parser = config::parse_duration)]
    pub etcd_snapshot_delta_hash_interval: Duration,
    /// Continuous backup: keep delta chains and their base snapshots (locally and in S3) so that a
    /// restore to any time this far back finds a base taken before it and the whole chain after
    /// it (0: keep every chain); --etcd-snapshot-retention does not count chain bases
    #[arg(long, default_value = "24h", value_parser = config::parse_duration)]
    pub etcd_snapshot_delta_retention: Duration,
    /// Encrypt scheduled snapshots (age) to the public keys in FILE, one per line, as `age -R` reads them
    #[arg(long, env = "K3S_ETCD_SNAPSHOT_ENCRYPTION_RECIPIENTS_FILE", value_name = "FILE")]
    pub etcd_snapshot_encryption_recipients_file: Option<PathBuf>,
    /// Private keys (age-keygen's file, as `age -i` reads it; mode 0600) that decrypt an encrypted
    /// --cluster-reset-restore-path
    #[arg(long, env = "K3S_ETCD_SNAPSHOT_ENCRYPTION_IDENTITY_FILE", value_name = "FILE")]
    pub etcd_snapshot_encryption_identity_file: Option<PathBuf>,
    /// Restore drills: on this schedule (5-field cron, @daily, @every <duration>; e.g. `0 3 * * *`),
    /// restore the latest snapshot (and its delta chain, with --etcd-snapshot-delta-interval) from
    /// S3 when configured, else the snapshot dir, into a scratch dir, check it and record its RTO;
    /// one server of the cluster per tick, at low priority, never during a snapshot [default: off]
    #[arg(long, value_name = "CRON")]
    pub etcd_snapshot_verify_schedule: Option<String>,
    /// Compact etcd's history every interval to the revision seen one interval earlier, as
    /// kube-apiserver does (one server of the cluster at a time; held back for continuous
    /// backup's followers); 0 turns it off, for an embedder whose apiserver compacts
    #[arg(long, default_value = "5m", value_parser = config::parse_duration)]
    pub etcd_compaction_interval: Duration,
    /// Defragment this server's etcd member on this schedule (cron, @every <duration>) when it is
    /// worth it; members go one at a time, the leader last [default: off]
    #[arg(long, value_name = "CRON")]
    pub etcd_defrag_schedule: Option<String>,
    /// Scheduled defragmentation runs only when at least this share of the db file is free
    #[arg(long, default_value_t = 50, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(0..=100))]
    pub etcd_defrag_threshold_percent: u8,
    /// ... and at least this much would be freed (bytes, or with Ki, Mi, Gi)
    #[arg(long, default_value = "100Mi", value_name = "BYTES", value_parser = parse_bytes)]
    pub etcd_defrag_min_free_bytes: u64,
    /// Upper bound of the random delay added to each scheduled snapshot (tests set 0s)
    #[arg(long, hide = true, env = "K3S_SNAPSHOT_JITTER", default_value = "5s", value_parser = config::parse_duration)]
    pub etcd_snapshot_jitter: Duration,
    #[command(flatten)]
    pub s3: crate::s3args::S3Args,
}

impl ServerArgs {
    /// `--token`, else the contents of `--token-file` (as k3s reads `--token-file`).
    fn token(&self) -> anyhow::Result<Option<String>> {
        if let Some(t) = self.token.as_ref().map(|t| t.expose().trim().to_string()).filter(|t| !t.is_empty()) {
            return Ok(Some(t));
        }
        let Some(path) = &self.token_file else { return Ok(None) };
        let text = std::fs::read_to_string(path).with_context(|| {
            format!("cannot read --token-file {}; give a readable file or use --token", path.display())
        })?;
        let t = text.trim();
        if t.is_empty() {
            anyhow::bail!("--token-file {} is empty: write the cluster's token into it", path.display());
        }
        Ok(Some(t.to_string()))
    }

    /// Flags → configuration; everything that needs no filesystem or network is checked here.
    fn to_config(&self, remote: Option<Arc<dyn SnapshotStore>>) -> anyhow::Result<ServerConfig> {
        let schedule = if self.etcd_disable_snapshots || self.cluster_reset {
            None
        } else {
            Some(Schedule::parse(&self.etcd_snapshot_schedule_cron)?)
        };
        let advertise_address = self.advertise_address.unwrap_or(if self.bind_address.is_unspecified() {
            IpAddr::from([127, 0, 0, 1])
        } else {
            self.bind_address
        });
        let remote_fetch: Option<RemoteFetch> = remote.clone().map(remote_fetch);
        let verify_schedule = match self.etcd_snapshot_verify_schedule.as_deref().filter(|s| !s.trim().is_empty()) {
            Some(expr) if !self.cluster_reset => Some(Schedule::parse(expr).map_err(|e| match e {
                k3s_server_hooks::Error::Cron { expr, reason } => {
                    anyhow::anyhow!("invalid --etcd-snapshot-verify-schedule {expr:?}: {reason}")
                }
                e => e.into(),
            })?),
            _ => None,
        };
        let encryption = self
            .etcd_snapshot_encryption_recipients_file
            .as_deref()
            .map(Recipients::from_file)
            .transpose()?
            .map(Arc::new);
        let identities = self
            .etcd_snapshot_encryption_identity_file
            .as_deref()
            .map(Identities::from_file)
            .transpose()?
            .map(Arc::new);
        Ok(ServerConfig {
            data_dir: DataDir::new(self.data_dir.clone().unwrap_or_else(config::default_data_dir)),
            node_name: self.node_name.clone().unwrap_or_else(config::default_node_name),
            token: self.token()?,
            server_url: self.server.clone().filter(|s| !s.is_empty()),
            cluster_reset: self.cluster_reset,
            cluster_reset_restore_path: self.cluster_reset_restore_path.clone().filter(|p| !p.is_empty()),
            cluster_reset_restore_bump_revision: self.cluster_reset_restore_bump_revision,
            restore: RestoreDeltas {
                deltas: self.cluster_reset_restore_deltas,
                to_revision: self.cluster_reset_restore_to_revision,
                to_time: self.cluster_reset_restore_to_time,
                replay_with: match self.cluster_reset_restore_replay {
                    ReplayArg::Auto => k3s_server_hooks::config::ReplayWith::Auto,
                    ReplayArg::Native => k3s_server_hooks::config::ReplayWith::Native,
                    ReplayArg::Etcd => k3s_server_hooks::config::ReplayWith::Etcd,
                },
            },
            bind_address: self.bind_address,
            advertise_address,
            https_listen_port: self.https_listen_port,
            etcd_client_port: self.etcd_client_port,
            etcd_peer_port: self.etcd_peer_port,
            etcd_bin_dir: self.etcd_bin_dir.clone(),
            etcd_args: self.etcd_arg.clone(),
            etcd_expose_metrics: self.etcd_expose_metrics,
            snapshots: SnapshotSettings {
                schedule,
                name: self.etcd_snapshot_name.clone(),
                retention: self.etcd_snapshot_retention,
                dir: self.etcd_snapshot_dir.clone(),
                compress: self.etcd_snapshot_compress,
                remote_origin: remote.as_ref().map(|_| self.s3.origin()),
                remote,
                remote_retention: self.s3.retention,
                remote_fetch,
                jitter: self.etcd_snapshot_jitter,
                delta_interval: self.etcd_snapshot_delta_interval.filter(|d| !d.is_zero()),
                delta_max_revisions: self.etcd_snapshot_delta_max_revisions,
                delta_max_age: Some(self.etcd_snapshot_delta_max_age).filter(|d| !d.is_zero()),
                delta_hash_interval: self.etcd_snapshot_delta_hash_interval,
                delta_retention: Some(self.etcd_snapshot_delta_retention).filter(|d| !d.is_zero()),
                encryption,
                verify_schedule,
            },
            health: k3s_server_hooks::config::HealthSettings {
                compaction_interval: Some(self.etcd_compaction_interval).filter(|d| !d.is_zero()),
                defrag_schedule: match self.etcd_defrag_schedule.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
                    Some(expr) if !self.cluster_reset => Some(Schedule::parse(expr).map_err(|e| {
                        anyhow::anyhow!(
                            "{}",
                            e.to_string().replace("--etcd-snapshot-schedule-cron", "--etcd-defrag-schedule")
                        )
                    })?),
                    _ => None,
                },
                defrag_threshold_percent: self.etcd_defrag_threshold_percent,
                defrag_min_free_bytes: self.etcd_defrag_min_free_bytes,
            },
            identities,
            etcd_ready_timeout: Duration::from_secs(120),
            etcd_stop_grace: Duration::from_secs(10),
            drill_scratch: None,
        })
    }
}

pub async fn run(args: ServerArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    // Flag errors (an invalid cron) come before anything else.
    args.to_config(None)?.validate()?;
    // S3 down, a missing bucket or refused credentials do not keep the server down (SPEC §4):
    // only S3 flags that cannot work are fatal here. Snapshots are kept locally and wait in the
    // server's upload queue; a failed upload is a warning and a metric.
    let store = args.s3.build().context("--etcd-s3")?;
    if let (Some(store), false) = (&store, args.cluster_reset) {
        tokio::spawn(check_s3(store.clone()));
    }
    let remote = store.map(|s| Arc::new(s) as Arc<dyn SnapshotStore>);
    let cfg = args.to_config(remote)?;
    k3s_server_hooks::server::run(cfg, cancel).await?;
    Ok(())
}

/// How a restore (a reset, or a drill) downloads a snapshot by name from S3: into a scratch file
/// in the directory it is given, checked against the object's metadata, which is kept beside it
/// as k3s does.
pub(crate) fn remote_fetch(store: Arc<dyn SnapshotStore>) -> RemoteFetch {
    Arc::new(move |file: String, into: PathBuf| {
        let store = store.clone();
        Box::pin(async move {
            // A bar on a terminal (an operator running the reset by hand), nothing in a log.
            let progress = crate::bar::bar();
            let doc = s3_backend::fetch_metadata(store.as_ref(), &file).await?;
            let expected = doc.as_ref().and_then(|d| d.ours());
            if expected.is_none() {
                let why = if doc.is_some() { "its metadata is k3s's extra metadata" } else { "it has no metadata" };
                tracing::info!(snapshot = %file, store = %store.describe(), "{why}, so no size or sha256 is known for it; its sha256 trailer is checked instead");
            }
            // With a copy of the image for the restore to take as the member's db.
            let scratch =
                s3_backend::download_to_scratch(store.as_ref(), &file, &into, expected, progress.as_ref(), true)
                    .await?;
            // Beside the snapshot, as k3s does on a download, so the reset reads it
            // (the token check) as it would a local snapshot's.
            if let Some(doc) = doc {
                let local = LocalStore::new(&into);
                create_private_dir(local.metadata_dir())?;
                write_file_atomic(&local.metadata_dir().join(&file), &doc.to_json())?;
            }
            Ok(scratch)
        })
    })
}

/// Tells at start-up whether S3 is usable, without holding the server up.
async fn check_s3(store: s3_backend::S3Store) {
    match store.check().await {
        Ok(()) => tracing::info!(store = %store.describe(), "s3 is reachable"),
        Err(e) => tracing::warn!(
            store = %store.describe(),
            error = %e,
            "s3 is not usable now; snapshots are kept locally and queued, and the upload queue sends them once s3 answers"
        ),
    }
}

/// Largest `--etcd-snapshot-delta-max-revisions`: a chain that long is no bound at all.
const MAX_CHAIN_REVISIONS: u64 = 1_000_000_000_000;

/// `--etcd-snapshot-delta-max-revisions`: a whole number of revisions, 0 for no limit.
fn parse_max_revisions(s: &str) -> Result<u64, String> {
    let n: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of revisions; give a whole number like 1000000 (0: no limit)"))?;
    if n > MAX_CHAIN_REVISIONS {
        return Err(format!("{n} revisions is no bound: at most {MAX_CHAIN_REVISIONS} (0: no limit)"));
    }
    Ok(n)
}

/// A byte count: a whole number, optionally with `Ki`, `Mi`, `Gi`, `Ti` (powers of 1024; `KiB`
/// and `K`, `M`, `G`, `T` read the same way).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("{s:?} is not a size; give bytes like 104857600 or 100Mi");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.trim().trim_end_matches('B').trim_end_matches('i') {
        "" => 0,
        "K" | "k" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// An RFC 3339 time as unix seconds (also `etcd-snapshot verify --to-time`).
pub(crate) fn parse_rfc3339(s: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp())
        .map_err(|e| format!("{e}; give a time like 2026-12-01T18:00:00Z"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        server: ServerArgs,
    }

    fn parse(args: &[&str]) -> ServerArgs {
        let mut v = vec!["server"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap().server
    }

    #[test]
    fn token_file_is_read_when_no_token_is_given() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("token");
        std::fs::write(&f, "  file-Secret-9\n").unwrap();
        let ff = f.display().to_string();
        assert_eq!(parse(&["--token-file", &ff]).to_config(None).unwrap().token.as_deref(), Some("file-Secret-9"));
        // --token wins, as in k3s.
        let c = parse(&["--token", "flag-secret", "--token-file", &ff]).to_config(None).unwrap();
        assert_eq!(c.token.as_deref(), Some("flag-secret"));
        std::fs::write(&f, "\n").unwrap();
        let e = parse(&["--token-file", &ff]).to_config(None).unwrap_err().to_string();
        assert!(e.contains("is empty"), "{e}");
        let e = parse(&["--token-file", "/nonexistent/token"]).to_config(None).unwrap_err();
        assert!(format!("{e:#}").contains("cannot read --token-file /nonexistent/token"), "{e:#}");
    }

    #[test]
    fn restore_and_delta_flags_parse_and_are_checked_together() {
        let c = parse(&[
            "--cluster-reset",
            "--cluster-reset-restore-path=latest",
            "--cluster-reset-restore-to-time=2026-12-01T18:00:00+01:00",
            "--cluster-reset-restore-bump-revision=0",
        ])
        .to_config(None)
        .unwrap();
        assert_eq!(c.restore.to_time, Some(1_796_144_400));
        assert_eq!(c.cluster_reset_restore_bump_revision, 0);
        c.validate().unwrap();
        let d = parse(&[]).to_config(None).unwrap();
        assert_eq!(d.cluster_reset_restore_bump_revision, 1_000_000_000);
        assert_eq!(d.snapshots.delta_interval, None);
        let e = parse(&["--etcd-snapshot-delta-interval=10s"]).to_config(None).unwrap();
        assert_eq!(e.snapshots.delta_interval, Some(Duration::from_secs(10)));
        // Bounded chains: defaults, small test values, 0 off, absurd values refused.
        assert_eq!(e.snapshots.delta_max_revisions, 1_000_000);
        assert_eq!(e.snapshots.delta_max_age, Some(Duration::from_secs(3600)));
        assert_eq!(e.snapshots.delta_retention, Some(Duration::from_secs(86400)));
        let small = parse(&[
            "--etcd-snapshot-delta-max-revisions=200",
            "--etcd-snapshot-delta-max-age=3s",
            "--etcd-snapshot-delta-retention=5s",
        ])
        .to_config(None)
        .unwrap();
        assert_eq!(small.snapshots.delta_max_revisions, 200);
        assert_eq!(small.snapshots.delta_max_age, Some(Duration::from_secs(3)));
        assert_eq!(small.snapshots.delta_retention, Some(Duration::from_secs(5)));
        let off = parse(&[
            "--etcd-snapshot-delta-max-revisions=0",
            "--etcd-snapshot-delta-max-age=0",
            "--etcd-snapshot-delta-retention=0s",
        ])
        .to_config(None)
        .unwrap();
        assert_eq!(off.snapshots.delta_max_revisions, 0);
        assert_eq!((off.snapshots.delta_max_age, off.snapshots.delta_retention), (None, None));
        for bad in [
            "--etcd-snapshot-delta-max-revisions=-5",
            "--etcd-snapshot-delta-max-revisions=1e6",
            "--etcd-snapshot-delta-max-revisions=99999999999999999999",
            "--etcd-snapshot-delta-max-revisions=2000000000000",
            "--etcd-snapshot-delta-max-age=100000h",
            "--etcd-snapshot-delta-max-age=soon",
            "--etcd-snapshot-delta-retention=-1h",
        ] {
            let e = Cli::try_parse_from(["server", bad]).err().unwrap_or_else(|| panic!("{bad} accepted")).to_string();
            let first = e.lines().next().unwrap_or_default();
            assert!(first.contains(bad.split('=').next().unwrap()), "{bad}: {e}");
        }
        let clash = parse(&["--etcd-snapshot-name=chain"]).to_config(None).unwrap();
        assert!(clash.validate().unwrap_err().to_string().contains("chain bases"));
        let orphan = parse(&["--cluster-reset-restore-deltas"]).to_config(None).unwrap();
        assert!(orphan.validate().unwrap_err().to_string().contains("restore-path=latest"));
        let both = parse(&[
            "--cluster-reset",
            "--cluster-reset-restore-path=latest",
            "--cluster-reset-restore-to-revision=5",
            "--cluster-reset-restore-to-time=2026-12-01T18:00:00Z",
        ])
        .to_config(None)
        .unwrap();
        assert!(both.validate().unwrap_err().to_string().contains("not both"));
        let server = ["server", "--cluster-reset-restore-to-time=yesterday"];
        assert!(Cli::try_parse_from(server).is_err());
    }

    #[test]
    fn health_flags_parse_with_their_defaults() {
        let d = parse(&[]).to_config(None).unwrap();
        assert_eq!(d.health.compaction_interval, Some(Duration::from_secs(300)));
        assert!(d.health.defrag_schedule.is_none());
        assert_eq!((d.health.defrag_threshold_percent, d.health.defrag_min_free_bytes), (50, 100 << 20));
        let c = parse(&[
            "--etcd-compaction-interval=0",
            "--etcd-defrag-schedule=@every 3s",
            "--etcd-defrag-threshold-percent=20",
            "--etcd-defrag-min-free-bytes=8Mi",
        ])
        .to_config(None)
        .unwrap();
        assert_eq!(c.health.compaction_interval, None);
        assert!(c.health.defrag_schedule.is_some());
        assert_eq!((c.health.defrag_threshold_percent, c.health.defrag_min_free_bytes), (20, 8 << 20));
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        for bad in [
            "--etcd-defrag-threshold-percent=101",
            "--etcd-defrag-min-free-bytes=lots",
            "--etcd-compaction-interval=often",
        ] {
            let e = Cli::try_parse_from(["server", bad]).err().unwrap_or_else(|| panic!("{bad} accepted")).to_string();
            assert!(e.contains(bad.split('=').next().unwrap()), "{bad}: {e}");
        }
        let e = parse(&["--etcd-defrag-schedule=sometimes"]).to_config(None).unwrap_err();
        assert!(format!("{e:#}").contains("--etcd-defrag-schedule \"sometimes\""), "{e:#}");
    }

    #[test]
    fn defaults_are_k3s_defaults() {
        let a = parse(&[]);
        assert_eq!((a.https_listen_port, a.etcd_client_port, a.etcd_peer_port), (6443, 2379, 2380));
        assert_eq!(a.etcd_snapshot_name, "etcd-snapshot");
        assert_eq!(a.etcd_snapshot_schedule_cron, "0 */12 * * *");
        assert_eq!(a.etcd_snapshot_retention, 5);
        assert_eq!(a.etcd_snapshot_jitter, Duration::from_secs(5));
        assert!(!a.etcd_disable_snapshots && !a.etcd_snapshot_compress && !a.cluster_reset);
        let c = a.to_config(None).unwrap();
        assert_eq!(c.advertise_address, IpAddr::from([127, 0, 0, 1]));
    }

    #[test]
    fn every_flag_parses() {
        let a = parse(&[
            "-d",
            "/tmp/d",
            "--node-name",
            "n1",
            "-t",
            "tok",
            "--cluster-reset",
            "--cluster-reset-restore-path",
            "/x",
            "--bind-address",
            "127.0.0.2",
            "--https-listen-port",
            "7443",
            "--etcd-client-port",
            "3379",
            "--etcd-peer-port",
            "3380",
            "--etcd-bin-dir",
            "/opt/etcd",
            "--etcd-arg",
            "quota-backend-bytes=1",
            "--etcd-arg",
            "--auto-compaction-retention=1",
            "--etcd-expose-metrics",
            "--etcd-disable-snapshots",
            "--etcd-snapshot-name",
            "nightly",
            "--etcd-snapshot-schedule-cron",
            "@every 2s",
            "--etcd-snapshot-retention",
            "-1",
            "--etcd-snapshot-dir",
            "/snaps",
            "--etcd-snapshot-compress",
            "--etcd-snapshot-jitter",
            "0s",
            "--cluster-init",
            "-c",
            "/etc/x.yaml",
        ]);
        assert_eq!(a.data_dir.as_deref(), Some(std::path::Path::new("/tmp/d")));
        assert_eq!(a.etcd_arg.len(), 2);
        assert_eq!(a.etcd_snapshot_retention, -1);
        let c = a.to_config(None).unwrap();
        assert_eq!(c.advertise_address, IpAddr::from([127, 0, 0, 2]));
        assert!(c.snapshots.schedule.is_none(), "cluster reset and disabled snapshots schedule nothing");
        assert_eq!(c.snapshots.jitter, Duration::ZERO);
    }

    #[test]
    fn invalid_cron_is_an_error_that_quotes_it() {
        let err = parse(&["--etcd-snapshot-schedule-cron", "every tuesday"]).to_config(None).unwrap_err();
        assert!(format!("{err:#}").contains("\"every tuesday\""), "{err:#}");
    }

    #[test]
    fn restore_path_needs_cluster_reset_and_reset_refuses_server() {
        let err = parse(&["--cluster-reset-restore-path", "/x"]).to_config(None).unwrap().validate().unwrap_err();
        assert!(err.to_string().contains("needs --cluster-reset"), "{err}");
        let err = parse(&["--cluster-reset", "-s", "https://a:6443"]).to_config(None).unwrap().validate().unwrap_err();
        assert!(err.to_string().contains("--server"), "{err}");
    }

    #[test]
    fn server_must_be_an_https_url() {
        let c = parse(&["-s", "https://10.0.0.1:6443", "-t", "tok", "--cluster-init"]).to_config(None).unwrap();
        c.validate().unwrap();
        assert_eq!(c.server_url.as_deref(), Some("https://10.0.0.1:6443"));
        for bad in ["http://10.0.0.1:6443", "10.0.0.1:6443"] {
            let err = parse(&["-s", bad, "-t", "tok"]).to_config(None).unwrap().validate().unwrap_err();
            assert!(err.to_string().contains("--server"), "{err}");
        }
    }
}
