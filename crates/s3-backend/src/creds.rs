//! Where the S3 credentials come from: the chain k3s uses.
//!
//! Read in k3s's `pkg/etcd/s3/s3.go` (`GetClient`) and minio-go's `pkg/credentials` (`chain.go`,
//! `static.go`, `file_aws_credentials.go`, `iam_aws.go`): k3s builds
//! `credentials.NewChainCredentials([Static{flags}, FileAWSCredentials{}, IAM{}])`, where the
//! flags `--etcd-s3-access-key`/`--etcd-s3-secret-key`/`--etcd-s3-session-token` also read
//! `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`. The chain takes the first
//! link that yields an access key, ignores the links' errors, and when none yields anything it
//! signs nothing: requests go anonymous. Here, in the same order:
//!
//! 1. the flags (or their environment variables): both keys, plus the session token if given;
//! 2. the shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`, else `$HOME/.aws/credentials`),
//!    profile `AWS_PROFILE` (else `default`; a `[profile NAME]` section is accepted too, as
//!    minio-go does): `aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`. A missing
//!    file or profile moves on; a file that cannot be read or parsed is an error naming the file
//!    (minio-go would skip it silently; an operator who wrote one wants to hear it is broken);
//! 3. the instance role, through IMDSv2 (`PUT /latest/api/token`, then
//!    `GET /latest/meta-data/iam/security-credentials/` and `.../<role>` with the token) at
//!    `http://169.254.169.254` or `AWS_EC2_METADATA_SERVICE_ENDPOINT`, unless
//!    `AWS_EC2_METADATA_DISABLED=true`. Each request is bounded by [`IMDS_TIMEOUT`](crate::creds_imds::IMDS_TIMEOUT) and
//!    [`IMDS_MAX_BODY`](crate::creds_source::IMDS_MAX_BODY). These credentials expire: they are fetched when first needed (never
//!    while a store is built, so a server starts while the service is unreachable), refreshed
//!    before they expire, and a failed lookup is tried again after [`IMDS_RETRY_AFTER`](crate::creds_keyring::IMDS_RETRY_AFTER).
//!    IMDSv1 (no token) is not used.
//!
//! Beyond k3s, in the AWS SDKs' order (issue 29): the profile may name a `credential_process`
//! (`creds_process.rs`; in the shared credentials file or the config file, `AWS_CONFIG_FILE` or
//! `$HOME/.aws/config`), and between the file and the instance role come web identity
//! (`creds_web.rs`: `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`, STS
//! `AssumeRoleWithWebIdentity`) and container credentials (`creds_container.rs`: EKS Pod Identity,
//! ECS). The first of these that is configured is the chain's source, as in the SDKs: a
//! configured source that fails does not fall through to the next (an operator who set up IRSA
//! wants to hear it is broken, not to run on the node's role). All of them expire and are
//! refreshed as the instance role's are.
//!
//! Nothing found: anonymous requests, as in k3s (a public bucket works). When S3 then refuses
//! them, the error says which sources were tried and what each said ([`Keyring::describe`](crate::creds_keyring::Keyring::describe)).
//!
//! Secrets never leave this module in text: [`Key`](crate::creds_source::Key)'s `Debug` is redacted, and messages about a
//! file or an answer say where and what is wrong, never what it held.
//!
//! This module holds the chain's configuration ([`CredentialChain`]); the parts: what every
//! source yields (`creds_source.rs`), the shared files (`creds_file.rs`), the instance role
//! (`creds_imds.rs`), and the chain resolved for one store (`creds_keyring.rs`).

use std::path::PathBuf;

use crate::creds_container::ContainerConfig;
use crate::creds_web::WebIdentityConfig;

/// The instance metadata service of EC2 (and of most clouds that imitate it).
pub const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254";

