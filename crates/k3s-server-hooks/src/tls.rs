//! Certificates, generated with rcgen on first start and reused after.
//!
//! Files (k3s's names where k3s has them):
//!
//! ```text
//! server/tls/server-ca.{crt,key}              cluster CA: its hash is in the token; signs the supervisor API cert
//! server/tls/serving-supervisor.{crt,key}     the supervisor API (--https-listen-port)
//! server/tls/etcd/server-ca.{crt,key}         etcd client-side CA (trusted by etcd and by tools)
//! server/tls/etcd/server-client.{crt,key}     etcd's serving cert (server and client auth)
//! server/tls/etcd/peer-ca.{crt,key}           etcd peer CA
//! server/tls/etcd/peer-server-client.{crt,key} etcd's peer cert
//! server/tls/etcd/client.{crt,key}            for tools: etcd-snapshot, etcdctl
//! ```
//!
//! CAs are created only when missing, so that a joining server can install the cluster's CAs
//! (see [`CaMaterial`]) before calling [`ensure`]; leaf certificates are minted at every start for
//! the current addresses, except `client.*`, which tools may hold open and is kept.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde::{Deserialize, Serialize};

use crate::layout::DataDir;
use crate::{Error, Result};

/// The names (without extension) of the CAs, relative to `server/tls/`.
pub const CA_NAMES: [&str; 3] = ["server-ca", "etcd/server-ca", "etcd/peer-ca"];

/// Paths of every certificate the server uses.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cluster_ca: PathBuf,
    pub supervisor_cert: PathBuf,
    pub supervisor_key: PathBuf,
    pub etcd_server_ca: PathBuf,
    pub etcd_server_cert: PathBuf,
    pub etcd_server_key: PathBuf,
    pub etcd_peer_ca: PathBuf,
    pub etcd_peer_cert: PathBuf,
    pub etcd_peer_key: PathBuf,
    pub etcd_client_cert: PathBuf,
    pub etcd_client_key: PathBuf,
}

impl TlsFiles {
    pub fn new(dd: &DataDir) -> Self {
        let t = dd.tls();
        let e = dd.etcd_tls();
        TlsFiles {
            cluster_ca: t.join("server-ca.crt"),
            supervisor_cert: t.join("serving-supervisor.crt"),
            supervisor_key: t.join("serving-supervisor.key"),
            etcd_server_ca: e.join("server-ca.crt"),
            etcd_server_cert: e.join("server-client.crt"),
            etcd_server_key: e.join("server-client.key"),
            etcd_peer_ca: e.join("peer-ca.crt"),
            etcd_peer_cert: e.join("peer-server-client.crt"),
            etcd_peer_key: e.join("peer-server-client.key"),
            etcd_client_cert: e.join("client.crt"),
            etcd_client_key: e.join("client.key"),
        }
    }
}

/// The CAs with their keys: what a joining server needs to mint its own certificates.
/// Handed out only to a holder of the token.
#[derive(Clone, Serialize, Deserialize)]
pub struct CaMaterial {
    /// `(name, cert PEM, key PEM)` for each of [`CA_NAMES`].
    pub cas: Vec<(String, String, String)>,
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.cas.iter().map(|c| &c.0).collect();
        f.debug_struct("CaMaterial").field("cas", &names).finish_non_exhaustive()
    }
}

impl CaMaterial {
    pub fn load(dd: &DataDir) -> Result<Self> {
        let mut cas = Vec::new();
        for name in CA_NAMES {
            let (c, k) = ca_paths(dd, name);
            cas.push((name.to_string(), read(&c)?, read(&k)?));
        }
        Ok(CaMaterial { cas })
    }

    /// The certificate PEM of one of [`CA_NAMES`].
    pub fn cert(&self, name: &str) -> Option<&str> {
        self.cas.iter().find(|c| c.0 == name).map(|c| c.1.as_str())
    }

