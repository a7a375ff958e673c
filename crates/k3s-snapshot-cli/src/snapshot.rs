//! `k3s-snapshot etcd-snapshot [save | ls | delete | prune | status]`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use k3s_snapshot_core::encryption::{self, Identities, Recipients};
use k3s_snapshot_core::etcd::{self, EtcdClientConfig};
use k3s_snapshot_core::k3s_list::{self, SnapshotFileList};
use k3s_snapshot_core::list::list_snapshots;
use k3s_snapshot_core::name;
use k3s_snapshot_core::progress::{NoProgress, Progress};
use k3s_snapshot_core::retention::{prune, RetentionPolicy};
use k3s_snapshot_core::save::{save_and_upload, SaveOptions};
use k3s_snapshot_core::status::TrailerStatus;
use k3s_snapshot_core::store::{LocalStore, SnapshotStore};
use tokio_util::sync::CancellationToken;

use crate::config;
use crate::ls;
use crate::s3args::S3Args;

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = false, subcommand_negates_reqs = true)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub command: Option<SnapshotCommand>,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Take a snapshot now (the default)
    Save,
    /// List snapshots
    #[command(visible_aliases = ["list", "l"])]
    Ls {
        /// Output format
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: OutputFormat,
    },
    /// Delete snapshots by name
    Delete {
        /// Snapshot file names, as `ls` shows them
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Delete the oldest snapshots of --name beyond --snapshot-retention
    Prune,
    /// Read a snapshot natively: hash, revision, keys and size as `etcdutl snapshot status`
    /// computes them, after checking its sha256 trailer and bbolt structure
    Status {
        /// A snapshot name in the snapshot dir (or in S3 with --s3), or a path
        target: String,
        /// Output format
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: StatusFormat,
        /// Do not hash the file against its sha256 trailer (the bbolt structure is still checked)
        #[arg(long)]
        skip_hash_check: bool,
    },
    /// Prove a snapshot by restoring it: fetched, decrypted, unzipped, restored (and its delta
    /// chain replayed) as --cluster-reset would, into a scratch dir under
    /// ${data-dir}/server/verify, then opened by a private etcd on loopback, its revision and
    /// hashkv compared with what the cluster recorded, and the time it took (RTO) measured
    Verify {
        /// `latest`, a snapshot name (in S3 with --s3, else in the snapshot dir), or a path
        #[arg(default_value = "latest")]
        target: String,
        /// Replay the delta chain after the snapshot (continuous backup)
        #[arg(long)]
        deltas: bool,
        /// Replay up to and including this revision (implies --deltas; with `latest`, the newest
        /// snapshot at or below it)
        #[arg(long, conflicts_with = "to_time")]
        to_revision: Option<i64>,
        /// Restore the state before this time, RFC 3339 (implies --deltas; with `latest`, the
        /// newest snapshot taken before it)
        #[arg(long, value_parser = crate::server::parse_rfc3339)]
        to_time: Option<i64>,
        /// Output format
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: StatusFormat,
        /// Directory holding etcd (and etcdutl or etcdctl) [default: where etcd is on PATH]
        #[arg(long, env = "K3S_ETCD_BIN_DIR")]
        etcd_bin_dir: Option<PathBuf>,
    },
    /// Read-only surgical recovery: browse, get, diff and export single objects of any snapshot
    /// (local, S3, zip, age, a delta chain at a revision or time) without a restore; Kubernetes
    /// values decoded. Never writes into etcd: re-apply what `export` prints with kubectl
    Inspect(crate::inspect::InspectArgs),
}

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
    fn recipients(&self) -> anyhow::Result<Option<Arc<Recipients>>> {
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

    fn token_hash(&self) -> Option<String> {
        let token = match &self.token {
            Some(t) => t.expose().to_string(),
            None => std::fs::read_to_string(self.data_dir().join("server/token")).ok()?.trim().to_string(),
        };
        (!token.is_empty()).then(|| k3s_server_hooks::token::metadata_token_hash(&token))
    }

    pub(crate) fn etcd_config(&self) -> anyhow::Result<EtcdClientConfig> {
        if !self.etcd_endpoints.is_empty() {
            return Ok(EtcdClientConfig {
                endpoints: self.etcd_endpoints.clone(),
                cacert: self.etcd_cacert.clone(),
                cert: self.etcd_cert.clone(),
                key: self.etcd_key.clone(),
            });
        }
        let path = etcd::config_path(&self.data_dir());
        if !path.exists() {
            bail!(
                "no etcd to snapshot: {} does not exist; start `k3s-snapshot server --data-dir {}` or pass --etcd-endpoints",
                path.display(),
                self.data_dir().display()
            );
        }
        let mut cfg = EtcdClientConfig::for_data_dir(&self.data_dir())?;
        // TLS files given on the command line win over those the config file implies.
        if self.etcd_cacert.is_some() {
            cfg.cacert = self.etcd_cacert.clone();
        }
        if self.etcd_cert.is_some() || self.etcd_key.is_some() {
            (cfg.cert, cfg.key) = (self.etcd_cert.clone(), self.etcd_key.clone());
        }
        Ok(cfg)
    }
}

