//! The data directory in k3s's layout (SPEC §2). Every path the server reads or writes is named
//! here, so that the layout is written down once.

use std::path::{Path, PathBuf};

/// `${data-dir}` and the paths below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// Relative paths are made absolute, so that paths written into the etcd client config are
    /// usable from any working directory.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        let root = std::path::absolute(&root).unwrap_or(root);
        DataDir { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `server/`
    pub fn server(&self) -> PathBuf {
        self.root.join("server")
    }
    /// `server/token`: the cluster token, `K10<ca hash>::server:<secret>`.
    pub fn token(&self) -> PathBuf {
        self.server().join("token")
    }
    /// `server/tls/`: the cluster CA and the supervisor API's certificate.
    pub fn tls(&self) -> PathBuf {
        self.server().join("tls")
    }
    /// `server/tls/etcd/`: etcd's CAs and certificates.
    pub fn etcd_tls(&self) -> PathBuf {
        self.tls().join("etcd")
    }
    /// `server/db/`
    pub fn db(&self) -> PathBuf {
        self.server().join("db")
    }
    /// `server/db/etcd/`: etcd's data dir.
    pub fn etcd(&self) -> PathBuf {
        self.db().join("etcd")
    }
    /// `server/db/etcd/config`: etcd's config file (k3s's place for it), which `etcd-snapshot`
    /// reads to find etcd.
    pub fn etcd_config(&self) -> PathBuf {
        k3s_snapshot_core::etcd::config_path(&self.root)
    }
    /// `server/db/etcd-old/`: the data moved aside by the latest reset.
    pub fn etcd_old(&self) -> PathBuf {
        self.db().join("etcd-old")
    }
    /// `server/db/etcd-restore.tmp/`: a restore in progress (removed at start).
    pub fn etcd_restore_tmp(&self) -> PathBuf {
        self.db().join("etcd-restore.tmp")
    }
    /// `server/db/etcd-restore/`: a complete restore waiting to be swapped in.
    pub fn etcd_restore(&self) -> PathBuf {
        self.db().join("etcd-restore")
    }
    /// `server/db/etcd-old.tmp/`: a copy into `etcd-old` in progress (removed at start).
    pub fn etcd_old_tmp(&self) -> PathBuf {
        self.db().join("etcd-old.tmp")
    }
    /// `server/db/snapshots/`: the default snapshot dir.
    pub fn snapshots(&self) -> PathBuf {
        self.db().join("snapshots")
    }
    /// `server/db/reset-flag`
    pub fn reset_flag(&self) -> PathBuf {
        self.db().join("reset-flag")
    }
    /// `server/k3s-snapshot.lock`: held (flock) while a server runs on this data dir.
    pub fn lock(&self) -> PathBuf {
        self.server().join("k3s-snapshot.lock")
    }
}

/// The default `--data-dir`: `/var/lib/rancher/k3s` for root, `~/.rancher/k3s` otherwise.
pub fn default_data_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        PathBuf::from("/var/lib/rancher/k3s")
    } else {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
        home.join(".rancher/k3s")
    }
}
