//! [`S3Config`]: where the bucket is and how to reach it. A plain struct; the CLI fills it from
//! `--etcd-s3-*` flags (or `--s3-*`), this crate never parses flags.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::creds::CredentialChain;
use crate::object_lock::ObjectLock;

/// Default `--etcd-s3-endpoint`.
pub const DEFAULT_ENDPOINT: &str = "s3.amazonaws.com";
/// Default `--etcd-s3-region`.
pub const DEFAULT_REGION: &str = "us-east-1";
/// Default `--etcd-s3-timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// `--etcd-s3-bucket-lookup-type`: how the bucket is addressed in URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BucketLookup {
    /// Virtual-host style for AWS (and Aliyun) endpoints, path style elsewhere.
    #[default]
    Auto,
    /// Virtual-host style: `https://bucket.endpoint/key`.
    Dns,
    /// Path style: `https://endpoint/bucket/key`.
    Path,
}

impl FromStr for BucketLookup {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(BucketLookup::Auto),
            "dns" => Ok(BucketLookup::Dns),
            "path" => Ok(BucketLookup::Path),
            other => Err(format!("invalid bucket lookup type {other:?}: use auto, dns or path")),
        }
    }
}

impl fmt::Display for BucketLookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BucketLookup::Auto => "auto",
            BucketLookup::Dns => "dns",
            BucketLookup::Path => "path",
        })
    }
}

/// `--etcd-s3-sse`: the server-side encryption S3 is asked for on every object written (each
/// PUT, each multipart upload's initiation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerSideEncryption {
    /// `AES256`: SSE-S3, keys managed by S3.
    Aes256,
    /// `aws:kms`: SSE-KMS, with `--etcd-s3-sse-kms-key-id` or the bucket's default KMS key.
    Kms { key_id: Option<String> },
}

impl ServerSideEncryption {
    /// The request headers that ask for it.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        match self {
            ServerSideEncryption::Aes256 => vec![("x-amz-server-side-encryption", "AES256".into())],
            ServerSideEncryption::Kms { key_id } => {
                let mut h = vec![("x-amz-server-side-encryption", "aws:kms".into())];
                if let Some(k) = key_id {
                    h.push(("x-amz-server-side-encryption-aws-kms-key-id", k.clone()));
                }
                h
            }
        }
    }

    /// From `--etcd-s3-sse` and `--etcd-s3-sse-kms-key-id`.
    pub fn from_flags(sse: Option<&str>, kms_key_id: Option<&str>) -> Result<Option<Self>, String> {
        let key_id = kms_key_id.map(str::trim).filter(|k| !k.is_empty()).map(str::to_string);
        match (sse.map(str::trim).filter(|s| !s.is_empty()), key_id) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err("--etcd-s3-sse-kms-key-id needs --etcd-s3-sse aws:kms".into()),
            (Some("AES256"), None) => Ok(Some(ServerSideEncryption::Aes256)),
            (Some("AES256"), Some(_)) => {
                Err("--etcd-s3-sse-kms-key-id only applies to --etcd-s3-sse aws:kms, not AES256".into())
            }
            (Some("aws:kms"), key_id) => Ok(Some(ServerSideEncryption::Kms { key_id })),
            (Some(other), _) => Err(format!("--etcd-s3-sse {other:?} is not AES256 or aws:kms")),
        }
    }
}

