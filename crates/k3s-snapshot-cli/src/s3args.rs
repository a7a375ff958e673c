//! The S3 flags, shared by `server` (`--etcd-s3-*`) and `etcd-snapshot` (`--s3-*`; the `etcd-s3-*`
//! spellings are accepted there too, and the config-file keys are the `etcd-s3-*` names).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k3s_snapshot_core::store::SnapshotStore;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BucketLookup {
    #[default]
    Auto,
    Dns,
    Path,
}

#[derive(clap::Args, Clone, Default)]
pub struct S3Args {
    /// Keep snapshots in S3 as well as locally
    #[arg(id = "etcd-s3", long = "etcd-s3", visible_alias = "s3", global = true)]
    pub enabled: bool,
    /// S3 endpoint, host[:port]
    #[arg(
        id = "etcd-s3-endpoint",
        long = "etcd-s3-endpoint",
        visible_alias = "s3-endpoint",
        global = true,
        default_value = "s3.amazonaws.com"
    )]
    pub endpoint: String,
    /// PEM file of the CA that signed the S3 endpoint's certificate
    #[arg(id = "etcd-s3-endpoint-ca", long = "etcd-s3-endpoint-ca", visible_alias = "s3-endpoint-ca", global = true)]
    pub endpoint_ca: Option<PathBuf>,
    /// Do not verify the S3 endpoint's certificate
    #[arg(
        id = "etcd-s3-skip-ssl-verify",
        long = "etcd-s3-skip-ssl-verify",
        visible_alias = "s3-skip-ssl-verify",
        global = true
    )]
    pub skip_ssl_verify: bool,
    /// S3 access key (without it: the shared credentials file, then the instance role)
    #[arg(
        id = "etcd-s3-access-key",
        long = "etcd-s3-access-key",
        visible_alias = "s3-access-key",
        global = true,
        env = "AWS_ACCESS_KEY_ID",
        hide_env_values = true
    )]
    pub access_key: Option<String>,
    /// S3 secret key
    #[arg(
        id = "etcd-s3-secret-key",
        long = "etcd-s3-secret-key",
        visible_alias = "s3-secret-key",
        global = true,
        env = "AWS_SECRET_ACCESS_KEY",
        hide_env_values = true
    )]
    pub secret_key: Option<String>,
    /// S3 session token
    #[arg(
        id = "etcd-s3-session-token",
        long = "etcd-s3-session-token",
        visible_alias = "s3-session-token",
        global = true,
        env = "AWS_SESSION_TOKEN",
        hide_env_values = true
    )]
    pub session_token: Option<String>,
    /// S3 bucket
    #[arg(id = "etcd-s3-bucket", long = "etcd-s3-bucket", visible_alias = "s3-bucket", global = true)]
    pub bucket: Option<String>,
    /// S3 region
    #[arg(
        id = "etcd-s3-region",
        long = "etcd-s3-region",
        visible_alias = "s3-region",
        global = true,
        default_value = "us-east-1"
    )]
    pub region: String,
    /// Folder (key prefix) in the bucket
    #[arg(
        id = "etcd-s3-folder",
        long = "etcd-s3-folder",
        visible_alias = "s3-folder",
        global = true,
        default_value = ""
    )]
    pub folder: String,
    /// Talk to S3 over plain http
    #[arg(id = "etcd-s3-insecure", long = "etcd-s3-insecure", visible_alias = "s3-insecure", global = true)]
    pub insecure: bool,
    /// Timeout of each S3 request (e.g. 30s, 5m)
    #[arg(id = "etcd-s3-timeout", long = "etcd-s3-timeout", visible_alias = "s3-timeout", global = true, default_value = "5m", value_parser = crate::config::parse_duration)]
    pub timeout: Duration,
    /// Number of snapshots to keep in S3 per name prefix, across nodes (< 1 keeps all)
    #[arg(
        id = "etcd-s3-retention",
        long = "etcd-s3-retention",
        visible_alias = "s3-retention",
        global = true,
        default_value_t = 5,
        allow_negative_numbers = true
    )]
    pub retention: i64,
    /// Bucket addressing: auto, dns (virtual host) or path
    #[arg(
        id = "etcd-s3-bucket-lookup-type",
        long = "etcd-s3-bucket-lookup-type",
        visible_alias = "s3-bucket-lookup-type",
        global = true,
        value_enum,
        default_value = "auto"
    )]
    pub bucket_lookup: BucketLookup,
    /// Proxy URL for S3 requests
    #[arg(id = "etcd-s3-proxy", long = "etcd-s3-proxy", visible_alias = "s3-proxy", global = true)]
    pub proxy: Option<String>,
    /// Server-side encryption of every object written: AES256 (SSE-S3) or aws:kms (SSE-KMS)
    #[arg(
        id = "etcd-s3-sse",
        long = "etcd-s3-sse",
        visible_alias = "s3-sse",
        global = true,
        value_parser = ["AES256", "aws:kms"]
    )]
    pub sse: Option<String>,
    /// KMS key for --etcd-s3-sse aws:kms [default: the bucket's]
    #[arg(
        id = "etcd-s3-sse-kms-key-id",
        long = "etcd-s3-sse-kms-key-id",
        visible_alias = "s3-sse-kms-key-id",
        global = true
    )]
    pub sse_kms_key_id: Option<String>,
    /// SSE-C: encrypt every object with the 256-bit key in this file (32 raw bytes, or base64 or hex; mode 0600); needs https
    #[arg(
        id = "etcd-s3-sse-customer-key-file",
        long = "etcd-s3-sse-customer-key-file",
        visible_alias = "s3-sse-customer-key-file",
        global = true
    )]
    pub sse_customer_key_file: Option<PathBuf>,
    /// Object Lock retention on every object written: GOVERNANCE or COMPLIANCE (with --etcd-s3-object-lock-days) [default: the bucket's default retention]
    #[arg(
        id = "etcd-s3-object-lock-mode",
        long = "etcd-s3-object-lock-mode",
        visible_alias = "s3-object-lock-mode",
        global = true,
        value_parser = ["GOVERNANCE", "COMPLIANCE"]
    )]
    pub object_lock_mode: Option<String>,
    /// Days each object written stays under --etcd-s3-object-lock-mode
    #[arg(
        id = "etcd-s3-object-lock-days",
        long = "etcd-s3-object-lock-days",
        visible_alias = "s3-object-lock-days",
        global = true
    )]
    pub object_lock_days: Option<u32>,
}

