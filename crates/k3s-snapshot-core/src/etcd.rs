//! Reaching etcd: the client configuration ([`EtcdClientConfig`]: endpoints and TLS files),
//! found for a data dir from `${data-dir}/server/db/etcd/config` (etcd's own config file, as k3s
//! and our server write it, see [`crate::etcd_config`]; or the `endpoints:` file that earlier
//! versions of our server wrote), and a connection that fails fast with a clear message when etcd
//! is not there.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How long to wait for etcd to answer the first request.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a member may take to confirm that it is part of a quorum. etcd itself gives up on a
/// linearizable read after its request timeout (7 s with default settings).
pub const QUORUM_TIMEOUT: Duration = Duration::from_secs(10);

/// Endpoints and TLS material for a client of etcd. Also the file format earlier versions of our
/// server wrote to `server/db/etcd/config` (still read, see [`EtcdClientConfig::for_data_dir`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct EtcdClientConfig {
    pub endpoints: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cacert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

/// `${data-dir}/server/db/etcd/config`
pub fn config_path(data_dir: &Path) -> PathBuf {
    data_dir.join("server/db/etcd/config")
}

/// `${data-dir}/server/tls/etcd/`: where k3s (and our server) keep the CA that signed etcd's
/// serving certificate (`server-ca.crt`) and the client pair for tools (`client.crt`,
/// `client.key`).
pub fn etcd_tls_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("server/tls/etcd")
}

impl EtcdClientConfig {
    /// How to reach the etcd of a data dir, from `${data-dir}/server/db/etcd/config`.
    ///
    /// etcd's own config file (what k3s writes for its embedded etcd, and our server since it
    /// starts etcd with `--config-file`): the endpoint is the loopback client URL etcd listens on
    /// ([`crate::etcd_config::pick_endpoint`]), the CA is `client-transport-security`'s
    /// `trusted-ca-file`, and the client certificate is `server/tls/etcd/client.{crt,key}`, the
    /// pair k3s's own `etcd-snapshot` uses (the file's `cert-file`/`key-file` are etcd's serving
    /// pair, not a client's). The `endpoints:` file of earlier versions of ours is read as it is.
    pub fn for_data_dir(data_dir: &Path) -> Result<Self> {
        let path = config_path(data_dir);
        let bytes = std::fs::read(&path).map_err(Error::io("read etcd config", &path))?;
        let invalid = |what: String| {
            Error::Invalid(format!(
                "etcd config {}: {what}; pass --etcd-endpoints (with --etcd-cacert, --etcd-cert, --etcd-key)",
                path.display()
            ))
        };
        let doc: serde_yaml::Mapping = match serde_yaml::from_slice(&bytes) {
            Ok(serde_yaml::Value::Mapping(m)) => m,
            Ok(_) => return Err(invalid("not a YAML mapping".into())),
            Err(e) => return Err(invalid(format!("not YAML ({e})"))),
        };
        if doc.contains_key("endpoints") {
            return serde_yaml::from_value(serde_yaml::Value::Mapping(doc))
                .map_err(|e| invalid(format!("not a valid client config ({e})")));
        }
        if !crate::etcd_config::is_etcd_config(&doc) {
            return Err(invalid("has neither etcd's listen-client-urls nor endpoints".into()));
        }
        let side = crate::etcd_config::client_side(&doc, &path)?;
        if !side.endpoint.starts_with("https://") {
            return Ok(EtcdClientConfig { endpoints: vec![side.endpoint], cacert: None, cert: None, key: None });
        }
        let tls = etcd_tls_dir(data_dir);
        let cacert = side.trusted_ca_file.unwrap_or_else(|| tls.join("server-ca.crt"));
        let (cert, key) = (tls.join("client.crt"), tls.join("client.key"));
        let (cert, key) = if cert.is_file() && key.is_file() {
            (Some(cert), Some(key))
        } else if side.client_cert_auth {
            return Err(Error::Invalid(format!(
                "etcd at {} wants a client certificate and {} or {} is missing; pass --etcd-cert and --etcd-key",
                side.endpoint,
                cert.display(),
                key.display()
            )));
        } else {
            (None, None)
        };
        Ok(EtcdClientConfig { endpoints: vec![side.endpoint], cacert: Some(cacert), cert, key })
    }

