//! The https client side of the supervisor API, shared by a joining server ([`crate::join`]) and
//! the CLI's `etcd-snapshot --etcd-server` ([`crate::snapshot_api`]): a rustls client that trusts
//! exactly the cluster CA (or, only to fetch that CA for checking, nothing), and bounded reads.

use std::time::Duration;

use k3s_snapshot_core::error::one_line;

/// A client trusting only `ca_pem`; with `None`, a client that accepts any certificate, for
/// `GET /cacerts` alone, whose answer the caller checks against the token's CA hash.
/// No proxies: the supervisor API is reached directly.
pub(crate) fn client(ca_pem: Option<&str>, timeout: Duration) -> std::result::Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .https_only(true)
        .no_proxy()
        .connect_timeout(Duration::from_secs(10))
        .timeout(timeout);
    b = match ca_pem {
        None => b.danger_accept_invalid_certs(true),
        Some(pem) => {
            let cert = reqwest::Certificate::from_pem(pem.as_bytes())
                .map_err(|e| format!("the cluster CA is not a PEM certificate: {}", one_line(&e)))?;
            b.tls_built_in_root_certs(false).add_root_certificate(cert)
        }
    };
    b.build().map_err(|e| format!("cannot build an https client: {}", one_line(&e)))
}

pub(crate) enum Capped {
    TooLarge,
    Read(reqwest::Error),
}

/// The body as text, refused beyond `limit` bytes without reading more than that.
pub(crate) async fn read_capped(mut resp: reqwest::Response, limit: usize) -> std::result::Result<String, Capped> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(Capped::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(Capped::Read)? {
        if body.len() + chunk.len() > limit {
            return Err(Capped::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}