impl std::fmt::Debug for S3Args {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Args")
            .field("enabled", &self.enabled)
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("folder", &self.folder)
            .field("region", &self.region)
            .field("access_key", &self.access_key.as_ref().map(|_| "<set>"))
            .field("secret_key", &self.secret_key.as_ref().map(|_| "<redacted>"))
            .field("session_token", &self.session_token.as_ref().map(|_| "<redacted>"))
            .field("sse", &self.sse)
            .field("sse_customer_key_file", &self.sse_customer_key_file)
            .field("object_lock_mode", &self.object_lock_mode)
            .field("object_lock_days", &self.object_lock_days)
            .finish_non_exhaustive()
    }
}

impl S3Args {
    /// The backend's configuration, or `None` when S3 is off.
    pub fn to_config(&self) -> anyhow::Result<Option<s3_backend::S3Config>> {
        if !self.enabled {
            return Ok(None);
        }
        let Some(bucket) = self.bucket.clone().filter(|b| !b.is_empty()) else {
            anyhow::bail!("--etcd-s3 needs a bucket: pass --etcd-s3-bucket (or --s3-bucket)");
        };
        Ok(Some(s3_backend::S3Config {
            endpoint: self.endpoint.clone(),
            endpoint_ca: self.endpoint_ca.clone(),
            skip_ssl_verify: self.skip_ssl_verify,
            access_key: self.access_key.clone().unwrap_or_default(),
            secret_key: self.secret_key.clone().unwrap_or_default(),
            session_token: self.session_token.clone().unwrap_or_default(),
            bucket,
            region: self.region.clone(),
            folder: self.folder.clone(),
            insecure: self.insecure,
            timeout: self.timeout,
            bucket_lookup: match self.bucket_lookup {
                BucketLookup::Auto => s3_backend::BucketLookup::Auto,
                BucketLookup::Dns => s3_backend::BucketLookup::Dns,
                BucketLookup::Path => s3_backend::BucketLookup::Path,
            },
            proxy: self.proxy.clone(),
            // Without the keys: the shared credentials file, then the instance role, as k3s.
            credential_chain: s3_backend::CredentialChain::from_env(),
            sse: s3_backend::ServerSideEncryption::from_flags(self.sse.as_deref(), self.sse_kms_key_id.as_deref())
                .map_err(anyhow::Error::msg)?,
            object_lock: s3_backend::ObjectLock::from_flags(self.object_lock_mode.as_deref(), self.object_lock_days)
                .map_err(anyhow::Error::msg)?,
            sse_customer_key_file: self.sse_customer_key_file.clone(),
            stream_limits: None,
        }))
    }

    /// Where S3 rows of `ls` come from, as k3s shows it (no credentials).
    pub fn origin(&self) -> k3s_snapshot_core::k3s_list::S3Origin {
        k3s_snapshot_core::k3s_list::S3Origin {
            endpoint: self.endpoint.clone(),
            endpoint_ca: self.endpoint_ca.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            skip_ssl_verify: self.skip_ssl_verify,
            bucket: self.bucket.clone().unwrap_or_default(),
            region: self.region.clone(),
            prefix: self.folder.clone(),
            insecure: self.insecure,
        }
    }

    /// The store when S3 is on, built without a request: only flags that cannot work fail here
    /// (what `server` does, so that it starts whatever S3's state).
    pub fn build(&self) -> anyhow::Result<Option<s3_backend::S3Store>> {
        let Some(cfg) = self.to_config()? else { return Ok(None) };
        Ok(Some(s3_backend::S3Store::new(&cfg)?))
    }

    /// Connects to the bucket when S3 is on.
    pub async fn open(&self) -> anyhow::Result<Option<Arc<dyn SnapshotStore>>> {
        let Some(cfg) = self.to_config()? else { return Ok(None) };
        let store = s3_backend::S3Store::connect(&cfg).await?;
        Ok(Some(Arc::new(store)))
    }
}