/// Everything needed to reach a bucket. Empty strings mean "not set" (as k3s's flags do).
///
/// `Debug` never shows the secret key or the session token.
#[derive(Clone)]
pub struct S3Config {
    /// `host[:port]` without a scheme (`--etcd-s3-endpoint`). An `http://` or `https://` prefix is
    /// accepted; `http://` is the same as `insecure`.
    pub endpoint: String,
    /// PEM file with the CA certificate(s) to trust for the endpoint, in addition to the
    /// built-in web roots (`--etcd-s3-endpoint-ca`).
    pub endpoint_ca: Option<PathBuf>,
    /// Do not verify the endpoint's certificate (`--etcd-s3-skip-ssl-verify`).
    pub skip_ssl_verify: bool,
    /// `--etcd-s3-access-key`; empty means: look further down the chain
    /// ([`S3Config::credential_chain`]), and send anonymous requests if nothing is found there.
    pub access_key: String,
    /// `--etcd-s3-secret-key`. Never printed.
    pub secret_key: String,
    /// `--etcd-s3-session-token`; empty means none. Never printed.
    pub session_token: String,
    /// `--etcd-s3-bucket`.
    pub bucket: String,
    /// `--etcd-s3-region`.
    pub region: String,
    /// `--etcd-s3-folder`: keys live under `folder/`; empty means the bucket's root.
    pub folder: String,
    /// Plain http (`--etcd-s3-insecure`).
    pub insecure: bool,
    /// Bound on every S3 operation, retries included (`--etcd-s3-timeout`).
    pub timeout: Duration,
    /// `--etcd-s3-bucket-lookup-type`.
    pub bucket_lookup: BucketLookup,
    /// `--etcd-s3-proxy`. The `minio` crate builds its own HTTP client, which reads the proxy from
    /// `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` when [`crate::S3Store::connect`] builds it; see
    /// [`crate::proxy_env`] for how the CLI applies this value.
    pub proxy: Option<String>,
    /// Where credentials are looked for when `access_key` is empty: the shared credentials file,
    /// then the instance role (see [`crate::CredentialChain`]). The default consults nothing.
    pub credential_chain: CredentialChain,
    /// `--etcd-s3-sse` (with `--etcd-s3-sse-kms-key-id`): server-side encryption of what is written.
    pub sse: Option<ServerSideEncryption>,
    /// `--etcd-s3-object-lock-mode` with `--etcd-s3-object-lock-days`: a retention on every
    /// object written. `None`: the bucket's default retention, if any.
    pub object_lock: Option<ObjectLock>,
    /// `--etcd-s3-sse-customer-key-file`: SSE-C with the 256-bit key in this file (read when the
    /// store is built). Needs https and excludes `sse`.
    pub sse_customer_key_file: Option<PathBuf>,
    /// Streamed uploads' limits, bytes: `(largest single PUT, part size)` of a known-length body.
    /// `None`: S3's 5 GiB and 64 MiB parts (or `K3S_SNAPSHOT_TEST_S3_STREAM_LIMITS`). For tests,
    /// which cannot move 5 GiB; no flag sets it.
    pub stream_limits: Option<(u64, u64)>,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: DEFAULT_ENDPOINT.into(),
            endpoint_ca: None,
            skip_ssl_verify: false,
            access_key: String::new(),
            secret_key: String::new(),
            session_token: String::new(),
            bucket: String::new(),
            region: DEFAULT_REGION.into(),
            folder: String::new(),
            insecure: false,
            timeout: DEFAULT_TIMEOUT,
            bucket_lookup: BucketLookup::Auto,
            proxy: None,
            credential_chain: CredentialChain::default(),
            sse: None,
            object_lock: None,
            sse_customer_key_file: None,
            stream_limits: None,
        }
    }
}

fn redacted(s: &str) -> &'static str {
    if s.is_empty() {
        ""
    } else {
        "<redacted>"
    }
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("endpoint_ca", &self.endpoint_ca)
            .field("skip_ssl_verify", &self.skip_ssl_verify)
            .field("access_key", &self.access_key)
            .field("secret_key", &redacted(&self.secret_key))
            .field("session_token", &redacted(&self.session_token))
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("folder", &self.folder)
            .field("insecure", &self.insecure)
            .field("timeout", &self.timeout)
            .field("bucket_lookup", &self.bucket_lookup)
            .field("proxy", &self.proxy.as_deref().map(redact_url_password))
            .field("credential_chain", &self.credential_chain)
            .field("sse", &self.sse)
            .field("object_lock", &self.object_lock)
            .field("sse_customer_key_file", &self.sse_customer_key_file)
            .finish()
    }
}

/// Hides the password of a `scheme://user:password@host` URL (a proxy may carry one).
pub(crate) fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let Some((userinfo, host)) = rest.rsplit_once('@') else { return url.to_string() };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
        None => url.to_string(),
    }
}

/// The endpoint split into what the client needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub https: bool,
    /// `host[:port]`
    pub authority: String,
}

impl Endpoint {
    /// `https://host:port` as shown in messages.
    pub fn url(&self) -> String {
        format!("{}://{}", if self.https { "https" } else { "http" }, self.authority)
    }
}

impl S3Config {
    /// `folder` without leading or trailing slashes.
    pub fn folder_trimmed(&self) -> &str {
        self.folder.trim_matches('/')
    }

    /// Validates what can be checked without the network.
    pub(crate) fn endpoint(&self) -> Result<Endpoint, String> {
        let raw = self.endpoint.trim();
        let raw = if raw.is_empty() { DEFAULT_ENDPOINT } else { raw };
        let (https, rest) = if let Some(r) = raw.strip_prefix("https://") {
            if self.insecure {
                return Err(format!(
                    "endpoint {raw} says https but --etcd-s3-insecure asks for plain http; drop one of them"
                ));
            }
            (true, r)
        } else if let Some(r) = raw.strip_prefix("http://") {
            (false, r)
        } else if raw.contains("://") {
            return Err(format!("endpoint {raw} has an unknown scheme; give host[:port]"));
        } else {
            (!self.insecure, raw)
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') || authority.contains('?') || authority.contains('@') {
            return Err(format!("endpoint {raw} is not host[:port]; fix --etcd-s3-endpoint"));
        }
        Ok(Endpoint { https, authority: authority.to_string() })
    }

