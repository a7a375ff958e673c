//! The server's configuration: what the binary's flags become once parsed ([`ServerConfig`]),
//! checked without the filesystem or the network ([`ServerConfig::validate`]), and the values
//! derived from it (etcd's URLs and launch settings, the snapshot store). Every other module of
//! the server reads it; it depends on none of them but the plain types it is made of.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k3s_snapshot_core::encryption::{Identities, Recipients};
use k3s_snapshot_core::store::{LocalStore, ScratchFile, SnapshotStore};

use crate::etcd_proc::EtcdLaunch;
use crate::layout::DataDir;
use crate::schedule::Schedule;
use crate::tls::TlsFiles;
use crate::{Error, Result};

/// Downloads a snapshot object by name into a scratch file in a directory, verified against its
/// metadata, and returns it (the reset gives it its final name once the snapshot passed every
/// check). The binary supplies it from its S3 backend (this crate knows no S3).
pub type RemoteFetch =
    Arc<dyn Fn(String, PathBuf) -> BoxFuture<'static, k3s_snapshot_core::Result<ScratchFile>> + Send + Sync>;

/// Scheduled-snapshot settings.
#[derive(Clone)]
pub struct SnapshotSettings {
    /// `None` when `--etcd-disable-snapshots`.
    pub schedule: Option<Schedule>,
    /// `--etcd-snapshot-name`
    pub name: String,
    /// `--etcd-snapshot-retention`
    pub retention: i64,
    /// `--etcd-snapshot-dir`; default `${data-dir}/server/db/snapshots`.
    pub dir: Option<PathBuf>,
    /// `--etcd-snapshot-compress`
    pub compress: bool,
    /// Where snapshots are uploaded too (`--etcd-s3`).
    pub remote: Option<Arc<dyn SnapshotStore>>,
    /// How `ls` shows the origin of S3 rows (no credentials).
    pub remote_origin: Option<k3s_snapshot_core::k3s_list::S3Origin>,
    /// `--etcd-s3-retention`
    pub remote_retention: i64,
    /// Fetches `--cluster-reset-restore-path` from the remote store (`--etcd-s3`).
    pub remote_fetch: Option<RemoteFetch>,
    /// Upper bound of the random delay of each scheduled snapshot (SPEC: 5 s).
    pub jitter: Duration,
    /// `--etcd-snapshot-delta-interval`: continuous backup when set.
    pub delta_interval: Option<Duration>,
    /// `--etcd-snapshot-delta-max-revisions`: a new chain starts past this many revisions since
    /// its base (0: no limit).
    pub delta_max_revisions: u64,
    /// `--etcd-snapshot-delta-max-age`: a new chain starts once its base is this old (`None`: no
    /// limit).
    pub delta_max_age: Option<Duration>,
    /// `--etcd-snapshot-delta-hash-interval`: the live hash a restore drill compares with is
    /// recorded at a segment's end at most this often (zero: at every segment's end).
    pub delta_hash_interval: Duration,
    /// `--etcd-snapshot-delta-retention`: chains and their bases are kept for restores to any
    /// time this far back (`None`: kept whatever their age).
    pub delta_retention: Option<Duration>,
    /// `--etcd-snapshot-encryption-recipients-file`: scheduled snapshots are encrypted to these.
    pub encryption: Option<Arc<Recipients>>,
    /// `--etcd-snapshot-verify-schedule`: restore drills ([`crate::drills`]); `None`: off.
    pub verify_schedule: Option<Schedule>,
}

/// `--cluster-reset-restore-deltas`, `--cluster-reset-restore-to-revision`,
/// `--cluster-reset-restore-to-time`.
#[derive(Debug, Clone, Default)]
pub struct RestoreDeltas {
    /// Replay every contiguous delta segment after the snapshot.
    pub deltas: bool,
    /// Replay up to and including this revision, exactly.
    pub to_revision: Option<i64>,
    /// Replay the segments that certainly closed before this time (unix seconds; a segment named with this very second is left out).
    pub to_time: Option<i64>,
    /// `--cluster-reset-restore-replay`: how the segments are replayed.
    pub replay_with: ReplayWith,
}

/// How delta segments are replayed into the restored db.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReplayWith {
    /// Natively into the db, or on a private etcd when the db has a shape the native replay does
    /// not write into (the log says why).
    #[default]
    Auto,
    /// Natively only: a db the native replay does not write into is an error.
    Native,
    /// On a private etcd, one transaction per revision.
    Etcd,
}

