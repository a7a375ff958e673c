//! `etcd-snapshot`'s subcommands and their flags, as clap parses them; run here
//! ([`crate::snapshot`]) or by a server (`--etcd-server`, [`crate::remote`]).

use std::path::PathBuf;

use crate::args::{CommonArgs, OutputFormat, StatusFormat};

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