/// The links of the chain after the flags. The library never reads the environment by itself:
/// the binary fills this with [`CredentialChain::from_env`]; [`Default`] consults nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CredentialChain {
    /// The shared credentials file; `None`: not consulted.
    pub shared_file: Option<PathBuf>,
    /// Its profile; empty means `default`.
    pub profile: String,
    /// Base URL of the instance metadata service; `None`: the instance role is not consulted.
    pub imds_endpoint: Option<String>,
    /// The config file (`AWS_CONFIG_FILE`, `$HOME/.aws/config`), read for the profile's keys or
    /// `credential_process` when the credentials file has neither; `None`: not consulted.
    pub config_file: Option<PathBuf>,
    /// `AWS_WEB_IDENTITY_TOKEN_FILE` with `AWS_ROLE_ARN`.
    pub web_identity: Option<WebIdentityConfig>,
    /// `AWS_CONTAINER_CREDENTIALS_FULL_URI` or `_RELATIVE_URI`.
    pub container: Option<ContainerConfig>,
}

impl CredentialChain {
    /// The chain as the AWS SDKs and minio-go configure it from the environment:
    /// `AWS_SHARED_CREDENTIALS_FILE` (a leading `~/` is the home directory) or
    /// `$HOME/.aws/credentials`, `AWS_PROFILE` or `default`, `AWS_EC2_METADATA_SERVICE_ENDPOINT` or
    /// [`DEFAULT_IMDS_ENDPOINT`], none at all with `AWS_EC2_METADATA_DISABLED=true`.
    pub fn from_env() -> CredentialChain {
        Self::from_vars(|k| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned()).filter(|v| !v.is_empty()))
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> CredentialChain {
        let home = var("HOME").map(PathBuf::from);
        let shared_file = match var("AWS_SHARED_CREDENTIALS_FILE") {
            Some(p) => match (p.strip_prefix("~/"), &home) {
                (Some(rest), Some(h)) => Some(h.join(rest)),
                _ => Some(PathBuf::from(p)),
            },
            None => home.as_ref().map(|h| h.join(".aws").join("credentials")),
        };
        let profile = var("AWS_PROFILE").unwrap_or_else(|| "default".into());
        let disabled = var("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let imds_endpoint = (!disabled)
            .then(|| var("AWS_EC2_METADATA_SERVICE_ENDPOINT").unwrap_or_else(|| DEFAULT_IMDS_ENDPOINT.into()));
        let config_file = match var("AWS_CONFIG_FILE") {
            Some(p) => match (p.strip_prefix("~/"), &home) {
                (Some(rest), Some(h)) => Some(h.join(rest)),
                _ => Some(PathBuf::from(p)),
            },
            None => home.as_ref().map(|h| h.join(".aws").join("config")),
        };
        CredentialChain {
            shared_file,
            profile,
            imds_endpoint,
            config_file,
            web_identity: WebIdentityConfig::from_vars(&var),
            container: ContainerConfig::from_vars(&var),
        }
    }

    pub(crate) fn profile(&self) -> &str {
        if self.profile.is_empty() {
            "default"
        } else {
            &self.profile
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::creds_source::tests::vars;

    #[test]
    fn the_chain_is_read_from_the_environment_as_the_sdks_read_it() {
        let c = CredentialChain::from_vars(vars(&[("HOME", "/home/op")]));
        assert_eq!(c.shared_file, Some(PathBuf::from("/home/op/.aws/credentials")));
        assert_eq!(c.profile, "default");
        assert_eq!(c.imds_endpoint.as_deref(), Some(DEFAULT_IMDS_ENDPOINT));

        let c = CredentialChain::from_vars(vars(&[
            ("HOME", "/home/op"),
            ("AWS_SHARED_CREDENTIALS_FILE", "~/creds"),
            ("AWS_PROFILE", "backup"),
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9"),
        ]));
        assert_eq!(c.shared_file, Some(PathBuf::from("/home/op/creds")));
        assert_eq!(c.profile, "backup");
        assert_eq!(c.imds_endpoint.as_deref(), Some("http://127.0.0.1:9"));

        let c = CredentialChain::from_vars(vars(&[("AWS_EC2_METADATA_DISABLED", "TRUE")]));
        assert_eq!(c, CredentialChain { profile: "default".into(), ..CredentialChain::default() });
    }
}