    /// Checks that every CA is there and is a CA certificate with its key.
    pub fn validate(&self) -> Result<()> {
        for name in CA_NAMES {
            let Some((_, cert, key)) = self.cas.iter().find(|c| c.0 == name) else {
                return Err(Error::Tls {
                    action: "use the CA material".into(),
                    detail: format!("CA {name} is missing"),
                });
            };
            let kp = KeyPair::from_pem(key).map_err(tls_err(format!("read the key of CA {name}")))?;
            Issuer::from_ca_cert_pem(cert, kp).map_err(tls_err(format!("read CA {name}")))?;
        }
        if let Some((name, ..)) = self.cas.iter().find(|c| !CA_NAMES.contains(&c.0.as_str())) {
            return Err(Error::Tls { action: "use the CA material".into(), detail: format!("unknown CA {name:?}") });
        }
        Ok(())
    }

    /// Writes the CAs into a data dir, replacing any there. The tools' client certificate
    /// (`etcd/client.*`, otherwise kept across starts) is removed when the etcd CA changes, so
    /// that [`ensure`] mints one the new CA signed.
    pub fn install(&self, dd: &DataDir) -> Result<()> {
        self.validate()?;
        let (etcd_ca, _) = ca_paths(dd, CA_NAMES[1]);
        let etcd_ca_changed = std::fs::read_to_string(&etcd_ca).ok().as_deref() != self.cert(CA_NAMES[1]);
        for (name, cert, key) in &self.cas {
            let (c, k) = ca_paths(dd, name);
            write_private(&k, key.as_bytes())?;
            write_private(&c, cert.as_bytes())?;
        }
        if etcd_ca_changed {
            let files = TlsFiles::new(dd);
            for p in [&files.etcd_client_cert, &files.etcd_client_key] {
                match std::fs::remove_file(p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::Io { action: "remove", path: p.clone(), cause: e }),
                }
            }
        }
        Ok(())
    }
}

fn ca_paths(dd: &DataDir, name: &str) -> (PathBuf, PathBuf) {
    (dd.tls().join(format!("{name}.crt")), dd.tls().join(format!("{name}.key")))
}

fn read(p: &Path) -> Result<String> {
    std::fs::read_to_string(p).map_err(Error::io("read", p))
}

fn write_private(p: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = p.parent() {
        k3s_snapshot_core::store::create_private_dir(parent)?;
    }
    k3s_snapshot_core::store::write_file_atomic(p, bytes)?;
    Ok(())
}

fn tls_err(action: impl Into<String>) -> impl FnOnce(rcgen::Error) -> Error {
    let action = action.into();
    move |e| Error::Tls { action, detail: e.to_string() }
}

