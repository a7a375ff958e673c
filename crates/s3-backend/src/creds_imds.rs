//! The instance role through IMDSv2: a session token, then the role's name and its credentials.

use std::time::Duration;

use crate::creds_source::{bounded_text, http_client, json_credentials, Found, Origin};

/// Bound on each request to the metadata service (the AWS SDKs use 1 s).
pub const IMDS_TIMEOUT: Duration = Duration::from_secs(2);
/// Lifetime asked for the IMDSv2 session token (6 hours, as minio-go asks).
const TOKEN_TTL_SECS: &str = "21600";

/// The IMDSv2 client.
pub(crate) struct Imds {
    /// `http://host[:port]`, no trailing slash.
    pub(crate) base: String,
    http: reqwest::Client,
}

impl Imds {
    pub(crate) fn new(endpoint: &str) -> Result<Imds, String> {
        let bad = || format!("invalid AWS_EC2_METADATA_SERVICE_ENDPOINT {endpoint:?}: give http://host[:port]");
        let url = reqwest::Url::parse(endpoint.trim()).map_err(|_| bad())?;
        if !matches!(url.scheme(), "http" | "https")
            || url.host_str().is_none()
            || !matches!(url.path(), "" | "/")
            || url.query().is_some()
            || !url.username().is_empty()
            || url.password().is_some()
        {
            return Err(bad());
        }
        let base = url.as_str().trim_end_matches('/').to_string();
        // Link-local, never through the S3 proxy (--etcd-s3-proxy sets the proxy variables).
        let http = http_client(IMDS_TIMEOUT, false)?;
        Ok(Imds { base, http })
    }

    async fn text(&self, req: reqwest::RequestBuilder, what: &str) -> Result<String, String> {
        bounded_text(req, what, IMDS_TIMEOUT, false).await
    }

    /// The role's current credentials, through IMDSv2.
    pub(crate) async fn fetch(&self) -> Result<Found, String> {
        let token = self
            .text(
                self.http
                    .put(format!("{}/latest/api/token", self.base))
                    .header("x-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL_SECS),
                "the session token request (PUT /latest/api/token)",
            )
            .await?;
        let token = token.trim();
        if token.is_empty() || token.len() > 4096 || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the answer to PUT /latest/api/token is not a session token".into());
        }
        let list_url = format!("{}/latest/meta-data/iam/security-credentials/", self.base);
        let roles =
            self.text(self.http.get(&list_url).header("x-aws-ec2-metadata-token", token), "the role list").await?;
        let Some(role) = roles.lines().map(str::trim).find(|l| !l.is_empty()) else {
            return Err("no instance role is attached to this instance".into());
        };
        // IAM role names: at most 64 of these characters. The name goes into a URL and messages.
        if role.len() > 64 || !role.chars().all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c)) {
            return Err("the role list does not name an IAM role".into());
        }
        let body = self
            .text(
                self.http.get(format!("{list_url}{role}")).header("x-aws-ec2-metadata-token", token),
                "the role's credentials",
            )
            .await?;
        let origin = Origin::InstanceRole { endpoint: self.base.clone(), role: role.to_string() };
        json_credentials(&body, &format!("the credentials of role {role}"), true, origin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imds_endpoints_must_be_plain_urls() {
        assert_eq!(Imds::new("http://127.0.0.1:8080/").unwrap().base, "http://127.0.0.1:8080");
        assert_eq!(Imds::new("http://[fd00:ec2::254]").unwrap().base, "http://[fd00:ec2::254]");
        for bad in ["169.254.169.254", "ftp://x", "http://x/latest", "http://u:p@x"] {
            let e = Imds::new(bad).err().unwrap();
            assert!(e.contains("AWS_EC2_METADATA_SERVICE_ENDPOINT"), "{e}");
        }
    }
}