pub async fn run(args: SnapshotArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let common = &args.common;
    let command = args.command.unwrap_or(SnapshotCommand::Save);
    if let Some(server) = common.etcd_server.as_deref().filter(|s| !s.is_empty()) {
        return crate::remote::run(common, server, command).await;
    }
    match command {
        SnapshotCommand::Save => save(common, &cancel).await,
        SnapshotCommand::Ls { output } => ls(common, output).await,
        SnapshotCommand::Delete { names } => delete(common, &names).await,
        SnapshotCommand::Prune => prune_cmd(common).await,
        SnapshotCommand::Status { target, output, skip_hash_check } => {
            status_cmd(common, &target, output, !skip_hash_check).await
        }
        SnapshotCommand::Verify { target, deltas, to_revision, to_time, output, etcd_bin_dir } => {
            let req = k3s_server_hooks::verify::DrillRequest {
                target,
                deltas: deltas || to_revision.is_some() || to_time.is_some(),
                to_revision,
                to_time,
            };
            crate::verify::run(common, req, etcd_bin_dir, output == StatusFormat::Json, &cancel).await
        }
        SnapshotCommand::Inspect(args) => crate::inspect::run(common, args).await,
    }
}

async fn save(common: &CommonArgs, cancel: &CancellationToken) -> anyhow::Result<()> {
    name::validate_prefix(&common.name).context("--name")?;
    let node = common.node();
    name::validate_file_name(&node).context("--node-name")?;
    let encryption = common.recipients()?;
    let local = common.local_store();
    local.ensure_dirs()?;
    // An unreachable S3 must not cost the local snapshot: remember why, save locally, then fail.
    let (remote, remote_err) = match common.s3.open().await {
        Ok(r) => (r, None),
        Err(e) if common.s3.enabled && common.s3.bucket.is_some() => (None, Some(e)),
        Err(e) => return Err(e),
    };
    let mut conn = common.etcd_config()?.connect().await?;
    let opts = SaveOptions {
        prefix: common.name.clone(),
        node,
        compress: common.compress,
        token_hash: common.token_hash(),
        encryption,
    };
    let progress = bar();
    let outcome = save_and_upload(&mut conn, &local, remote.as_deref(), &opts, progress.as_ref(), cancel).await?;
    let saved = &outcome.local;
    let mut out = std::io::stdout().lock();
    writeln!(out, "Snapshot {} saved to {}", saved.metadata.name, local.location(&saved.metadata.name))?;
    if let Some(e) = remote_err {
        bail!(
            "snapshot {} is saved locally at {}, but it was not uploaded: {e:#}",
            saved.metadata.name,
            saved.path.display()
        );
    }
    if let (Some(remote), Some(upload)) = (&remote, outcome.upload) {
        match upload {
            Ok(_) => {
                writeln!(out, "Snapshot {} uploaded to {}", saved.metadata.name, remote.location(&saved.metadata.name))?
            }
            Err(e) => bail!(
                "snapshot {} is saved locally at {}, but the upload to {} failed: {e}",
                saved.metadata.name,
                saved.path.display(),
                remote.describe()
            ),
        }
    }
    Ok(())
}