/// `--etcd-compaction-interval`, `--etcd-defrag-*`.
#[derive(Debug, Clone)]
pub struct HealthSettings {
    /// `None`: no compaction (an embedder whose apiserver compacts).
    pub compaction_interval: Option<Duration>,
    pub defrag_schedule: Option<Schedule>,
    pub defrag_threshold_percent: u8,
    pub defrag_min_free_bytes: u64,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            compaction_interval: Some(Duration::from_secs(300)),
            defrag_schedule: None,
            defrag_threshold_percent: 50,
            defrag_min_free_bytes: 100 << 20,
        }
    }
}

impl HealthSettings {
    /// Whether a scheduled defragmentation of this member is worth it.
    pub fn worth_it(&self, m: &k3s_snapshot_core::maintenance::MemberStatus) -> bool {
        m.healthy()
            && m.free_percent >= f64::from(self.defrag_threshold_percent)
            && m.free_bytes() as u64 >= self.defrag_min_free_bytes
    }
}

/// A validated server configuration (the binary's flags, after parsing).
#[derive(Clone)]
pub struct ServerConfig {
    pub data_dir: DataDir,
    pub node_name: String,
    /// `--token`; generated when absent and not stored yet.
    pub token: Option<String>,
    /// `--server`: join an existing cluster.
    pub server_url: Option<String>,
    pub cluster_reset: bool,
    pub cluster_reset_restore_path: Option<String>,
    /// `--cluster-reset-restore-bump-revision`: how far a restore moves the revision forward (and
    /// marks the past compacted); 0 keeps the snapshot's revision.
    pub cluster_reset_restore_bump_revision: u64,
    /// What a restore replays after the snapshot (continuous backup).
    pub restore: RestoreDeltas,
    pub bind_address: IpAddr,
    pub advertise_address: IpAddr,
    pub https_listen_port: u16,
    pub etcd_client_port: u16,
    pub etcd_peer_port: u16,
    pub etcd_bin_dir: Option<PathBuf>,
    pub etcd_args: Vec<String>,
    pub etcd_expose_metrics: bool,
    pub snapshots: SnapshotSettings,
    /// Compaction, defragmentation and NOSPACE handling (issue 30).
    pub health: HealthSettings,
    /// `--etcd-snapshot-encryption-identity-file`: decrypts an encrypted
    /// `--cluster-reset-restore-path`.
    pub identities: Option<Arc<Identities>>,
    /// How long etcd may take to become ready.
    pub etcd_ready_timeout: Duration,
    /// How long etcd may take to stop after SIGTERM before it is killed.
    pub etcd_stop_grace: Duration,
    /// A restore drill's private scratch dir ([`crate::verify`]): the restore goes to
    /// `<scratch>/etcd` instead of `db/etcd-restore.tmp`, downloads, decryptions and extractions
    /// to `<scratch>/files` instead of the snapshot dir, and nothing takes a name in the
    /// snapshot dir. `None` for a real reset.
    pub drill_scratch: Option<PathBuf>,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("data_dir", &self.data_dir)
            .field("node_name", &self.node_name)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("cluster_reset", &self.cluster_reset)
            .field("advertise_address", &self.advertise_address)
            .finish_non_exhaustive()
    }
}

