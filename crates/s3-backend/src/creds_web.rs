//! Web identity (IRSA on EKS, any OIDC issuer): `AWS_WEB_IDENTITY_TOKEN_FILE` holds a token the
//! platform rotates, `AWS_ROLE_ARN` the role to assume with it (`AWS_ROLE_SESSION_NAME`
//! optional). STS `AssumeRoleWithWebIdentity` trades the token for temporary credentials; the
//! request is not signed (the token is the proof). The token file is read again on every
//! exchange, so a rotated token is used at the next refresh.
//!
//! Which STS: `AWS_ENDPOINT_URL_STS` when set; else the region's endpoint
//! (`https://sts.<region>.amazonaws.com`, `.amazonaws.com.cn` in China), the region being
//! `AWS_REGION`, `AWS_DEFAULT_REGION` or `--etcd-s3-region`; `AWS_STS_REGIONAL_ENDPOINTS=legacy`
//! picks the global `https://sts.amazonaws.com` as older SDKs did.

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::creds_source::{bounded_text, http_client, refresh_at, Found, Key, Origin};

/// Bound on one STS exchange.
pub const STS_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest token file read (EKS tokens are about 1 KiB).
const MAX_TOKEN: u64 = 64 << 10;

/// Where web identity credentials come from, as the environment says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebIdentityConfig {
    pub token_file: PathBuf,
    pub role_arn: String,
    /// `AWS_ROLE_SESSION_NAME`; `None`: `k3s-snapshot-<unix seconds>`.
    pub session_name: Option<String>,
    /// `AWS_ENDPOINT_URL_STS`, or the endpoint the region variables name; `None`: the one of
    /// `--etcd-s3-region`.
    pub sts_endpoint: Option<String>,
}

impl WebIdentityConfig {
    /// From the environment, when both `AWS_WEB_IDENTITY_TOKEN_FILE` and `AWS_ROLE_ARN` are set.
    pub(crate) fn from_vars(var: &impl Fn(&str) -> Option<String>) -> Option<WebIdentityConfig> {
        let token_file = PathBuf::from(var("AWS_WEB_IDENTITY_TOKEN_FILE")?);
        let role_arn = var("AWS_ROLE_ARN")?;
        let legacy = var("AWS_STS_REGIONAL_ENDPOINTS").is_some_and(|v| v.trim().eq_ignore_ascii_case("legacy"));
        let sts_endpoint = var("AWS_ENDPOINT_URL_STS").or_else(|| {
            if legacy {
                return Some("https://sts.amazonaws.com".into());
            }
            var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")).map(|r| regional_endpoint(&r))
        });
        Some(WebIdentityConfig { token_file, role_arn, session_name: var("AWS_ROLE_SESSION_NAME"), sts_endpoint })
    }
}

/// STS of `region`.
pub(crate) fn regional_endpoint(region: &str) -> String {
    let region = region.trim();
    let domain = if region.starts_with("cn-") { "amazonaws.com.cn" } else { "amazonaws.com" };
    format!("https://sts.{region}.{domain}")
}

/// The web identity link of a keyring.
pub(crate) struct WebIdentity {
    cfg: WebIdentityConfig,
    /// The STS endpoint, checked.
    endpoint: reqwest::Url,
    http: reqwest::Client,
}

impl WebIdentity {
    pub fn new(cfg: WebIdentityConfig, s3_region: &str) -> Result<WebIdentity, String> {
        let raw = cfg.sts_endpoint.clone().unwrap_or_else(|| regional_endpoint(s3_region));
        let bad = || {
            format!("invalid STS endpoint {raw:?} for web identity: give https://host[:port] in AWS_ENDPOINT_URL_STS")
        };
        let endpoint = reqwest::Url::parse(raw.trim()).map_err(|_| bad())?;
        if !matches!(endpoint.scheme(), "http" | "https") || endpoint.host_str().is_none() {
            return Err(bad());
        }
        if !cfg.role_arn.starts_with("arn:") {
            return Err("AWS_ROLE_ARN is not a role ARN (arn:aws:iam::ACCOUNT:role/NAME)".into());
        }
        // STS is reached like S3 (through --etcd-s3-proxy, if any), unlike the link-local services.
        let http = http_client(STS_TIMEOUT, true)?;
        Ok(WebIdentity { cfg, endpoint, http })
    }

    /// For messages: what this link is.
    pub fn name(&self) -> String {
        format!(
            "web identity ({} with the token in {}, STS at {})",
            self.cfg.role_arn,
            self.cfg.token_file.display(),
            self.endpoint
        )
    }

    /// Reads the token and exchanges it for credentials.
    pub async fn fetch(&self) -> Result<Found, String> {
        let token = self.token()?;
        let session =
            self.cfg.session_name.clone().unwrap_or_else(|| format!("k3s-snapshot-{}", Utc::now().timestamp()));
        let form = [
            ("Action", "AssumeRoleWithWebIdentity"),
            ("Version", "2011-06-15"),
            ("RoleArn", self.cfg.role_arn.as_str()),
            ("RoleSessionName", session.as_str()),
            ("WebIdentityToken", token.as_str()),
        ];
        let req = self.http.post(self.endpoint.clone()).header("accept", "application/xml").form(&form);
        let body = bounded_text(req, "AssumeRoleWithWebIdentity", STS_TIMEOUT, true).await?;
        let (key, expires) = parse_response(&body)?;
        let now = Utc::now();
        if expires <= now {
            return Err(format!("STS answered with credentials that expired at {}", expires.to_rfc3339()));
        }
        let origin = Origin::WebIdentity { role_arn: self.cfg.role_arn.clone() };
        Ok(Found { key, origin, expires: Some(expires), refresh_at: Some(refresh_at(now, expires)) })
    }

