//! The flags every `etcd-snapshot` subcommand shares ([`CommonArgs`]): the data dir, the snapshot
//! dir and name, the token, encryption, S3, and how to reach etcd ([`EtcdConnArgs`], also used by
//! `etcd`); and the output formats.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::bail;
use k3s_snapshot_core::encryption::{Identities, Recipients};
use k3s_snapshot_core::etcd::{self, EtcdClientConfig};
use k3s_snapshot_core::store::LocalStore;

use crate::config;
use crate::s3args::S3Args;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusFormat {
    Table,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
    Yaml,
}

#[derive(clap::Args, Debug)]
pub struct CommonArgs {
    /// k3s data directory [default: /var/lib/rancher/k3s, or ~/.rancher/k3s when not root]
    #[arg(short = 'd', long, global = true, env = "K3S_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Node name used in snapshot names [default: the host name]
    #[arg(long, global = true, env = "K3S_NODE_NAME")]
    pub node_name: Option<String>,
    /// Config file
    #[arg(short = 'c', long, global = true, env = "K3S_CONFIG_FILE")]
    pub config: Option<PathBuf>,
    /// Snapshot directory [default: ${data-dir}/server/db/snapshots]
    #[arg(long = "dir", visible_alias = "etcd-snapshot-dir", global = true)]
    pub dir: Option<PathBuf>,
    /// Name prefix of on-demand snapshots
    #[arg(long, global = true, default_value = "on-demand")]
    pub name: String,
    /// Compress the snapshot into a zip
    #[arg(long = "snapshot-compress", visible_alias = "etcd-snapshot-compress", global = true)]
    pub compress: bool,
    /// Number of snapshots of --name to keep when pruning (< 1 keeps all)
    #[arg(
        long = "snapshot-retention",
        visible_alias = "etcd-snapshot-retention",
        global = true,
        default_value_t = 5,
        allow_negative_numbers = true
    )]
    pub retention: i64,
    /// Cluster token, for the token hash in snapshot metadata [default: ${data-dir}/server/token]
    #[arg(short = 't', long, global = true, env = "K3S_TOKEN", hide_env_values = true)]
    pub token: Option<crate::secret::Secret>,
    #[command(flatten)]
    pub etcd: EtcdConnArgs,
    /// Have the server at this URL (its supervisor port, e.g. https://HOST:6443) do save, ls,
    /// delete or prune with its own etcd, snapshot dir and S3 settings; no etcd certificates needed
    #[arg(long, global = true, env = "K3S_ETCD_SERVER")]
    pub etcd_server: Option<String>,
    /// Token for --etcd-server; the full K10… form lets the server's CA be verified [default:
    /// --token, then ${data-dir}/server/token]
    #[arg(long, global = true, env = "K3S_ETCD_TOKEN", hide_env_values = true)]
    pub etcd_token: Option<crate::secret::Secret>,
    /// Encrypt snapshots (age) to the public keys in FILE, one per line, as `age -R` reads them
    #[arg(
        long = "snapshot-encryption-recipients-file",
        visible_alias = "etcd-snapshot-encryption-recipients-file",
        global = true,
        env = "K3S_ETCD_SNAPSHOT_ENCRYPTION_RECIPIENTS_FILE",
        value_name = "FILE"
    )]
    pub encryption_recipients_file: Option<PathBuf>,
    /// Private keys (age-keygen's file, as `age -i` reads it; mode 0600) that decrypt encrypted snapshots
    #[arg(
        long = "snapshot-encryption-identity-file",
        visible_alias = "etcd-snapshot-encryption-identity-file",
        global = true,
        env = "K3S_ETCD_SNAPSHOT_ENCRYPTION_IDENTITY_FILE",
        value_name = "FILE"
    )]
    pub encryption_identity_file: Option<PathBuf>,
    #[command(flatten)]
    pub s3: S3Args,
}

impl CommonArgs {
    /// The recipients of `--snapshot-encryption-recipients-file`, when given.
    pub(crate) fn recipients(&self) -> anyhow::Result<Option<Arc<Recipients>>> {
        let Some(f) = &self.encryption_recipients_file else { return Ok(None) };
        Ok(Some(Arc::new(Recipients::from_file(f)?)))
    }

    /// The identities of `--snapshot-encryption-identity-file`, when given.
    pub(crate) fn identities(&self) -> anyhow::Result<Option<Identities>> {
        self.encryption_identity_file.as_deref().map(Identities::from_file).transpose().map_err(Into::into)
    }

    pub(crate) fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(config::default_data_dir)
    }

    pub(crate) fn node(&self) -> String {
        self.node_name.clone().unwrap_or_else(config::default_node_name)
    }

    pub(crate) fn local_store(&self) -> LocalStore {
        let dir = self.dir.clone().unwrap_or_else(|| self.data_dir().join("server/db/snapshots"));
        LocalStore::new(dir)
    }

    pub(crate) fn token_hash(&self) -> Option<String> {
        let token = match &self.token {
            Some(t) => t.expose().to_string(),
            None => std::fs::read_to_string(self.data_dir().join("server/token")).ok()?.trim().to_string(),
        };
        (!token.is_empty()).then(|| k3s_server_hooks::token::metadata_token_hash(&token))
    }

    pub(crate) fn etcd_config(&self) -> anyhow::Result<EtcdClientConfig> {
        self.etcd.client_config(&self.data_dir())
    }
}

/// How `etcd-snapshot` and `etcd` reach etcd without a server in between.
#[derive(clap::Args, Debug)]
pub struct EtcdConnArgs {
    /// etcd endpoints, comma separated [default: from ${data-dir}/server/db/etcd/config]
    #[arg(long, global = true, value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// CA certificate of etcd's client URL [default: from ${data-dir}/server/db/etcd/config]
    #[arg(long, global = true)]
    pub etcd_cacert: Option<PathBuf>,
    /// Client certificate for etcd [default: ${data-dir}/server/tls/etcd/client.crt]
    #[arg(long, global = true)]
    pub etcd_cert: Option<PathBuf>,
    /// Client key for etcd [default: ${data-dir}/server/tls/etcd/client.key]
    #[arg(long, global = true)]
    pub etcd_key: Option<PathBuf>,
}

impl EtcdConnArgs {
    /// `--etcd-endpoints` with the TLS files given, else the data dir's `server/db/etcd/config`
    /// with any TLS file given on the command line winning.
    pub fn client_config(&self, data_dir: &std::path::Path) -> anyhow::Result<EtcdClientConfig> {
        let (cacert, cert, key) = (&self.etcd_cacert, &self.etcd_cert, &self.etcd_key);
        if !self.etcd_endpoints.is_empty() {
            return Ok(EtcdClientConfig {
                endpoints: self.etcd_endpoints.clone(),
                cacert: cacert.clone(),
                cert: cert.clone(),
                key: key.clone(),
            });
        }
        let path = etcd::config_path(data_dir);
        if !path.exists() {
            bail!(
                "no etcd found: {} does not exist; start `k3s-snapshot server --data-dir {}` or pass --etcd-endpoints",
                path.display(),
                data_dir.display()
            );
        }
        let mut cfg = EtcdClientConfig::for_data_dir(data_dir)?;
        if cacert.is_some() {
            cfg.cacert = cacert.clone();
        }
        if cert.is_some() || key.is_some() {
            (cfg.cert, cfg.key) = (cert.clone(), key.clone());
        }
        Ok(cfg)
    }
}