impl ServerConfig {
    /// Checks that need no filesystem: flag combinations.
    pub fn validate(&self) -> Result<()> {
        let r = &self.restore;
        if (r.deltas || r.to_revision.is_some() || r.to_time.is_some()) && self.cluster_reset_restore_path.is_none() {
            return Err(Error::Config(
                "--cluster-reset-restore-deltas, -to-revision and -to-time replay delta segments after a snapshot: add --cluster-reset --cluster-reset-restore-path=latest (or a snapshot)".into(),
            ));
        }
        if r.to_revision.is_some() && r.to_time.is_some() {
            return Err(Error::Config(
                "give --cluster-reset-restore-to-revision or --cluster-reset-restore-to-time, not both".into(),
            ));
        }
        if r.to_revision.is_some_and(|n| n < 1) {
            return Err(Error::Config("--cluster-reset-restore-to-revision must be a revision, 1 or more".into()));
        }
        if self.cluster_reset_restore_path.is_some() && !self.cluster_reset {
            return Err(Error::Config(
                "--cluster-reset-restore-path needs --cluster-reset; add it to restore from a snapshot".into(),
            ));
        }
        if self.cluster_reset && self.server_url.is_some() {
            return Err(Error::Config(
                "--cluster-reset cannot be used with --server: reset the server that holds the data, then rejoin the others".into(),
            ));
        }
        if self.health.defrag_threshold_percent > 100 {
            return Err(Error::Config(format!(
                "--etcd-defrag-threshold-percent {} is not a percentage; give 0 to 100",
                self.health.defrag_threshold_percent
            )));
        }
        if let Some(url) = &self.server_url {
            validate_server_url(url)?;
        }
        if self.advertise_address.is_unspecified() {
            return Err(Error::Config("--advertise-address must be a concrete address, not 0.0.0.0 or ::".into()));
        }
        k3s_snapshot_core::name::validate_file_name(&self.node_name)
            .map_err(|e| Error::Config(format!("--node-name: {e}")))?;
        k3s_snapshot_core::name::validate_prefix(&self.snapshots.name)
            .map_err(|e| Error::Config(format!("--etcd-snapshot-name: {e}")))?;
        // Retention selects by `<prefix>-`: the cron's prefix and the chain bases' must not
        // select each other's snapshots.
        let (name, base) = (self.snapshots.name.as_str(), k3s_snapshot_core::delta::BASE_PREFIX);
        let claims = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}-"));
        if claims(name, base) || claims(base, name) {
            return Err(Error::Config(format!(
                "--etcd-snapshot-name {name:?} would share names with continuous backup's chain bases ({base}-<node>-<time>); choose another name"
            )));
        }
        Ok(())
    }

    /// Where a restore is made before it is swapped in: `db/etcd-restore.tmp`, or a drill's
    /// `<scratch>/etcd`.
    pub fn restore_tmp(&self) -> PathBuf {
        match &self.drill_scratch {
            Some(s) => s.join("etcd"),
            None => self.data_dir.etcd_restore_tmp(),
        }
    }

    /// Where a restore downloads, decrypts and extracts the snapshot: the snapshot dir, or a
    /// drill's `<scratch>/files`.
    pub fn restore_work_dir(&self) -> PathBuf {
        match &self.drill_scratch {
            Some(s) => s.join("files"),
            None => self.snapshot_store().dir().to_path_buf(),
        }
    }

    /// etcd's quota as it applies it: `quota-backend-bytes` from `--etcd-arg`, else etcd's
    /// default; `None` when a negative value turns it off.
    pub fn etcd_quota(&self) -> Option<i64> {
        k3s_snapshot_core::maintenance::effective_quota(k3s_snapshot_core::etcd_config::quota_in_args(&self.etcd_args))
    }

    pub fn snapshot_store(&self) -> LocalStore {
        let dir = self.snapshots.dir.clone().unwrap_or_else(|| self.data_dir.snapshots());
        LocalStore::new(dir)
    }

    /// `127.0.0.1`, or `::1` when the advertised address is IPv6: where etcd also listens for
    /// clients on this machine.
    pub fn loopback_address(&self) -> IpAddr {
        match self.advertise_address {
            IpAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
            IpAddr::V6(_) => IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
        }
    }

    fn url(&self, port: u16) -> String {
        format!("https://{}", SocketAddr::new(self.advertise_address, port))
    }

    /// `https://ADVERTISE:PEER_PORT`: this server's etcd peer URL.
    pub fn peer_url(&self) -> String {
        self.url(self.etcd_peer_port)
    }

    /// `--initial-cluster` of this server alone: `<node name>=<peer URL>`.
    pub fn initial_cluster_of_one(&self) -> String {
        format!("{}={}", self.node_name, self.peer_url())
    }

    pub fn etcd_launch(&self, tls: TlsFiles) -> EtcdLaunch {
        let peer_url = self.peer_url();
        EtcdLaunch {
            name: self.node_name.clone(),
            data_dir: self.data_dir.etcd(),
            client_url: self.url(self.etcd_client_port),
            initial_cluster: self.initial_cluster_of_one(),
            peer_url,
            initial_cluster_state: "new".into(),
            force_new_cluster: false,
            metrics_url: self
                .etcd_expose_metrics
                .then(|| format!("http://{}", SocketAddr::new(self.advertise_address, 2381))),
            tls,
            extra_args: self.etcd_args.clone(),
        }
    }
}

/// Checks `--server` without the network: an `https://HOST[:PORT]` URL.
pub fn validate_server_url(url: &str) -> Result<()> {
    let bad = |why: &str| {
        Error::Config(format!(
            "--server {url:?} {why}; give the supervisor URL of a server of the cluster, https://HOST:6443"
        ))
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(&format!("is not a URL ({e})")))?;
    if parsed.scheme() != "https" {
        return Err(bad("must use https"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_url_must_be_https_with_a_host() {
        assert!(validate_server_url("https://10.0.0.1:6443").is_ok());
        assert!(validate_server_url("https://s1.example/").is_ok());
        for bad in ["http://10.0.0.1:6443", "10.0.0.1:6443", "https://", "nonsense"] {
            let e = validate_server_url(bad).unwrap_err().to_string();
            assert!(e.contains("--server"), "{bad}: {e}");
        }
    }
}
