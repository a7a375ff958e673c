//! The minio client of a store: built from the configuration (endpoint, CA bundle, proxy) and
//! rebuilt whenever the credential chain hands out new credentials ([`Signer`]); and the HTTP
//! client of streamed PUTs, with the same TLS choices.

use std::sync::Arc;

use minio::s3::client::{MinioClient, MinioClientBuilder};
use minio::s3::http::BaseUrl;

use k3s_snapshot_core::{Error, Result};

use crate::config::{redact_url_password, S3Config};
use crate::creds_keyring::Keyring;
use crate::creds_source::{Found, Key};
use crate::error::{innermost_detail, S3Error};

/// What a minio client is built from, kept to build it again when the credentials change.
pub(super) struct ClientParts {
    pub(super) base: BaseUrl,
    /// The `--etcd-s3-endpoint-ca` bundle.
    pub(super) ca_pem: Option<Vec<u8>>,
    pub(super) skip_ssl_verify: bool,
    /// For messages.
    pub(super) endpoint: String,
}

impl ClientParts {
    /// A client signing with `key`, or sending anonymous requests.
    pub(super) fn build(&self, key: Option<&Key>) -> std::result::Result<MinioClient, String> {
        // minio reads its CA from a file when the client is built: the bundle, written privately
        // for as long as that takes.
        let ca_file = match &self.ca_pem {
            Some(pem) => {
                let mut f = tempfile::NamedTempFile::new().map_err(|e| {
                    format!(
                        "cannot write the --etcd-s3-endpoint-ca bundle to {}: {}",
                        std::env::temp_dir().display(),
                        innermost_detail(&e)
                    )
                })?;
                std::io::Write::write_all(&mut f, pem).map_err(|e| {
                    format!(
                        "cannot write the --etcd-s3-endpoint-ca bundle to {}: {}",
                        f.path().display(),
                        innermost_detail(&e)
                    )
                })?;
                Some(f)
            }
            None => None,
        };
        MinioClientBuilder::new(self.base.clone())
            .provider(key.map(Key::provider))
            .ssl_cert_file(ca_file.as_ref().map(|f| f.path()))
            .ignore_cert_check(self.skip_ssl_verify.then_some(true))
            .app_info(Some(("k3s-snapshot".into(), env!("CARGO_PKG_VERSION").into())))
            .build()
            // The builder's errors are about the CA file or the TLS setup, never the credentials.
            .map_err(|e| format!("cannot set up the s3 client for {}: {}", self.endpoint, innermost_detail(&e)))
    }
}

/// The minio client that signs with the chain's current credentials. minio caches the signing
/// key it derives per client without looking at the secret again, so new credentials (an instance
/// role's, refreshed) get a new client rather than a provider that changes under the old one.
pub(super) struct Signer {
    pub(super) keyring: Keyring,
    pub(super) parts: ClientParts,
    /// The credentials the client signs with (`None`: anonymous) and the client.
    pub(super) current: std::sync::RwLock<(Option<Arc<Found>>, MinioClient)>,
}

impl Signer {
    /// Brings the client up to date with the chain (which may ask the instance role) and returns
    /// the credentials it signs with.
    pub(super) async fn refresh(&self) -> Result<Option<Arc<Found>>, S3Error> {
        let found = self.keyring.current().await;
        let same = |cur: &Option<Arc<Found>>| match (cur, &found) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if same(&self.current.read().unwrap_or_else(|p| p.into_inner()).0) {
            return Ok(found);
        }
        let client = self.parts.build(found.as_ref().map(|f| &f.key)).map_err(S3Error::Invalid)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = (found.clone(), client);
        Ok(found)
    }

    pub(super) fn client(&self) -> MinioClient {
        self.current.read().unwrap_or_else(|p| p.into_inner()).1.clone()
    }
}

/// Refuses `--etcd-s3-proxy` unless the process environment already carries it (see
/// [`crate::proxy_env`]): minio's HTTP client only takes a proxy from the environment, and
/// silently going direct would be worse than an error.
pub(super) fn check_proxy_env(cfg: &S3Config, https: bool) -> Result<()> {
    let Some(proxy) = cfg.proxy.as_deref().filter(|p| !p.is_empty() && *p != crate::NO_PROXY_VALUE) else {
        return Ok(());
    };
    let names: &[&str] = if https {
        &["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
    } else {
        &["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
    };
    let active = names.iter().find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()));
    if active.as_deref() == Some(proxy) {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "--etcd-s3-proxy {} is not in effect: the s3 client takes its proxy from {} in the environment, which the program must set at startup (s3_backend::proxy_env)",
        redact_url_password(proxy),
        names[0]
    )))
}

/// The HTTP client of streamed PUTs, with the TLS choices minio's own client gets.
pub(super) fn stream_put_client(
    cfg: &S3Config,
    ca_pem: Option<&[u8]>,
) -> std::result::Result<reqwest::Client, reqwest::Error> {
    let mut b = reqwest::Client::builder()
        .no_gzip()
        .tcp_nodelay(true)
        .user_agent(concat!("k3s-snapshot/", env!("CARGO_PKG_VERSION")))
        .danger_accept_invalid_certs(cfg.skip_ssl_verify);
    if cfg.proxy.as_deref() == Some(crate::NO_PROXY_VALUE) {
        b = b.no_proxy();
    }
    if let Some(pem) = ca_pem {
        // Parsed by ca_bundle before this.
        for cert in reqwest::Certificate::from_pem_bundle(pem)? {
            b = b.add_root_certificate(cert);
        }
    }
    b.build()
}

/// The CA bundle `--etcd-s3-endpoint-ca` names, as k3s takes it: a PEM file, several files
/// separated by spaces, or the PEM itself base64-encoded. Every certificate must parse.
pub(super) fn ca_bundle(spec: &std::path::Path) -> Result<Vec<u8>> {
    let text = spec.to_string_lossy();
    let shown: String =
        if text.chars().count() > 80 { text.chars().take(80).chain(['…']).collect() } else { text.to_string() };
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|cause| Error::Io { action: "read --etcd-s3-endpoint-ca", path: p.into(), cause })
    };
    let pem = if spec.is_file() {
        read(spec)?
    } else if text.split_whitespace().count() > 1 {
        let mut all = Vec::new();
        for f in text.split_whitespace() {
            all.extend(read(std::path::Path::new(f))?);
            all.push(b'\n');
        }
        all
    } else {
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD.decode(text.trim().as_bytes());
        match decoded {
            Ok(pem) if pem.windows(11).any(|w| w == b"-----BEGIN ") => pem,
            _ => read(spec)?,
        }
    };
    match reqwest::Certificate::from_pem_bundle(&pem) {
        Ok(certs) if !certs.is_empty() => Ok(pem),
        Ok(_) => Err(Error::Invalid(format!(
            "--etcd-s3-endpoint-ca {shown} holds no PEM certificate; give the CA certificate in PEM form"
        ))),
        Err(e) => Err(Error::Invalid(format!(
            "--etcd-s3-endpoint-ca {shown} is not a PEM certificate bundle: {}",
            innermost_detail(&e)
        ))),
    }
}