    /// Reads a file in the `endpoints:` format.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(Error::io("read etcd client config", path))?;
        serde_yaml::from_slice(&bytes)
            .map_err(|e| Error::Invalid(format!("etcd client config {}: {e}", path.display())))
    }

    /// Writes the `endpoints:` format (what earlier versions of our server wrote).
    pub fn save(&self, path: &Path) -> Result<()> {
        let yaml = serde_yaml::to_string(self).expect("config serializes");
        crate::store::write_file_atomic(path, yaml.as_bytes())
    }

    /// The same TLS files for other endpoints (another member's client URLs).
    pub fn with_endpoints(&self, endpoints: Vec<String>) -> Self {
        EtcdClientConfig { endpoints, ..self.clone() }
    }

    pub fn endpoints_display(&self) -> String {
        self.endpoints.join(",")
    }

    fn tls(&self) -> Result<Option<TlsOptions>> {
        let uses_tls = self.endpoints.iter().any(|e| e.starts_with("https://"));
        if !uses_tls && self.cacert.is_none() && self.cert.is_none() {
            return Ok(None);
        }
        let mut tls = TlsOptions::new();
        if let Some(ca) = &self.cacert {
            let pem = std::fs::read(ca).map_err(Error::io("read etcd CA certificate", ca))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => {
                let cert = std::fs::read(c).map_err(Error::io("read etcd client certificate", c))?;
                let key = std::fs::read(k).map_err(Error::io("read etcd client key", k))?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            (None, None) => {}
            _ => return Err(Error::Invalid("--etcd-cert and --etcd-key go together; give both or neither".into())),
        }
        Ok(Some(tls))
    }

    /// Connects and asks etcd for its status, so that a dead or wrong endpoint fails here, within
    /// [`CONNECT_TIMEOUT`], with a message that names it.
    pub async fn connect(&self) -> Result<EtcdConnection> {
        if self.endpoints.is_empty() {
            return Err(Error::Invalid(
                "no etcd endpoint: give --etcd-endpoints or --data-dir of a running server".into(),
            ));
        }
        for e in &self.endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(Error::Invalid(format!(
                    "etcd endpoint {e:?} has no scheme; write it as https://HOST:PORT or http://HOST:PORT"
                )));
            }
        }
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(10));
        if let Some(tls) = self.tls()? {
            opts = opts.with_tls(tls);
        }
        let endpoints = self.endpoints_display();
        let unreachable = |cause| Error::EtcdUnreachable { endpoints: endpoints.clone(), cause };
        let connect = async {
            let mut client = Client::connect(&self.endpoints, Some(opts)).await.map_err(unreachable)?;
            let status = client.status().await.map_err(unreachable)?;
            Ok::<_, Error>((client, status))
        };
        let (client, status) = match tokio::time::timeout(CONNECT_TIMEOUT * 2, connect).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(Error::Invalid(format!(
                    "cannot reach etcd at {endpoints}: no answer within {}s; check --etcd-endpoints and that etcd is running",
                    (CONNECT_TIMEOUT * 2).as_secs()
                )))
            }
        };
        Ok(EtcdConnection {
            client,
            endpoints,
            version: status.version().to_string(),
            revision: status.header().map(|h| h.revision()).unwrap_or_default(),
            db_size: status.db_size(),
            cluster_id: status.header().map(|h| h.cluster_id()).unwrap_or_default(),
        })
    }
}

impl EtcdConnection {
    /// A linearizable read, which the member can only answer once the leader has confirmed that
    /// it still leads a quorum. A member cut off from the others answers `Status` and streams its
    /// local database just the same, so without this a partitioned member's snapshot would look
    /// current while its data may be behind the cluster.
    pub async fn confirm_quorum(&mut self) -> Result<()> {
        let read = self.client.get("health", Some(etcd_client::GetOptions::new().with_count_only()));
        let detail = match tokio::time::timeout(QUORUM_TIMEOUT, read).await {
            Ok(Ok(r)) => {
                // The newest revision, as of this linearizable read (a save starts right after).
                if let Some(h) = r.header() {
                    self.revision = h.revision();
                }
                return Ok(());
            }
            Ok(Err(cause)) => crate::error::one_line(&cause),
            Err(_) => format!("no answer to a linearizable read within {}s", QUORUM_TIMEOUT.as_secs()),
        };
        Err(Error::NoQuorum { endpoints: self.endpoints.clone(), detail })
    }

    /// etcd's `HashKV` at `revision`: the hash of the MVCC history the member keeps up to it,
    /// with the compaction it was taken under. It reads the whole key space (about as long as a
    /// snapshot's read of the db), so callers bound it.
    pub async fn live_hash(&mut self, revision: i64) -> Result<crate::metadata::LiveHash> {
        let r = self
            .client
            .hash_kv(revision)
            .await
            .map_err(|cause| Error::Etcd { endpoints: self.endpoints.clone(), cause })?;
        Ok(crate::metadata::LiveHash { revision, hash: r.hash(), compact_revision: r.compact_version() })
    }
}

/// A connected client and what etcd said about itself when we connected.
pub struct EtcdConnection {
    pub client: Client,
    pub endpoints: String,
    pub version: String,
    pub revision: i64,
    pub db_size: i64,
    /// etcd's cluster ID: the history the data belongs to (a restore makes a new one).
    pub cluster_id: u64,
}