async fn ls(common: &CommonArgs, output: OutputFormat) -> anyhow::Result<()> {
    let store = common.local_store();
    // The table too reads each snapshot's metadata: it shows which ones restore drills proved.
    let local = list_snapshots(&store, true).await?;
    let remote_store = common.s3.open().await?;
    let (remote, origin) = match &remote_store {
        Some(r) => (list_snapshots(r.as_ref(), true).await?, Some(common.s3.origin())),
        None => (Vec::new(), None),
    };
    let rows = k3s_list::rows(local, remote, origin.as_ref());
    let mut list = SnapshotFileList::new(&rows, &common.node());
    if output == OutputFormat::Table {
        let mut stores: Vec<&dyn SnapshotStore> = vec![&store];
        stores.extend(remote_store.as_deref());
        list.delta_chains = k3s_snapshot_core::delta::chains_in(&stores).await?;
    }
    ls::print(&mut std::io::stdout().lock(), list, output)
}

async fn delete(common: &CommonArgs, names: &[String]) -> anyhow::Result<()> {
    for n in names {
        name::validate_file_name(n)?;
    }
    let local = common.local_store();
    let remote = common.s3.open().await?;
    let mut stores: Vec<&dyn SnapshotStore> = vec![&local];
    if let Some(r) = &remote {
        stores.push(r.as_ref());
    }
    // As k3s: a name that is in no store is a warning, not a failure (a script deleting what a
    // retention already pruned goes on).
    for n in names {
        let mut found = false;
        for store in &stores {
            if store.head(n).await?.is_some() {
                found = true;
                if let Some(hold) = k3s_snapshot_core::retention::delete_unless_held(*store, n).await? {
                    // As retention does: a hold is the bucket doing its job, not a failure.
                    tracing::warn!(snapshot = %n, "{} is under {hold}; not deleted", store.location(n));
                    continue;
                }
                tracing::info!(snapshot = %n, location = %store.location(n), "deleted snapshot");
                println!("Deleted {}", store.location(n));
            }
        }
        if !found {
            let places: Vec<String> = stores.iter().map(|s| s.describe()).collect();
            tracing::warn!(
                snapshot = %n,
                "snapshot {n} not found in {}; nothing deleted for it (`etcd-snapshot ls` lists the snapshots)",
                places.join(" or ")
            );
        }
    }
    Ok(())
}

async fn prune_cmd(common: &CommonArgs) -> anyhow::Result<()> {
    name::validate_prefix(&common.name).context("--name")?;
    let local = common.local_store();
    let deleted = prune(&local, &RetentionPolicy { prefix: &common.name, keep: common.retention }).await?;
    for d in &deleted {
        println!("Pruned {}", local.location(d));
    }
    if let Some(remote) = common.s3.open().await? {
        let policy = RetentionPolicy { prefix: &common.name, keep: common.s3.retention };
        for d in prune(remote.as_ref(), &policy).await? {
            println!("Pruned {}", remote.location(&d));
        }
    }
    Ok(())
}

/// A progress bar on stderr when it is a terminal; nothing otherwise.
pub(crate) fn bar() -> Arc<dyn Progress> {
    if std::io::stderr().is_terminal() {
        Arc::new(Bar(indicatif::ProgressBar::hidden()))
    } else {
        Arc::new(NoProgress)
    }
}

struct Bar(indicatif::ProgressBar);

