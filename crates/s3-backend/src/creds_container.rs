//! Container credentials: EKS Pod Identity and ECS task roles. The platform sets
//! `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` (ECS: a path on `http://169.254.170.2`) or
//! `AWS_CONTAINER_CREDENTIALS_FULL_URI` (EKS Pod Identity: `http://169.254.170.23/v1/credentials`),
//! with `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` (read on every request: EKS rotates it) or
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN` sent as the `Authorization` header. The answer is the JSON
//! credentials document an instance role has (`AccessKeyId`, `SecretAccessKey`, `Token`,
//! `Expiration`). As the AWS SDKs do, a full URI over plain http must name loopback or one of the
//! agents' link-local addresses, so a token is never sent in the clear across a network.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use crate::creds_source::{bounded_text, http_client, json_credentials, Found, Origin};

/// The ECS agent, base of `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`.
pub const ECS_ENDPOINT: &str = "http://169.254.170.2";
/// Bound on each request to the credentials endpoint.
pub const CONTAINER_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest token file read.
const MAX_TOKEN: u64 = 16 << 10;

/// A value that is never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Redacted(pub String);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where container credentials come from, as the environment says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerConfig {
    pub url: String,
    /// `AWS_CONTAINER_AUTHORIZATION_TOKEN`.
    pub auth_token: Option<Redacted>,
    /// `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`, which wins over the token.
    pub auth_token_file: Option<PathBuf>,
}

impl ContainerConfig {
    pub(crate) fn from_vars(var: &impl Fn(&str) -> Option<String>) -> Option<ContainerConfig> {
        let url = match var("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
            Some(rel) => format!("{ECS_ENDPOINT}/{}", rel.trim_start_matches('/')),
            None => var("AWS_CONTAINER_CREDENTIALS_FULL_URI")?,
        };
        Some(ContainerConfig {
            url,
            auth_token: var("AWS_CONTAINER_AUTHORIZATION_TOKEN").map(Redacted),
            auth_token_file: var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE").map(PathBuf::from),
        })
    }
}

/// Whether plain http may carry credentials to `url`'s host: loopback, or the ECS and EKS agents.
fn trusted_plain_http_host(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else { return false };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let agents = [
        IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2)),
        IpAddr::V4(Ipv4Addr::new(169, 254, 170, 23)),
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23)),
    ];
    match host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback() || agents.contains(&ip),
        Err(_) => false,
    }
}

/// The container credentials link of a keyring.
pub(crate) struct Container {
    cfg: ContainerConfig,
    url: reqwest::Url,
    http: reqwest::Client,
}

impl Container {
    pub fn new(cfg: ContainerConfig) -> Result<Container, String> {
        let bad = |why: &str| {
            format!(
                "invalid container credentials URL {:?} (AWS_CONTAINER_CREDENTIALS_FULL_URI or _RELATIVE_URI): {why}",
                cfg.url
            )
        };
        let url = reqwest::Url::parse(cfg.url.trim()).map_err(|_| bad("not a URL"))?;
        match url.scheme() {
            "https" => {}
            "http" if trusted_plain_http_host(&url) => {}
            "http" => return Err(bad("plain http is only allowed to loopback or the ECS/EKS agents (169.254.170.2, 169.254.170.23, fd00:ec2::23); use https")),
            _ => return Err(bad("give an http(s) URL")),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad("credentials in the URL are not supported; use AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"));
        }
        // The agents are local: never through the S3 proxy.
        let http = http_client(CONTAINER_TIMEOUT, false)?;
        Ok(Container { cfg, url, http })
    }

    pub fn name(&self) -> String {
        format!("container credentials at {}", self.url)
    }

    fn authorization(&self) -> Result<Option<String>, String> {
        let token = match &self.cfg.auth_token_file {
            Some(path) => {
                use std::io::Read;
                let mut v = Vec::new();
                std::fs::File::open(path).and_then(|f| f.take(MAX_TOKEN).read_to_end(&mut v)).map_err(|e| {
                    format!("cannot read AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE {}: {e}", path.display())
                })?;
                String::from_utf8(v).unwrap_or_default().trim().to_string()
            }
            None => match &self.cfg.auth_token {
                Some(t) => t.0.trim().to_string(),
                None => return Ok(None),
            },
        };
        // Goes into a header: printable ASCII on one line, or nothing is sent.
        if token.is_empty() || !token.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err("the container authorization token (AWS_CONTAINER_AUTHORIZATION_TOKEN[_FILE]) is empty or not one line of printable text".into());
        }
        Ok(Some(token))
    }

    pub async fn fetch(&self) -> Result<Found, String> {
        let mut req = self.http.get(self.url.clone()).header("accept", "application/json");
        if let Some(token) = self.authorization()? {
            req = req.header("authorization", token);
        }
        let body = bounded_text(req, "the credentials request", CONTAINER_TIMEOUT, false).await?;
        json_credentials(&body, "the container credentials", false, Origin::Container { url: self.url.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::creds_source::tests::vars;

    #[test]
    fn the_relative_uri_is_on_the_ecs_agent_and_wins() {
        let c = ContainerConfig::from_vars(&vars(&[
            ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/v2/credentials/abc"),
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://127.0.0.1:1/x"),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN", "hidden-token"),
        ]))
        .unwrap();
        assert_eq!(c.url, "http://169.254.170.2/v2/credentials/abc");
        assert!(!format!("{c:?}").contains("hidden-token"));
        assert!(ContainerConfig::from_vars(&vars(&[])).is_none());
    }

    #[test]
    fn plain_http_only_to_loopback_and_the_agents() {
        let cfg = |url: &str| ContainerConfig { url: url.into(), auth_token: None, auth_token_file: None };
        for ok in [
            "http://127.0.0.1:8080/creds",
            "http://localhost/x",
            "http://169.254.170.23/v1/credentials",
            "http://169.254.170.2/v2/x",
            "http://[fd00:ec2::23]/v1/credentials",
            "http://[::1]:9/x",
            "https://creds.example.com/x",
        ] {
            assert!(Container::new(cfg(ok)).is_ok(), "{ok}");
        }
        for bad in
            ["http://10.0.0.1/creds", "http://example.com/x", "ftp://127.0.0.1/x", "nonsense", "http://u:p@127.0.0.1/x"]
        {
            let e = Container::new(cfg(bad)).err().unwrap();
            assert!(e.contains("AWS_CONTAINER_CREDENTIALS_FULL_URI"), "{e}");
        }
    }
}