    fn token(&self) -> Result<String, String> {
        let path = &self.cfg.token_file;
        let read = || -> std::io::Result<Vec<u8>> {
            use std::io::Read;
            let mut v = Vec::new();
            std::fs::File::open(path)?.take(MAX_TOKEN + 1).read_to_end(&mut v)?;
            Ok(v)
        };
        let raw = read().map_err(|e| format!("cannot read AWS_WEB_IDENTITY_TOKEN_FILE {}: {e}", path.display()))?;
        if raw.len() as u64 > MAX_TOKEN {
            return Err(format!(
                "AWS_WEB_IDENTITY_TOKEN_FILE {} is larger than {} KiB",
                path.display(),
                MAX_TOKEN >> 10
            ));
        }
        let token = String::from_utf8(raw).map(|t| t.trim().to_string()).unwrap_or_default();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("AWS_WEB_IDENTITY_TOKEN_FILE {} does not hold a token", path.display()));
        }
        Ok(token)
    }
}

/// The credentials of an `AssumeRoleWithWebIdentityResponse`; STS's error documents say why.
fn parse_response(body: &str) -> Result<(Key, DateTime<Utc>), String> {
    let root = xmltree::Element::parse(body.as_bytes())
        .map_err(|_| "STS did not answer with an XML document; check AWS_ENDPOINT_URL_STS".to_string())?;
    if let Some(err) = root.get_child("Error").or_else(|| (root.name == "Error").then_some(&root)) {
        let text = |n: &str| err.get_child(n).and_then(|c| c.get_text()).map(|t| t.to_string()).unwrap_or_default();
        // STS's messages name the role and the issuer, not the token.
        return Err(format!("STS refused: {} {}", text("Code"), text("Message")).trim_end().to_string());
    }
    let creds = root
        .get_child("AssumeRoleWithWebIdentityResult")
        .and_then(|r| r.get_child("Credentials"))
        .ok_or("STS answered without AssumeRoleWithWebIdentityResult/Credentials")?;
    let field = |n: &str| {
        creds
            .get_child(n)
            .and_then(|c| c.get_text())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| format!("STS answered credentials without {n}"))
    };
    let key = Key {
        access_key: field("AccessKeyId")?,
        secret_key: field("SecretAccessKey")?,
        session_token: Some(field("SessionToken")?),
    };
    let expires = DateTime::parse_from_rfc3339(&field("Expiration")?)
        .map_err(|_| "STS answered an Expiration that is not an RFC 3339 time".to_string())?
        .with_timezone(&Utc);
    Ok((key, expires))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::creds_source::tests::vars;

    #[test]
    fn the_sts_endpoint_follows_the_sdks() {
        let base = [("AWS_WEB_IDENTITY_TOKEN_FILE", "/t"), ("AWS_ROLE_ARN", "arn:aws:iam::1:role/r")];
        assert_eq!(WebIdentityConfig::from_vars(&vars(&base)).unwrap().sts_endpoint, None);
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            let endpoint = WebIdentityConfig::from_vars(&vars(&v)).unwrap().sts_endpoint;
            endpoint
        };
        assert_eq!(with(&[("AWS_REGION", "eu-west-1")]).as_deref(), Some("https://sts.eu-west-1.amazonaws.com"));
        assert_eq!(
            with(&[("AWS_DEFAULT_REGION", "cn-north-1")]).as_deref(),
            Some("https://sts.cn-north-1.amazonaws.com.cn")
        );
        assert_eq!(
            with(&[("AWS_STS_REGIONAL_ENDPOINTS", "legacy"), ("AWS_REGION", "eu-west-1")]).as_deref(),
            Some("https://sts.amazonaws.com")
        );
        assert_eq!(
            with(&[("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:1"), ("AWS_REGION", "x")]).as_deref(),
            Some("http://127.0.0.1:1")
        );
        assert!(
            WebIdentityConfig::from_vars(&vars(&base[..1])).is_none(),
            "a token without a role is not web identity"
        );
    }

    #[test]
    fn sts_answers_are_read_and_refusals_named() {
        let ok = "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>ASIA1</AccessKeyId><SecretAccessKey>hidden-secret</SecretAccessKey><SessionToken>hidden-token</SessionToken><Expiration>2030-01-01T00:00:00Z</Expiration></Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>";
        let (k, exp) = parse_response(ok).unwrap();
        assert_eq!((k.access_key.as_str(), k.session_token.as_deref()), ("ASIA1", Some("hidden-token")));
        assert_eq!(exp.to_rfc3339(), "2030-01-01T00:00:00+00:00");
        let refused = "<ErrorResponse><Error><Code>InvalidIdentityToken</Code><Message>Token expired</Message></Error></ErrorResponse>";
        assert_eq!(parse_response(refused).unwrap_err(), "STS refused: InvalidIdentityToken Token expired");
        for garbage in ["", "{\"a\":1}", "<Foo/>", "<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>A</AccessKeyId></Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"] {
            let e = parse_response(garbage).unwrap_err();
            assert!(e.starts_with("STS"), "{e}");
        }
    }
}