impl Progress for Bar {
    fn start(&self, what: &str, total: Option<u64>) {
        let style = match total {
            Some(t) => {
                self.0.set_length(t);
                indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
            }
            None => indicatif::ProgressStyle::with_template("{msg} {spinner} {bytes} {bytes_per_sec}"),
        };
        if let Ok(s) = style {
            self.0.set_style(s.progress_chars("=> "));
        }
        self.0.set_message(what.to_string());
        self.0.set_position(0);
        self.0.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

async fn status_cmd(common: &CommonArgs, target: &str, output: StatusFormat, check_hash: bool) -> anyhow::Result<()> {
    let local = common.local_store();
    let as_path = PathBuf::from(target);
    // Work files (a download, an extracted zip) live in a private temp dir that is removed at the end.
    let scratch_parent = if local.dir().is_dir() { local.dir().to_path_buf() } else { std::env::temp_dir() };
    let scratch = tempfile::Builder::new().prefix(".status-").tempdir_in(&scratch_parent)?;
    // An encrypted snapshot needs the identity: said before anything is downloaded.
    let identities = common.identities()?;
    if identities.is_none() && encryption::has_age_suffix(&as_path) {
        return Err(k3s_snapshot_core::Error::NeedIdentity { name: target.to_string() }.into());
    }
    let mut path = if target.contains('/') || (as_path.is_file() && !local.dir().join(target).is_file()) {
        as_path
    } else {
        name::validate_file_name(target)?;
        if common.s3.enabled {
            let Some(remote) = common.s3.open().await? else { unreachable!("--s3 is on") };
            let progress = bar();
            s3_backend::download_with_metadata(remote.as_ref(), target, scratch.path(), progress.as_ref()).await?.0
        } else {
            local.dir().join(target)
        }
    };
    if !path.is_file() {
        bail!("snapshot {} not found; give a path or a name that `etcd-snapshot ls` shows", path.display());
    }
    // A decrypted or extracted file stays a scratch file in the temp dir, removed with it; `kind`
    // is the name it stands for (`x.zip.age` → `x.zip` → `x`), which says what to do next.
    let mut kind = path.clone();
    let mut _decrypted = None;
    if encryption::is_encrypted(&path)? {
        let ids = identities;
        let (src, into) = (path.clone(), scratch.path().to_path_buf());
        let shown = kind.file_name().map_or_else(|| target.to_string(), |n| n.to_string_lossy().into_owned());
        let x = tokio::task::spawn_blocking(move || encryption::decrypt_to_scratch(&src, &into, ids.as_ref(), &shown))
            .await??;
        path = x.path().to_path_buf();
        kind = x.target().to_path_buf();
        _decrypted = Some(x);
    }
    let mut _extracted = None;
    if kind.extension().is_some_and(|e| e == "zip") {
        let zip = path.clone();
        let into = scratch.path().to_path_buf();
        let x =
            tokio::task::spawn_blocking(move || k3s_snapshot_core::compress::extract_to_scratch(&zip, &into)).await??;
        path = x.path().to_path_buf();
        _extracted = Some(x);
    }
    let shown = path.clone();
    let st = tokio::task::spawn_blocking(move || k3s_snapshot_core::status::status_with(&path, check_hash)).await??;
    let mut out = std::io::stdout().lock();
    match output {
        StatusFormat::Json => writeln!(out, "{}", st.etcdutl_json())?,
        StatusFormat::Table => {
            writeln!(out, "{:<10}  {:>10}  {:>10}  {:>12}", "Hash", "Revision", "Total Keys", "Total Size")?;
            writeln!(out, "{:<10x}  {:>10}  {:>10}  {:>12}", st.hash, st.revision, st.total_key, st.total_size)?;
            if let Some(ci) = st.consistent_index {
                writeln!(out, "consistent index {ci}")?;
            }
            match &st.trailer {
                TrailerStatus::Absent => writeln!(out, "sha256 trailer absent (not made by `snapshot save`)")?,
                TrailerStatus::Valid { sha256 } => writeln!(out, "sha256 {sha256} verified")?,
                TrailerStatus::Unchecked { expected } => writeln!(out, "sha256 {expected} not checked")?,
                TrailerStatus::Mismatch { .. } => {}
            }
            for m in &st.members {
                writeln!(out, "member {} {} {}", m.id, m.name, m.peer_urls.join(","))?;
            }
            for w in &st.warnings {
                writeln!(out, "warning: {w}")?;
            }
        }
    }
    tracing::debug!(snapshot = %shown.display(), "status read");
    Ok(())
}