/// Loads a CA or creates it when its files are missing.
fn ensure_ca(cert: &Path, key: &Path, cn: &str) -> Result<Issuer<'static, KeyPair>> {
    if cert.exists() && key.exists() {
        let kp = KeyPair::from_pem(&read(key)?).map_err(tls_err(format!("read CA key {}", key.display())))?;
        return Issuer::from_ca_cert_pem(&read(cert)?, kp).map_err(tls_err(format!("read CA {}", cert.display())));
    }
    let kp = KeyPair::generate().map_err(tls_err("generate a CA key"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{cn}@{}", chrono::Utc::now().timestamp()));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let c = params.self_signed(&kp).map_err(tls_err(format!("create CA {cn}")))?;
    write_private(key, kp.serialize_pem().as_bytes())?;
    write_private(cert, c.pem().as_bytes())?;
    tracing::info!(ca = %cert.display(), "created certificate authority");
    Ok(Issuer::new(params, kp))
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    cn: &str,
    sans: &[SanType],
    eku: &[ExtendedKeyUsagePurpose],
    cert: &Path,
    key: &Path,
) -> Result<()> {
    let kp = KeyPair::generate().map_err(tls_err("generate a key"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.subject_alt_names = sans.to_vec();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = eku.to_vec();
    params.use_authority_key_identifier_extension = true;
    let c = params.signed_by(&kp, issuer).map_err(tls_err(format!("sign certificate {cn}")))?;
    write_private(key, kp.serialize_pem().as_bytes())?;
    write_private(cert, c.pem().as_bytes())?;
    Ok(())
}

/// Creates missing CAs, mints the leaf certificates for these addresses and returns the paths.
/// `ips` are the addresses etcd and the supervisor API are reached at; loopback is always added.
pub fn ensure(dd: &DataDir, node_name: &str, ips: &[IpAddr]) -> Result<TlsFiles> {
    let files = TlsFiles::new(dd);
    k3s_snapshot_core::store::create_private_dir(&dd.etcd_tls())?;
    let (cc, ck) = ca_paths(dd, CA_NAMES[0]);
    let (sc, sk) = ca_paths(dd, CA_NAMES[1]);
    let (pc, pk) = ca_paths(dd, CA_NAMES[2]);
    let cluster = ensure_ca(&cc, &ck, "k3s-snapshot-server-ca")?;
    let server = ensure_ca(&sc, &sk, "etcd-server-ca")?;
    let peer = ensure_ca(&pc, &pk, "etcd-peer-ca")?;

    let mut sans: Vec<SanType> = vec![SanType::DnsName("localhost".try_into().expect("valid dns name"))];
    if let Ok(n) = node_name.to_string().try_into() {
        sans.push(SanType::DnsName(n));
    }
    let mut seen = Vec::new();
    for ip in ips.iter().copied().chain([IpAddr::from([127, 0, 0, 1]), IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])]) {
        if !ip.is_unspecified() && !seen.contains(&ip) {
            seen.push(ip);
            sans.push(SanType::IpAddress(ip));
        }
    }
    use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    leaf(&cluster, "k3s-snapshot-supervisor", &sans, &[ServerAuth], &files.supervisor_cert, &files.supervisor_key)?;
    leaf(&server, "etcd-server", &sans, &[ServerAuth, ClientAuth], &files.etcd_server_cert, &files.etcd_server_key)?;
    leaf(&peer, "etcd-peer", &sans, &[ServerAuth, ClientAuth], &files.etcd_peer_cert, &files.etcd_peer_key)?;
    if !(files.etcd_client_cert.exists() && files.etcd_client_key.exists()) {
        leaf(&server, "etcd-client", &[], &[ClientAuth], &files.etcd_client_cert, &files.etcd_client_key)?;
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_are_kept_across_starts_and_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::new(tmp.path());
        let f = ensure(&dd, "node-a", &["10.1.2.3".parse().unwrap()]).unwrap();
        let ca1 = std::fs::read(&f.cluster_ca).unwrap();
        let client1 = std::fs::read(&f.etcd_client_cert).unwrap();
        let f = ensure(&dd, "node-a", &[]).unwrap();
        assert_eq!(std::fs::read(&f.cluster_ca).unwrap(), ca1);
        assert_eq!(std::fs::read(&f.etcd_client_cert).unwrap(), client1);
        let mode = std::fs::metadata(&f.etcd_client_key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mode = std::fs::metadata(dd.etcd_tls()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let m = CaMaterial::load(&dd).unwrap();
        assert_eq!(m.cas.len(), 3);
        assert!(!format!("{m:?}").contains("PRIVATE"));
    }

    #[test]
    fn installed_cas_replace_the_local_ones_and_the_client_cert_is_reissued() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let (da, db) = (DataDir::new(a.path()), DataDir::new(b.path()));
        ensure(&da, "a", &[]).unwrap();
        let fb = ensure(&db, "b", &[]).unwrap();
        let old_client = std::fs::read(&fb.etcd_client_cert).unwrap();
        let m = CaMaterial::load(&da).unwrap();
        m.install(&db).unwrap();
        assert!(!fb.etcd_client_cert.exists(), "a client cert of the old CA was kept");
        let fb = ensure(&db, "b", &[]).unwrap();
        assert_ne!(std::fs::read(&fb.etcd_client_cert).unwrap(), old_client);
        assert_eq!(std::fs::read(&fb.cluster_ca).unwrap(), std::fs::read(TlsFiles::new(&da).cluster_ca).unwrap());
        // Installing the same CAs again keeps the client cert.
        let kept = std::fs::read(&fb.etcd_client_cert).unwrap();
        m.install(&db).unwrap();
        assert_eq!(std::fs::read(&fb.etcd_client_cert).unwrap(), kept);

        let mut bad = m.clone();
        bad.cas[1].2 = "not a key".into();
        assert!(bad.install(&db).is_err());
        let mut missing = m.clone();
        missing.cas.pop();
        assert!(missing.validate().unwrap_err().to_string().contains("missing"));
    }
}