    pub(crate) fn validate(&self) -> Result<Endpoint, String> {
        if self.bucket.trim().is_empty() {
            return Err("no bucket given; set --etcd-s3-bucket".into());
        }
        if self.access_key.is_empty() != self.secret_key.is_empty() {
            return Err(
                "only one of --etcd-s3-access-key and --etcd-s3-secret-key is set; give both (or neither, to use the shared credentials file or the instance role)"
                    .into(),
            );
        }
        if self.timeout.is_zero() {
            return Err("--etcd-s3-timeout must be greater than zero".into());
        }
        if self.folder_trimmed().split('/').any(|seg| seg == ".." || seg == ".") {
            return Err(format!("folder {:?} contains '.' or '..'; fix --etcd-s3-folder", self.folder));
        }
        let endpoint = self.endpoint()?;
        if self.sse_customer_key_file.is_some() {
            if self.sse.is_some() {
                return Err("--etcd-s3-sse and --etcd-s3-sse-customer-key-file both ask for server-side encryption; give one of them".into());
            }
            if !endpoint.https {
                return Err(format!(
                    "--etcd-s3-sse-customer-key-file needs https, and {} is plain http: S3 refuses customer keys sent in the clear; drop --etcd-s3-insecure",
                    endpoint.url()
                ));
            }
        }
        Ok(endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_secrets() {
        let cfg = S3Config {
            access_key: "AKIAEXAMPLE".into(),
            secret_key: "s3cr3t-value".into(),
            session_token: "tok-value".into(),
            proxy: Some("http://user:pw-value@proxy:3128".into()),
            ..S3Config::default()
        };
        let dbg = format!("{cfg:?}");
        assert!(dbg.contains("AKIAEXAMPLE"), "{dbg}");
        for secret in ["s3cr3t-value", "tok-value", "pw-value"] {
            assert!(!dbg.contains(secret), "{dbg}");
        }
    }

    #[test]
    fn endpoint_parsing() {
        let mut cfg = S3Config { bucket: "b".into(), ..S3Config::default() };
        assert_eq!(cfg.endpoint().unwrap(), Endpoint { https: true, authority: "s3.amazonaws.com".into() });
        cfg.endpoint = "127.0.0.1:9000".into();
        cfg.insecure = true;
        assert_eq!(cfg.endpoint().unwrap().url(), "http://127.0.0.1:9000");
        cfg.endpoint = "https://minio.local:9000/".into();
        assert!(cfg.endpoint().is_err());
        cfg.insecure = false;
        assert_eq!(cfg.endpoint().unwrap().url(), "https://minio.local:9000");
        cfg.endpoint = "http://minio.local".into();
        assert_eq!(cfg.endpoint().unwrap().url(), "http://minio.local");
        cfg.endpoint = "minio.local/path".into();
        assert!(cfg.endpoint().is_err());
    }

    #[test]
    fn validation_names_the_flag() {
        let cfg = S3Config::default();
        assert!(cfg.validate().unwrap_err().contains("--etcd-s3-bucket"));
        let cfg = S3Config { bucket: "b".into(), access_key: "a".into(), ..S3Config::default() };
        assert!(cfg.validate().unwrap_err().contains("--etcd-s3-secret-key"));
        let cfg = S3Config { bucket: "b".into(), folder: "a/../b".into(), ..S3Config::default() };
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn a_customer_key_needs_https_and_no_other_encryption() {
        let key = Some(PathBuf::from("/k"));
        let cfg = S3Config { bucket: "b".into(), sse_customer_key_file: key.clone(), ..S3Config::default() };
        assert!(cfg.validate().is_ok());
        let http = S3Config { insecure: true, endpoint: "127.0.0.1:9".into(), ..cfg.clone() };
        assert!(http.validate().unwrap_err().contains("needs https"));
        let both = S3Config { sse: Some(ServerSideEncryption::Aes256), ..cfg };
        assert!(both.validate().unwrap_err().contains("give one of them"));
    }

    #[test]
    fn sse_flags_parse_and_name_what_is_wrong() {
        assert_eq!(ServerSideEncryption::from_flags(None, None), Ok(None));
        let s3 = ServerSideEncryption::from_flags(Some("AES256"), None).unwrap().unwrap();
        assert_eq!(s3.headers(), vec![("x-amz-server-side-encryption", "AES256".to_string())]);
        let kms = ServerSideEncryption::from_flags(Some("aws:kms"), Some("alias/backups")).unwrap().unwrap();
        assert_eq!(
            kms.headers(),
            vec![
                ("x-amz-server-side-encryption", "aws:kms".to_string()),
                ("x-amz-server-side-encryption-aws-kms-key-id", "alias/backups".to_string())
            ]
        );
        assert_eq!(
            ServerSideEncryption::from_flags(Some("aws:kms"), None).unwrap(),
            Some(ServerSideEncryption::Kms { key_id: None })
        );
        for (sse, key) in [(None, Some("k")), (Some("AES256"), Some("k")), (Some("aes256"), None)] {
            let e = ServerSideEncryption::from_flags(sse, key).unwrap_err();
            assert!(e.contains("--etcd-s3-sse"), "{e}");
        }
    }

    #[test]
    fn bucket_lookup_parses() {
        assert_eq!("DNS".parse::<BucketLookup>().unwrap(), BucketLookup::Dns);
        assert_eq!("path".parse::<BucketLookup>().unwrap(), BucketLookup::Path);
        assert!("virtual".parse::<BucketLookup>().is_err());
    }
}
