//! [`S3Store`]: the [`SnapshotStore`] on an S3 bucket, through the `minio` crate.
//!
//! - Every request goes through [`Inner::call`], the one retry helper: it names the operation,
//!   retries only what [`S3Error::is_retryable`] says is transient, with exponential backoff, and
//!   bounds the whole operation (all attempts) by the configured timeout.
//! - `put` sends one PUT for bodies smaller than a part; a larger body of known size (up to 5 GiB)
//!   streams as one PUT ([`crate::stream_put`]); above 5 GiB as a multipart upload of streamed
//!   parts (consecutive 64 MiB slices of the body, each one such PUT, the next starting while the
//!   last awaits its answer; nothing buffered); a body of unknown size as a multipart upload of
//!   buffered parts that go up while the body is still streaming. Any failure, including the body stream
//!   yielding an error or the `put` future being dropped, aborts the upload: S3 only shows an
//!   object once `CompleteMultipartUpload` succeeds, so nothing appears under the key.
//! - `get` streams the body (constant memory), resumes with a ranged GET pinned to the ETag when
//!   the connection breaks mid-way, and gives up on a body that stalls for longer than the timeout.
//! - `list` pages through `ListObjectsV2` with the delimiter `/`, one page in memory at a time.
//! - `delete` sends `DeleteObjects` with at most 1000 keys per request.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use minio::s3::builders::{ObjectToDelete, PutObject, UploadPart};
use minio::s3::client::{MinioClient, MinioClientBuilder};
use minio::s3::http::BaseUrl;
use minio::s3::minio_error_response::MinioErrorResponse;
use minio::s3::multimap_ext::{Multimap, MultimapExt};
use minio::s3::response::DeleteResult;
use minio::s3::response_traits::{HasEtagFromHeaders, HasS3Fields};
use minio::s3::segmented_bytes::SegmentedBytes;
use minio::s3::types::{BucketName, ObjectKey, PartInfo, Region, S3Api, ToStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

use k3s_snapshot_core::metadata::METADATA_DIR;
use k3s_snapshot_core::name;
use k3s_snapshot_core::store::{ByteStream, Hold, ObjectInfo, PutOptions, SnapshotStore};
use k3s_snapshot_core::{Error, Result};

use crate::checksum;
use crate::config::{redact_url_password, BucketLookup, S3Config};
use crate::creds::{Found, Key, Keyring};
use crate::error::{innermost_detail, is_no_such_upload, Classifier, S3Error};
use crate::object_lock::{hold_of, ObjectLock};
use crate::sse::{self, CustomerKey, KEY_MD5_META};
use crate::stream_put::{PutRequest, StreamPut, MAX_SINGLE_PUT};

/// Smallest part the S3 API accepts (except the last one).
pub const MIN_PART_SIZE: u64 = 5 << 20;
/// Bodies up to this size go up as one PUT; larger ones as a multipart upload of parts this big.
pub const DEFAULT_PART_SIZE: u64 = 8 << 20;
/// Largest number of parts of a multipart upload.
pub const MAX_PARTS: u16 = 10_000;
/// Largest part we buffer when the size is unknown and the upload keeps growing.
const MAX_GROWN_PART_SIZE: u64 = 512 << 20;
/// Parts uploading at the same time while the next one is read from the body.
const PARTS_IN_FLIGHT: usize = 2;
/// Keys per `DeleteObjects` request (the S3 limit).
pub const DELETE_BATCH: usize = 1000;
/// Keys per `ListObjectsV2` page.
const LIST_PAGE: u16 = 1000;
/// Times a download resumes after its connection broke.
const DOWNLOAD_RESUMES: u32 = 3;

/// How failed requests are retried.
#[derive(Debug, Clone, Copy)]
struct RetryPolicy {
    attempts: u32,
    first_delay: Duration,
    max_delay: Duration,
}

const RETRY: RetryPolicy =
    RetryPolicy { attempts: 4, first_delay: Duration::from_millis(250), max_delay: Duration::from_secs(4) };

/// Snapshots in an S3 bucket, under an optional folder. Cheap to clone.
#[derive(Clone)]
pub struct S3Store {
    inner: Arc<Inner>,
}

struct Inner {
    signer: Signer,
    streamer: StreamPut,
    bucket: String,
    /// `folder/`, or empty for the bucket's root.
    prefix: String,
    /// `s3://bucket/folder`
    describe: String,
    timeout: Duration,
    classifier: Classifier,
    /// `x-amz-server-side-encryption*` headers of every PUT and multipart initiation.
    sse_headers: Vec<(&'static str, String)>,
    /// `--etcd-s3-object-lock-*`: the retention of every object written.
    object_lock: Option<ObjectLock>,
    /// `--etcd-s3-sse-customer-key-file`: sent with every request on an object's bytes.
    customer_key: Option<CustomerKey>,
    stream_limits: StreamLimits,
}

impl fmt::Debug for S3Store {
    // By hand: the minio client's Debug would print the credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("location", &self.inner.describe)
            .field("endpoint", &self.inner.classifier.endpoint)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

/// An object's size, time, content type, user metadata (`x-amz-meta-*`, without the prefix) and
/// server-side encryption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectDetails {
    pub info: ObjectInfo,
    pub content_type: Option<String>,
    pub user_metadata: Vec<(String, String)>,
    /// `x-amz-server-side-encryption` as S3 reports it (`AES256`, `aws:kms`), when encrypted.
    pub sse: Option<String>,
    /// `x-amz-server-side-encryption-aws-kms-key-id`, for SSE-KMS.
    pub sse_kms_key_id: Option<String>,
    /// An Object Lock retention date still ahead, or a legal hold (as far as the credentials may
    /// see them).
    pub hold: Option<Hold>,
}

impl S3Store {
    /// Builds the client and checks that the bucket exists and that the credentials may read it.
    /// Nothing is written.
    pub async fn connect(cfg: &S3Config) -> Result<S3Store> {
        let store = S3Store::new(cfg)?;
        store.check().await?;
        tracing::debug!(store = %store.inner.describe, endpoint = %store.inner.classifier.endpoint, "connected to s3");
        Ok(store)
    }

    /// Builds the client without the network: only what the configuration itself can get wrong
    /// (an endpoint, region or bucket name that is not valid, a CA file that is not a PEM
    /// certificate, a proxy not in effect, a shared credentials file that cannot be read or
    /// parsed) fails here. Whether S3 answers, the bucket exists, the instance role's credentials
    /// can be had and the credentials are accepted is found by [`S3Store::check`] or by the first
    /// request. A server builds its store this way, so that it starts whatever S3's state.
    pub fn new(cfg: &S3Config) -> Result<S3Store> {
        let endpoint = cfg.validate().map_err(Error::Invalid)?;
        check_proxy_env(cfg, endpoint.https)?;
        let ca_pem = cfg.endpoint_ca.as_deref().map(ca_bundle).transpose()?;
        let mut base: BaseUrl = endpoint
            .url()
            .parse()
            .map_err(|e| Error::Invalid(format!("invalid --etcd-s3-endpoint {}: {e}", cfg.endpoint)))?;
        let region = if cfg.region.trim().is_empty() { crate::config::DEFAULT_REGION } else { cfg.region.trim() };
        base.region =
            Region::new(region).map_err(|e| Error::Invalid(format!("invalid --etcd-s3-region {region:?}: {e}")))?;
        match cfg.bucket_lookup {
            BucketLookup::Auto => {}
            BucketLookup::Dns => base.virtual_style = true,
            BucketLookup::Path => base.virtual_style = false,
        }
        let bucket = cfg.bucket.trim().to_string();
        BucketName::new(bucket.as_str())
            .map_err(|e| Error::Invalid(format!("invalid --etcd-s3-bucket {bucket:?}: {e}")))?;
        let keyring = Keyring::new(cfg).map_err(Error::Invalid)?;
        let customer_key =
            cfg.sse_customer_key_file.as_deref().map(CustomerKey::from_file).transpose().map_err(Error::Invalid)?;
        let streamer = StreamPut {
            base: base.clone(),
            http: stream_put_client(cfg, ca_pem.as_deref()).map_err(|e| {
                Error::Invalid(format!("cannot set up the s3 client for {}: {}", endpoint.url(), innermost_detail(&e)))
            })?,
        };
        let parts = ClientParts { base, ca_pem, skip_ssl_verify: cfg.skip_ssl_verify, endpoint: endpoint.url() };
        // Signed with what needs no network (the flags or the file); an instance role's
        // credentials replace the client when a request first needs them.
        let fixed = keyring.fixed();
        let client = parts.build(fixed.as_ref().map(|f| &f.key)).map_err(Error::Invalid)?;
        let signer = Signer { current: std::sync::RwLock::new((fixed, client)), keyring, parts };

        let folder = cfg.folder_trimmed();
        let prefix = if folder.is_empty() { String::new() } else { format!("{folder}/") };
        let describe = if folder.is_empty() { format!("s3://{bucket}") } else { format!("s3://{bucket}/{folder}") };
        let store = S3Store {
            inner: Arc::new(Inner {
                signer,
                streamer,
                classifier: Classifier { endpoint: endpoint.url(), bucket: bucket.clone(), region: region.to_string() },
                bucket,
                prefix,
                describe,
                timeout: cfg.timeout,
                sse_headers: cfg.sse.as_ref().map(|s| s.headers()).unwrap_or_default(),
                object_lock: cfg.object_lock,
                customer_key,
                stream_limits: StreamLimits::of(cfg.stream_limits),
            }),
        };
        Ok(store)
    }

    /// The bucket name.
    pub fn bucket(&self) -> &str {
        &self.inner.bucket
    }

    /// The endpoint as a URL, for messages.
    pub fn endpoint(&self) -> &str {
        &self.inner.classifier.endpoint
    }

    /// Checks that S3 answers, the bucket exists and the credentials may read it.
    pub async fn check(&self) -> Result<()> {
        let inner = &self.inner;
        let exists = inner
            .call("check", "the bucket", || async move {
                let resp = inner
                    .client()
                    .bucket_exists(inner.bucket.as_str())
                    .map_err(|e| inner.classifier.classify(e.into()))?
                    .build()
                    .send()
                    .await
                    .map_err(|e| inner.classifier.classify(e))?;
                Ok(resp.exists())
            })
            .await
            .map_err(|e| inner.storage_error("check", "the bucket", e))?;
        if !exists {
            let e = S3Error::NoSuchBucket { bucket: inner.bucket.clone(), endpoint: inner.classifier.endpoint.clone() };
            return Err(inner.storage_error("check", "the bucket", e));
        }
        Ok(())
    }

    /// Like [`SnapshotStore::head`], with the content type and user metadata.
    pub async fn head_details(&self, key: &str) -> Result<Option<ObjectDetails>> {
        let inner = &self.inner;
        let object = inner.object_name(key)?;
        let object = object.as_str();
        let key_headers = multimap(&inner.key_headers());
        let res = inner
            .call("stat", key, || async {
                inner
                    .client()
                    .stat_object(inner.bucket.as_str(), object)
                    .map_err(|e| inner.classifier.classify(e.into()))?
                    .extra_headers(key_headers.clone())
                    .build()
                    .send()
                    .await
                    .map_err(|e| inner.classifier.classify(e))
            })
            .await;
        let resp = match res {
            Ok(r) => r,
            Err(S3Error::NoSuchKey { .. }) => return Ok(None),
            Err(e) => return Err(inner.storage_error("stat", key, inner.explain_read_refusal(e))),
        };
        let headers = resp.headers();
        let size = resp.size().map_err(|e| inner.storage_error("stat", key, S3Error::Invalid(e.to_string())))?;
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let content_type = header("content-type");
        let mut user_metadata: Vec<(String, String)> = resp.user_metadata().unwrap_or_default().into_iter().collect();
        user_metadata.sort();
        Ok(Some(ObjectDetails {
            info: ObjectInfo { key: key.to_string(), size, modified: last_modified(headers) },
            content_type,
            user_metadata,
            sse: header("x-amz-server-side-encryption"),
            sse_kms_key_id: header("x-amz-server-side-encryption-aws-kms-key-id"),
            hold: hold_of(headers, Utc::now()),
        }))
    }
}

/// What a minio client is built from, kept to build it again when the credentials change.
struct ClientParts {
    base: BaseUrl,
    /// The `--etcd-s3-endpoint-ca` bundle.
    ca_pem: Option<Vec<u8>>,
    skip_ssl_verify: bool,
    /// For messages.
    endpoint: String,
}

impl ClientParts {
    /// A client signing with `key`, or sending anonymous requests.
    fn build(&self, key: Option<&Key>) -> std::result::Result<MinioClient, String> {
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
struct Signer {
    keyring: Keyring,
    parts: ClientParts,
    /// The credentials the client signs with (`None`: anonymous) and the client.
    current: std::sync::RwLock<(Option<Arc<Found>>, MinioClient)>,
}

impl Signer {
    /// Brings the client up to date with the chain (which may ask the instance role) and returns
    /// the credentials it signs with.
    async fn refresh(&self) -> Result<Option<Arc<Found>>, S3Error> {
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

    fn client(&self) -> MinioClient {
        self.current.read().unwrap_or_else(|p| p.into_inner()).1.clone()
    }
}

/// Refuses `--etcd-s3-proxy` unless the process environment already carries it (see
/// [`crate::proxy_env`]): minio's HTTP client only takes a proxy from the environment, and
/// silently going direct would be worse than an error.
fn check_proxy_env(cfg: &S3Config, https: bool) -> Result<()> {
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
fn stream_put_client(cfg: &S3Config, ca_pem: Option<&[u8]>) -> std::result::Result<reqwest::Client, reqwest::Error> {
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
fn ca_bundle(spec: &std::path::Path) -> Result<Vec<u8>> {
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

fn last_modified(headers: &reqwest::header::HeaderMap) -> Option<DateTime<Utc>> {
    let v = headers.get("last-modified")?.to_str().ok()?;
    DateTime::parse_from_rfc2822(v).ok().map(|d| d.with_timezone(&Utc))
}

fn io_other(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> std::io::Error {
    std::io::Error::other(e)
}

impl Inner {
    /// The one retry helper. Runs `f` until it succeeds, fails with an error that is not
    /// retryable, runs out of attempts, or the operation's deadline (`timeout`) passes.
    async fn call<T, F, Fut>(&self, op: &'static str, key: &str, mut f: F) -> Result<T, S3Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, S3Error>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut delay = RETRY.first_delay;
        let mut attempt = 1;
        loop {
            let attempt_once = async {
                self.signer.refresh().await?;
                f().await
            };
            let err = match tokio::time::timeout_at(deadline, attempt_once).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => e,
                Err(_) => return Err(self.timeout_error()),
            };
            if !err.is_retryable() || attempt >= RETRY.attempts || Instant::now() + delay >= deadline {
                return Err(err);
            }
            tracing::warn!(op, key, attempt, store = %self.describe, error = %err, "s3 request failed; retrying in {delay:?}");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY.max_delay);
            attempt += 1;
        }
    }

    fn timeout_error(&self) -> S3Error {
        S3Error::Timeout { endpoint: self.classifier.endpoint.clone(), timeout: self.timeout }
    }

    /// The client signing with the current credentials; [`Inner::call`] refreshes it first.
    fn client(&self) -> MinioClient {
        self.signer.client()
    }

    fn storage_error(&self, op: &'static str, key: &str, mut e: S3Error) -> Error {
        if let S3Error::AccessDenied { credentials, .. } = &mut e {
            *credentials = Some(self.signer.keyring.describe());
        }
        Error::Storage {
            store: self.describe.clone(),
            op,
            key: key.to_string(),
            retryable: e.is_retryable(),
            cause: Box::new(e),
        }
    }

    /// `folder/<key>` after checking the key is one of ours (`<file>` or `.metadata/<file>`).
    fn object_name(&self, key: &str) -> Result<String> {
        match key.strip_prefix(METADATA_DIR).and_then(|r| r.strip_prefix('/')) {
            Some(file) => name::validate_file_name(file)?,
            None => name::validate_file_name(key)?,
        }
        Ok(format!("{}{key}", self.prefix))
    }

    fn user_metadata(opts: &PutOptions) -> Option<Multimap> {
        if opts.user_metadata.is_empty() {
            return None;
        }
        let mut m = Multimap::new();
        for (k, v) in &opts.user_metadata {
            m.add(format!("x-amz-meta-{}", k.to_ascii_lowercase()), v.clone());
        }
        Some(m)
    }

    /// The headers of a request that creates an object (a PUT, a multipart initiation):
    /// server-side encryption or the customer key (with its MD5 as user metadata), and the
    /// object lock's retention, counted from now.
    fn object_headers(&self) -> Vec<(&'static str, String)> {
        let mut h = self.sse_headers.clone();
        if let Some(k) = &self.customer_key {
            h.extend(k.headers());
            h.push((meta_header(), k.md5().to_string()));
        }
        if let Some(lock) = &self.object_lock {
            h.extend(lock.headers(Utc::now()));
        }
        h
    }

    /// The headers of every other request on an object's bytes (a part, the completion, GET,
    /// HEAD): the customer key, when there is one.
    fn key_headers(&self) -> Vec<(&'static str, String)> {
        self.customer_key.iter().flat_map(|k| k.headers()).collect()
    }

    /// A read that S3 refused as it refuses one of an SSE-C object without its key (400 with no
    /// error document on a HEAD, `InvalidRequest` on a GET), said as such when no key was given.
    fn explain_read_refusal(&self, e: S3Error) -> S3Error {
        let ssec_refusal = match &e {
            S3Error::Status { status: 400, .. } => true,
            S3Error::Server { code, .. } => code.eq_ignore_ascii_case("invalidrequest"),
            _ => false,
        };
        match (ssec_refusal, &self.customer_key) {
            (true, None) => S3Error::CustomerKey(format!("{e}, as s3 answers reading an object encrypted with a customer key (SSE-C) without it; pass --etcd-s3-sse-customer-key-file with the key it was written with")),
            _ => e,
        }
    }

    fn content_type(opts: &PutOptions) -> String {
        if opts.content_type.is_empty() {
            "application/octet-stream".into()
        } else {
            opts.content_type.clone()
        }
    }

    async fn put_single(
        &self,
        key: &str,
        object: &str,
        data: SegmentedBytes,
        opts: &PutOptions,
    ) -> Result<(), S3Error> {
        let mut headers = self.object_headers();
        headers.extend(checksum::headers(&checksum::of_segments(&data)));
        let data = Arc::new(data);
        let meta = Self::user_metadata(opts);
        let ctype = Self::content_type(opts);
        let sse = multimap(&headers);
        self.call("upload", key, || {
            let (data, meta, ctype, sse) = (data.clone(), meta.clone(), ctype.clone(), sse.clone());
            async move {
                let part = UploadPart::builder()
                    .client(self.client())
                    .bucket(BucketName::new(self.bucket.as_str()).map_err(|e| self.classifier.classify(e.into()))?)
                    .object(ObjectKey::new(object).map_err(|e| self.classifier.classify(e.into()))?)
                    .data(data)
                    .content_type(Some(ctype))
                    .user_metadata(meta)
                    .extra_headers(sse)
                    .build();
                PutObject::builder().inner(part).build().send().await.map_err(|e| self.classifier.classify(e))?;
                Ok(())
            }
        })
        .await
    }

    async fn start_multipart(&self, key: &str, object: &str, opts: &PutOptions) -> Result<String, S3Error> {
        let meta = Self::user_metadata(opts);
        let ctype = Self::content_type(opts);
        // The encryption and the lock are asked for once, at the initiation (S3 refuses SSE-S3
        // and SSE-KMS headers on UploadPart); every part then carries a CRC32C.
        let sse = multimap(&self.object_headers());
        self.call("start the multipart upload of", key, || {
            let (meta, ctype, sse) = (meta.clone(), ctype.clone(), sse.clone());
            async move {
                let resp = self
                    .client()
                    .create_multipart_upload(self.bucket.as_str(), object)
                    .map_err(|e| self.classifier.classify(e.into()))?
                    .content_type(Some(ctype))
                    .user_metadata(meta)
                    .extra_headers(sse)
                    .checksum_algorithm(Some(checksum::ALGORITHM))
                    .build()
                    .send()
                    .await
                    .map_err(|e| self.classifier.classify(e))?;
                let id = resp.upload_id().await.map_err(|e| self.classifier.classify(e.into()))?;
                Ok(id.to_string())
            }
        })
        .await
    }

    async fn upload_part(
        &self,
        key: &str,
        object: &str,
        upload_id: &str,
        number: u16,
        data: Arc<SegmentedBytes>,
    ) -> Result<PartInfo, S3Error> {
        let size = data.len() as u64;
        let crc = checksum::of_segments(&data);
        let mut headers = self.key_headers();
        headers.extend(checksum::headers(&crc));
        let headers = multimap(&headers);
        self.call("upload a part of", key, || {
            let (data, headers, crc) = (data.clone(), headers.clone(), crc.clone());
            async move {
                let part = UploadPart::builder()
                    .client(self.client())
                    .bucket(BucketName::new(self.bucket.as_str()).map_err(|e| self.classifier.classify(e.into()))?)
                    .object(ObjectKey::new(object).map_err(|e| self.classifier.classify(e.into()))?)
                    .upload_id(Some(upload_id.to_string()))
                    .part_number(Some(number))
                    .data(data)
                    .extra_headers(headers)
                    .build();
                let resp = part.send().await.map_err(|e| self.classifier.classify(e))?;
                let etag = resp.etag().map_err(|e| self.classifier.classify(e.into()))?;
                Ok(PartInfo::new(number, etag, size, Some((checksum::ALGORITHM, crc))))
            }
        })
        .await
    }

    /// One part whose body streams ([`StreamPut`]): not retried, since the body is consumed as
    /// it goes; the caller retries the whole upload from the saved file.
    async fn upload_streamed_part(
        &self,
        key: &str,
        object: &str,
        upload_id: &str,
        number: u16,
        size: u64,
        body: ByteStream,
    ) -> Result<PartInfo, S3Error> {
        // The request starts once the part's first bytes are there, so that a part waiting for
        // the save to reach it is not taken for a stalled upload.
        let mut body = body.peekable();
        if let Some(Err(e)) = std::pin::Pin::new(&mut body).peek().await {
            return Err(S3Error::Source(innermost_detail(e)));
        }
        let body = body.boxed();
        let query = [("partNumber", number.to_string()), ("uploadId", upload_id.to_string())];
        // SSE-S3/KMS and the lock are asked for at the initiation (S3 refuses the first on a
        // part); a customer key goes with every part.
        let key_headers = self.key_headers();
        let req = PutRequest {
            bucket: &self.bucket,
            object,
            len: size,
            content_type: "application/octet-stream",
            user_metadata: &[],
            extra_headers: &key_headers,
            query: &query,
            stall_timeout: self.timeout,
        };
        let creds = self.signer.refresh().await?;
        let answer = self.streamer.put(&self.classifier, creds.as_ref().map(|f| &f.key), req, body).await?;
        let etag = answer
            .etag
            .and_then(|e| minio::s3::types::ETag::new(e).ok())
            .ok_or_else(|| S3Error::Invalid(format!("the server answered part {number} of {key} without an ETag")))?;
        Ok(PartInfo::new(number, etag, size, Some((checksum::ALGORITHM, answer.checksum))))
    }

    async fn complete_multipart(
        &self,
        key: &str,
        object: &str,
        upload_id: &str,
        parts: Vec<PartInfo>,
        total: u64,
    ) -> Result<(), S3Error> {
        let mut tries = 0u32;
        let key_headers = multimap(&self.key_headers());
        let res = self
            .call("complete the multipart upload of", key, || {
                tries += 1;
                let (parts, first_try, key_headers) = (parts.clone(), tries == 1, key_headers.clone());
                async move {
                    let res = self
                        .client()
                        .complete_multipart_upload(self.bucket.as_str(), object, upload_id, parts)
                        .map_err(|e| self.classifier.classify(e.into()))?
                        .extra_headers(key_headers)
                        .build()
                        .send()
                        .await;
                    match res {
                        // An earlier attempt may have completed it before its answer was lost.
                        Err(e) if !first_try && is_no_such_upload(&e) => Ok(false),
                        Err(e) => Err(self.classifier.classify(e)),
                        // S3 may answer 200 and put the error in the body.
                        Ok(resp) => match error_in_body(resp.body(), resp.headers()) {
                            Some(err) => Err(self.classifier.classify_response(&err)),
                            None => Ok(true),
                        },
                    }
                }
            })
            .await?;
        if !res {
            // Check that the object is there with the size we sent.
            let ok = self.stat_size(key, object).await? == Some(total);
            if !ok {
                return Err(S3Error::Server {
                    endpoint: self.classifier.endpoint.clone(),
                    code: "NoSuchUpload".into(),
                    message: Some("the multipart upload vanished before it completed".into()),
                    retryable: false,
                });
            }
        }
        Ok(())
    }

    async fn stat_size(&self, key: &str, object: &str) -> Result<Option<u64>, S3Error> {
        let key_headers = multimap(&self.key_headers());
        let res = self
            .call("stat", key, || async {
                self.client()
                    .stat_object(self.bucket.as_str(), object)
                    .map_err(|e| self.classifier.classify(e.into()))?
                    .extra_headers(key_headers.clone())
                    .build()
                    .send()
                    .await
                    .map_err(|e| self.classifier.classify(e))
            })
            .await;
        match res {
            Ok(r) => Ok(Some(r.size().map_err(|e| S3Error::Invalid(e.to_string()))?)),
            Err(S3Error::NoSuchKey { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn abort_multipart(&self, key: &str, object: &str, upload_id: &str) {
        let res = self
            .call("abort the multipart upload of", key, || async move {
                let res = self
                    .client()
                    .abort_multipart_upload(self.bucket.as_str(), object, upload_id)
                    .map_err(|e| self.classifier.classify(e.into()))?
                    .build()
                    .send()
                    .await;
                match res {
                    Ok(_) => Ok(()),
                    Err(e) if is_no_such_upload(&e) => Ok(()),
                    Err(e) => Err(self.classifier.classify(e)),
                }
            })
            .await;
        match res {
            Ok(()) => tracing::debug!(key, store = %self.describe, "aborted multipart upload"),
            // The object never appeared; the parts stay until the bucket's lifecycle rules (or a
            // later abort) remove them.
            Err(e) => {
                tracing::warn!(key, store = %self.describe, upload_id, error = %e, "cannot abort multipart upload; no object was created, but its parts stay in the bucket until removed")
            }
        }
    }

    /// The GET request of a download, from `offset`, pinned to `etag` when resuming.
    async fn open_body(
        &self,
        key: &str,
        object: &str,
        offset: u64,
        etag: Option<&str>,
    ) -> Result<(ObjectInfo, Option<String>, BoxStream<'static, std::io::Result<Bytes>>), S3Error> {
        let key_headers = multimap(&self.key_headers());
        let resp = self
            .call("download", key, || async {
                self.client()
                    .get_object(self.bucket.as_str(), object)
                    .map_err(|e| self.classifier.classify(e.into()))?
                    .offset((offset > 0).then_some(offset))
                    .match_etag(etag.map(str::to_string))
                    .extra_headers(key_headers.clone())
                    .build()
                    .send()
                    .await
                    .map_err(|e| self.classifier.classify(e))
            })
            .await
            .map_err(|e| self.explain_read_refusal(e))?;
        let headers = resp.headers();
        // A server that does not enforce SSE-C would hand out the bytes anyway: the key's MD5
        // the object was written with says whether this read can be right.
        let written_with = headers.get(meta_header()).and_then(|v| v.to_str().ok());
        sse::check_key(written_with, self.customer_key.as_ref()).map_err(S3Error::CustomerKey)?;
        let modified = last_modified(headers);
        let etag = headers.get("etag").and_then(|v| v.to_str().ok()).map(str::to_string);
        let (body, len) = resp.into_boxed_stream().map_err(|e| self.classifier.classify(e))?;
        let info = ObjectInfo { key: key.to_string(), size: offset + len, modified };
        Ok((info, etag, body.boxed()))
    }
}

/// The error document of a 200 response (CompleteMultipartUpload may fail that way).
fn error_in_body(body: &Bytes, headers: &reqwest::header::HeaderMap) -> Option<MinioErrorResponse> {
    let text = std::str::from_utf8(body).ok()?;
    let root = text.trim_start();
    let root = match root.strip_prefix("<?xml") {
        Some(r) => r.split_once("?>")?.1.trim_start(),
        None => root,
    };
    if !root.starts_with("<Error>") {
        return None;
    }
    MinioErrorResponse::new_from_body(body.clone(), headers.clone()).ok()
}

/// Aborts a multipart upload if the `put` that started it is dropped before finishing.
struct AbortOnDrop {
    inner: Arc<Inner>,
    key: String,
    object: String,
    upload_id: String,
    armed: bool,
}

impl AbortOnDrop {
    fn armed(inner: &Arc<Inner>, key: &str, object: &str, upload_id: &str) -> Self {
        AbortOnDrop {
            inner: inner.clone(),
            key: key.to_string(),
            object: object.to_string(),
            upload_id: upload_id.to_string(),
            armed: true,
        }
    }

    async fn abort_now(mut self) {
        self.armed = false;
        self.inner.abort_multipart(&self.key, &self.object, &self.upload_id).await;
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (inner, key, object, id) = (
                self.inner.clone(),
                std::mem::take(&mut self.key),
                std::mem::take(&mut self.object),
                std::mem::take(&mut self.upload_id),
            );
            rt.spawn(async move { inner.abort_multipart(&key, &object, &id).await });
        }
    }
}

/// The body of a put, cut into parts.
struct PartReader {
    body: ByteStream,
    /// The part being filled; kept here so that [`PartReader::read`] is cancel-safe.
    pending: SegmentedBytes,
    /// What was read beyond the last part.
    carry: Option<Bytes>,
}

impl PartReader {
    fn new(body: ByteStream) -> Self {
        PartReader { body, pending: SegmentedBytes::new(), carry: None }
    }

    /// Reads up to `size` bytes into one part. `Ok((part, true))` when the body ended.
    /// Cancel-safe: if the future is dropped, the bytes read so far stay for the next call.
    async fn read(&mut self, size: u64) -> std::io::Result<(SegmentedBytes, bool)> {
        let size = size as usize;
        loop {
            if self.pending.len() >= size {
                return Ok((std::mem::take(&mut self.pending), false));
            }
            let mut chunk = match self.carry.take() {
                Some(c) => c,
                None => match self.body.next().await {
                    Some(Ok(c)) => c,
                    Some(Err(e)) => return Err(e),
                    None => return Ok((std::mem::take(&mut self.pending), true)),
                },
            };
            let room = size - self.pending.len();
            if chunk.len() > room {
                self.carry = Some(chunk.split_off(room));
            }
            if !chunk.is_empty() {
                self.pending.append(chunk);
            }
        }
    }
}

/// Part size for a body of `size_hint` bytes: the default, or larger so that it fits in
/// 10,000 parts (with room to spare when the hint is low).
fn initial_part_size(size_hint: Option<u64>) -> u64 {
    let min_for_hint = size_hint.map(|n| n.div_ceil(9_000)).unwrap_or(0);
    let mib = 1 << 20;
    DEFAULT_PART_SIZE.max(min_for_hint.div_ceil(mib) * mib)
}

/// With an unknown size, parts double every 1,000 parts so that 10,000 parts hold terabytes.
fn grown_part_size(current: u64, parts_done: u16) -> u64 {
    if parts_done > 0 && parts_done.is_multiple_of(1000) {
        (current * 2).min(MAX_GROWN_PART_SIZE)
    } else {
        current
    }
}

impl S3Store {
    async fn put_within(&self, key: &str, body: ByteStream, opts: PutOptions) -> Result<u64> {
        let inner = &self.inner;
        let object = inner.object_name(key)?;
        let started = std::time::Instant::now();
        let limits = inner.stream_limits;
        if let Some(len) = opts.size_hint.filter(|&n| n > limits.single_put) {
            let parts = self
                .put_streamed_parts(key, object, body, len, &opts, limits.part)
                .await
                .map_err(|e| inner.storage_error("upload", key, e))?;
            tracing::debug!(key, size = len, parts, store = %inner.describe, duration_ms = started.elapsed().as_millis() as u64, "uploaded in streamed parts");
            return Ok(len);
        }
        if let Some(len) = opts.size_hint.filter(|n| (DEFAULT_PART_SIZE..=limits.single_put).contains(n)) {
            let object_headers = inner.object_headers();
            let req = PutRequest {
                bucket: &inner.bucket,
                object: &object,
                len,
                content_type: &Inner::content_type(&opts),
                user_metadata: &opts.user_metadata,
                extra_headers: &object_headers,
                query: &[],
                stall_timeout: inner.timeout,
            };
            let creds = inner.signer.refresh().await.map_err(|e| inner.storage_error("upload", key, e))?;
            inner
                .streamer
                .put(&inner.classifier, creds.as_ref().map(|f| &f.key), req, body)
                .await
                .map_err(|e| inner.storage_error("upload", key, e))?;
            tracing::debug!(key, size = len, store = %inner.describe, duration_ms = started.elapsed().as_millis() as u64, "uploaded in one streamed request");
            return Ok(len);
        }
        let part_size = initial_part_size(opts.size_hint);
        let mut reader = PartReader::new(body);
        let (first, ended) = reader
            .read(part_size)
            .await
            .map_err(|e| inner.storage_error("upload", key, S3Error::Source(innermost_detail(&e))))?;
        let n = if ended {
            let n = first.len() as u64;
            inner.put_single(key, &object, first, &opts).await.map_err(|e| inner.storage_error("upload", key, e))?;
            n
        } else {
            self.put_multipart(key, object, reader, first, &opts, part_size)
                .await
                .map_err(|e| inner.storage_error("upload", key, e))?
        };
        tracing::debug!(key, size = n, store = %inner.describe, duration_ms = started.elapsed().as_millis() as u64, "uploaded");
        Ok(n)
    }

    async fn put_multipart(
        &self,
        key: &str,
        object: String,
        mut reader: PartReader,
        first: SegmentedBytes,
        opts: &PutOptions,
        mut part_size: u64,
    ) -> Result<u64, S3Error> {
        let inner = self.inner.clone();
        let upload_id = inner.start_multipart(key, &object, opts).await?;
        tracing::debug!(key, upload_id = %upload_id, part_size, "multipart upload started");
        let guard = AbortOnDrop::armed(&inner, key, &object, &upload_id);
        let mut tasks: JoinSet<Result<PartInfo, S3Error>> = JoinSet::new();
        let res = async {
            let mut parts: Vec<PartInfo> = Vec::new();
            let mut next = Some((first, false));
            let mut number: u16 = 0;
            let mut total = 0u64;
            loop {
                let (data, ended) = match next.take() {
                    Some(p) => p,
                    // Read the next part, and meanwhile notice a failed part upload at once
                    // rather than after the (possibly slow) source has filled another part.
                    None => loop {
                        tokio::select! {
                            r = reader.read(part_size) => break r.map_err(|e| S3Error::Source(innermost_detail(&e)))?,
                            done = tasks.join_next(), if !tasks.is_empty() => parts.push(joined(done)?),
                        }
                    },
                };
                if data.is_empty() && number > 0 {
                    break;
                }
                if number == MAX_PARTS {
                    return Err(S3Error::Invalid(format!(
                        "the body needs more than {MAX_PARTS} parts; pass a size hint so that parts are large enough"
                    )));
                }
                number += 1;
                total += data.len() as u64;
                while tasks.len() >= PARTS_IN_FLIGHT {
                    parts.push(joined(tasks.join_next().await)?);
                }
                let (inner, key, object, id) = (inner.clone(), key.to_string(), object.clone(), upload_id.clone());
                let data = Arc::new(data);
                tasks.spawn(async move { inner.upload_part(&key, &object, &id, number, data).await });
                if ended {
                    break;
                }
                part_size = grown_part_size(part_size, number);
            }
            while !tasks.is_empty() {
                parts.push(joined(tasks.join_next().await)?);
            }
            parts.sort_by_key(|p| p.number);
            inner.complete_multipart(key, &object, &upload_id, parts, total).await?;
            Ok(total)
        }
        .await;
        settle(res, &mut tasks, guard).await
    }
}

/// Above `single_put` bytes (S3's limit for one PUT) a body of known length goes up as a
/// multipart upload whose parts stream like the single PUT: nothing is buffered. When the caller
/// gives the body's byte ranges ([`Ranges`](k3s_snapshot_core::store::Ranges): a save's file as it is written), up to
/// [`STREAMED_PARTS_IN_FLIGHT`] parts go up at once, each starting once its first bytes are
/// there. Otherwise each part is a consecutive slice of the one body, and the next part's request
/// starts as soon as the previous one has taken its last byte, while that one awaits its answer.
#[derive(Debug, Clone, Copy)]
struct StreamLimits {
    single_put: u64,
    part: u64,
}

/// Streamed parts of 64 MiB: 96 requests for a 6 GiB snapshot, 10,000 parts hold 625 GiB.
const STREAMED_PART_SIZE: u64 = 64 << 20;
/// Streamed parts sent at the same time when the body comes as byte ranges.
const STREAMED_PARTS_IN_FLIGHT: usize = 3;
/// For tests only: `SINGLE_PUT_LIMIT:PART_SIZE` in bytes, so that the streamed multipart upload
/// runs on a snapshot of a few MiB.
const TEST_LIMITS_ENV: &str = "K3S_SNAPSHOT_TEST_S3_STREAM_LIMITS";

impl StreamLimits {
    /// The configured limits, else the test knob's, else S3's; limits S3 would refuse are ignored.
    fn of(configured: Option<(u64, u64)>) -> StreamLimits {
        let default = StreamLimits { single_put: MAX_SINGLE_PUT, part: STREAMED_PART_SIZE };
        let from_env = || {
            let v = std::env::var(TEST_LIMITS_ENV).ok()?;
            let (a, b) = v.split_once(':')?;
            Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?))
        };
        match configured.or_else(from_env) {
            Some((single_put, part)) if part >= MIN_PART_SIZE && single_put <= MAX_SINGLE_PUT => {
                StreamLimits { single_put, part }
            }
            _ => default,
        }
    }

    /// The part size for a body of `len` bytes: `part`, or larger to fit in 10,000 parts.
    fn part_for(part: u64, len: u64) -> u64 {
        let mib = 1 << 20;
        part.max(len.div_ceil(u64::from(MAX_PARTS)).div_ceil(mib) * mib)
    }
}

/// The body, shared by the parts that take consecutive slices of it.
struct Splitter {
    body: ByteStream,
    carry: Option<Bytes>,
}

/// The next `len` bytes of the shared body as a stream of their own; `taken` fires once the
/// last of them was handed out (a part whose stream is dropped earlier never fires it).
fn slice_of(src: Arc<tokio::sync::Mutex<Splitter>>, len: u64, taken: tokio::sync::oneshot::Sender<()>) -> ByteStream {
    stream::unfold((src, len, Some(taken)), |(src, left, mut taken)| async move {
        if left == 0 {
            return None;
        }
        let mut s = src.lock().await;
        let chunk = match s.carry.take() {
            Some(c) => Ok(c),
            None => match s.body.next().await {
                Some(r) => r,
                None => Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the data ended before the length announced",
                )),
            },
        };
        drop(s);
        let mut chunk = match chunk {
            Ok(c) => c,
            Err(e) => return Some((Err(e), (src, 0, None))),
        };
        if chunk.len() as u64 > left {
            let rest = chunk.split_off(left as usize);
            src.lock().await.carry = Some(rest);
        }
        let left = left - chunk.len() as u64;
        if left == 0 {
            if let Some(t) = taken.take() {
                let _ = t.send(());
            }
        }
        Some((Ok(chunk), (src, left, taken)))
    })
    .boxed()
}

impl S3Store {
    /// [`StreamLimits`]: a multipart upload of streamed parts, two in flight, for a body of exactly
    /// `len` bytes. Returns the number of parts. Any failure aborts the upload.
    async fn put_streamed_parts(
        &self,
        key: &str,
        object: String,
        body: ByteStream,
        len: u64,
        opts: &PutOptions,
        part: u64,
    ) -> Result<u16, S3Error> {
        let inner = self.inner.clone();
        let part = StreamLimits::part_for(part, len);
        let count = len.div_ceil(part);
        if count > u64::from(MAX_PARTS) {
            return Err(S3Error::Invalid(format!("{len} bytes need more than {MAX_PARTS} parts")));
        }
        let upload_id = inner.start_multipart(key, &object, opts).await?;
        tracing::debug!(key, upload_id = %upload_id, part_size = part, parts = count, "multipart upload of streamed parts started");
        let guard = AbortOnDrop::armed(&inner, key, &object, &upload_id);
        let ranges = opts.ranges.clone();
        let in_flight = if ranges.is_some() { STREAMED_PARTS_IN_FLIGHT } else { PARTS_IN_FLIGHT };
        let splitter = Arc::new(tokio::sync::Mutex::new(Splitter { body, carry: None }));
        let mut tasks: JoinSet<Result<PartInfo, S3Error>> = JoinSet::new();
        let res = async {
            let mut parts: Vec<PartInfo> = Vec::new();
            for number in 1..=count as u16 {
                let offset = (u64::from(number) - 1) * part;
                let size = part.min(len - offset);
                while tasks.len() >= in_flight {
                    parts.push(joined(tasks.join_next().await)?);
                }
                let (inner, key, object, id) = (inner.clone(), key.to_string(), object.clone(), upload_id.clone());
                if let Some(r) = &ranges {
                    let slice = (r.0)(offset, size);
                    tasks.spawn(
                        async move { inner.upload_streamed_part(&key, &object, &id, number, size, slice).await },
                    );
                    continue;
                }
                let (taken_tx, mut taken) = tokio::sync::oneshot::channel();
                let slice = slice_of(splitter.clone(), size, taken_tx);
                tasks.spawn(async move { inner.upload_streamed_part(&key, &object, &id, number, size, slice).await });
                // The next part starts once this one took its last byte (or as soon as one fails).
                loop {
                    tokio::select! {
                        r = &mut taken => {
                            if r.is_err() {
                                // The slice was dropped short: its part failed; report that.
                                while !tasks.is_empty() {
                                    parts.push(joined(tasks.join_next().await)?);
                                }
                                return Err(S3Error::Invalid(format!("part {number} ended before its last byte")));
                            }
                            break;
                        }
                        done = tasks.join_next(), if !tasks.is_empty() => parts.push(joined(done)?),
                    }
                }
            }
            while !tasks.is_empty() {
                parts.push(joined(tasks.join_next().await)?);
            }
            // Nothing may follow the announced length.
            let mut s = splitter.lock().await;
            if let Some(r) = &ranges {
                s.carry = None;
                s.body = (r.0)(len, 1);
            }
            let extra = match s.carry.take() {
                Some(c) if !c.is_empty() => true,
                _ => loop {
                    match s.body.next().await {
                        Some(Ok(c)) if c.is_empty() => continue,
                        Some(Ok(_)) => break true,
                        Some(Err(e)) => return Err(S3Error::Source(innermost_detail(&e))),
                        None => break false,
                    }
                },
            };
            if extra {
                return Err(S3Error::Source(format!("the data is longer than the {len} bytes announced")));
            }
            drop(s);
            parts.sort_by_key(|p| p.number);
            inner.complete_multipart(key, &object, &upload_id, parts, len).await?;
            Ok(count as u16)
        }
        .await;
        settle(res, &mut tasks, guard).await
    }
}

/// The end of a multipart upload: kept when `res` is ok; otherwise the part uploads still running
/// are stopped (and waited for, so that none lands after the abort), then the upload is aborted
/// so that its parts are dropped.
async fn settle<T>(
    res: Result<T, S3Error>,
    tasks: &mut JoinSet<Result<PartInfo, S3Error>>,
    guard: AbortOnDrop,
) -> Result<T, S3Error> {
    match res {
        Ok(v) => {
            guard.disarm();
            Ok(v)
        }
        Err(e) => {
            tasks.shutdown().await;
            guard.abort_now().await;
            Err(e)
        }
    }
}

fn joined(
    done: Option<std::result::Result<Result<PartInfo, S3Error>, tokio::task::JoinError>>,
) -> Result<PartInfo, S3Error> {
    match done {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(S3Error::Invalid(format!("part upload task failed: {e}"))),
        None => Err(S3Error::Invalid("no part upload in flight".into())),
    }
}

#[async_trait]
impl SnapshotStore for S3Store {
    fn describe(&self) -> String {
        self.inner.describe.clone()
    }

    fn location(&self, key: &str) -> String {
        format!("{}/{key}", self.inner.describe)
    }

    /// The whole upload, retries included, is bounded by `--etcd-s3-timeout`, as k3s bounds it;
    /// a dropped upload leaves no object (the streamed PUT is cut, a multipart upload aborted).
    async fn put(&self, key: &str, body: ByteStream, opts: PutOptions) -> Result<u64> {
        let inner = &self.inner;
        match tokio::time::timeout(inner.timeout, self.put_within(key, body, opts)).await {
            Ok(r) => r,
            Err(_) => Err(inner.storage_error(
                "upload",
                key,
                S3Error::UploadDeadline { endpoint: inner.classifier.endpoint.clone(), timeout: inner.timeout },
            )),
        }
    }

    async fn get(&self, key: &str) -> Result<(ObjectInfo, ByteStream)> {
        let inner = self.inner.clone();
        let object = inner.object_name(key)?;
        let (info, etag, body) = match inner.open_body(key, &object, 0, None).await {
            Ok(v) => v,
            Err(S3Error::NoSuchKey { .. }) => {
                return Err(Error::NotFound { name: key.to_string(), location: inner.describe.clone() })
            }
            Err(e) => return Err(inner.storage_error("download", key, e)),
        };
        let state = Download {
            inner,
            key: key.to_string(),
            object,
            etag,
            offset: 0,
            size: info.size,
            body: Some(body),
            resumes: 0,
        };
        Ok((info, stream::unfold(state, Download::next).boxed()))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        Ok(self.head_details(key).await?.map(|d| d.info))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxStream<'a, Result<ObjectInfo>> {
        struct Page {
            token: Option<String>,
            done: bool,
        }
        let inner = &self.inner;
        let full_prefix = format!("{}{prefix}", inner.prefix);
        stream::try_unfold(Page { token: None, done: false }, move |page| {
            let full_prefix = full_prefix.clone();
            async move {
                if page.done {
                    return Ok(None);
                }
                let token = page.token.clone();
                let resp = inner
                    .call("list", prefix, || {
                        let (full_prefix, token) = (full_prefix.clone(), token.clone());
                        async move {
                            let pages = inner
                                .client()
                                .list_objects(inner.bucket.as_str())
                                .map_err(|e| inner.classifier.classify(e.into()))?
                                .prefix(Some(full_prefix))
                                .delimiter(Some("/".to_string()))
                                .max_keys(Some(LIST_PAGE))
                                .continuation_token(token)
                                .build()
                                .to_stream()
                                .await
                                .next()
                                .await;
                            match pages {
                                Some(r) => r.map_err(|e| inner.classifier.classify(e)),
                                None => Err(S3Error::Invalid("the listing returned no page".into())),
                            }
                        }
                    })
                    .await
                    .map_err(|e| inner.storage_error("list", prefix, e))?;
                let next_token = resp.next_continuation_token.clone().filter(|t| !t.is_empty());
                if resp.is_truncated && next_token.is_none() {
                    return Err(inner.storage_error(
                        "list",
                        prefix,
                        S3Error::Invalid("the server truncated the listing without a continuation token".into()),
                    ));
                }
                let items: Vec<Result<ObjectInfo>> = resp
                    .contents
                    .into_iter()
                    .filter(|e| !e.is_prefix && !e.is_delete_marker)
                    .filter_map(|e| {
                        let rel = e.name.strip_prefix(&inner.prefix)?;
                        if rel.is_empty() || !rel.starts_with(prefix) || rel[prefix.len()..].contains('/') {
                            return None;
                        }
                        Some(Ok(ObjectInfo {
                            key: rel.to_string(),
                            size: e.size.unwrap_or(0),
                            modified: e.last_modified,
                        }))
                    })
                    .collect();
                let done = !resp.is_truncated;
                Ok(Some((stream::iter(items), Page { token: next_token, done })))
            }
        })
        .try_flatten()
        .boxed()
    }

    async fn delete(&self, keys: &[String]) -> Result<()> {
        let inner = &self.inner;
        let mut objects = Vec::with_capacity(keys.len());
        for key in keys {
            objects.push(inner.object_name(key)?);
        }
        for (batch, names) in objects.chunks(DELETE_BATCH).zip(keys.chunks(DELETE_BATCH)) {
            let what = match names {
                [one] => one.clone(),
                _ => format!("{} objects", names.len()),
            };
            let resp = inner
                .call("delete", &what, || async move {
                    let mut list = Vec::with_capacity(batch.len());
                    for name in batch {
                        // minio puts keys into the request's XML unescaped.
                        let escaped = xml_escape(name);
                        list.push(
                            ObjectToDelete::try_from(escaped.as_str())
                                .map_err(|e| inner.classifier.classify(e.into()))?,
                        );
                    }
                    inner
                        .client()
                        .delete_objects(inner.bucket.as_str(), list)
                        .map_err(|e| inner.classifier.classify(e.into()))?
                        .build()
                        .send()
                        .await
                        .map_err(|e| inner.classifier.classify(e))
                })
                .await
                .map_err(|e| inner.storage_error("delete", &what, e))?;
            let results =
                resp.result().map_err(|e| inner.storage_error("delete", &what, inner.classifier.classify(e)))?;
            let failed: Vec<_> = results
                .into_iter()
                .filter_map(|r| match r {
                    DeleteResult::Error(e) if !e.code.eq_ignore_ascii_case("NoSuchKey") => Some(e),
                    _ => None,
                })
                .collect();
            if let Some(first) = failed.first() {
                let key = first.object_name.strip_prefix(&inner.prefix).unwrap_or(&first.object_name).to_string();
                let code = first.code.to_ascii_lowercase();
                let err = inner.classifier.classify_response(&MinioErrorResponse::new(
                    Default::default(),
                    minio::s3::minio_error_response::MinioErrorCode::OtherError(code),
                    Some(if failed.len() > 1 {
                        format!("{} (and {} more objects failed)", first.message, failed.len() - 1)
                    } else {
                        first.message.clone()
                    }),
                    String::new(),
                    String::new(),
                    String::new(),
                    None,
                    None,
                ));
                return Err(inner.storage_error("delete", &key, err));
            }
            tracing::debug!(count = batch.len(), store = %inner.describe, "deleted objects");
        }
        Ok(())
    }

    async fn user_metadata(&self, key: &str) -> Result<Vec<(String, String)>> {
        Ok(self.head_details(key).await?.map(|d| d.user_metadata).unwrap_or_default())
    }

    async fn hold(&self, key: &str) -> Result<Option<Hold>> {
        Ok(self.head_details(key).await?.and_then(|d| d.hold))
    }
}

/// Headers as minio takes them; `None` for none.
fn multimap(headers: &[(&'static str, String)]) -> Option<Multimap> {
    if headers.is_empty() {
        return None;
    }
    let mut m = Multimap::new();
    for (k, v) in headers {
        m.add(*k, v.clone());
    }
    Some(m)
}

/// The header of [`KEY_MD5_META`].
fn meta_header() -> &'static str {
    const H: &str = "x-amz-meta-k3s-sse-customer-key-md5";
    debug_assert_eq!(H.strip_prefix("x-amz-meta-"), Some(KEY_MD5_META));
    H
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// State of a streaming download.
struct Download {
    inner: Arc<Inner>,
    key: String,
    object: String,
    etag: Option<String>,
    offset: u64,
    size: u64,
    body: Option<BoxStream<'static, std::io::Result<Bytes>>>,
    resumes: u32,
}

impl Download {
    async fn next(mut self) -> Option<(std::io::Result<Bytes>, Download)> {
        loop {
            let mut body = self.body.take()?;
            let why = match tokio::time::timeout(self.inner.timeout, body.next()).await {
                Ok(Some(Ok(chunk))) => {
                    self.offset += chunk.len() as u64;
                    if self.offset > self.size {
                        return Some((
                            Err(io_other(self.fail(S3Error::Invalid(format!(
                                "the server sent more than the {} bytes it announced",
                                self.size
                            ))))),
                            self,
                        ));
                    }
                    self.body = Some(body);
                    return Some((Ok(chunk), self));
                }
                Ok(None) if self.offset == self.size => return None,
                Ok(None) => S3Error::Network {
                    endpoint: self.inner.classifier.endpoint.clone(),
                    detail: format!("the download ended after {} of {} bytes", self.offset, self.size),
                },
                Ok(Some(Err(e))) => {
                    S3Error::Network { endpoint: self.inner.classifier.endpoint.clone(), detail: innermost_detail(&e) }
                }
                Err(_) => self.inner.timeout_error(),
            };
            drop(body);
            if self.resumes >= DOWNLOAD_RESUMES {
                let e = self.fail(why);
                return Some((Err(io_other(e)), self));
            }
            self.resumes += 1;
            tracing::warn!(key = %self.key, offset = self.offset, error = %why, "download interrupted; resuming");
            match self.inner.open_body(&self.key, &self.object, self.offset, self.etag.as_deref()).await {
                Ok((_, _, b)) => self.body = Some(b),
                Err(e) => {
                    let e = self.fail(e);
                    return Some((Err(io_other(e)), self));
                }
            }
        }
    }

    fn fail(&mut self, e: S3Error) -> Error {
        self.body = None;
        self.inner.storage_error("download", &self.key, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slices_take_consecutive_exact_lengths_across_chunk_boundaries() {
        let chunks: Vec<std::io::Result<Bytes>> = (0u8..10).map(|i| Ok(Bytes::from(vec![i; 7]))).collect();
        let body: ByteStream = stream::iter(chunks).boxed();
        let src = Arc::new(tokio::sync::Mutex::new(Splitter { body, carry: None }));
        let mut all = Vec::new();
        for len in [10u64, 25, 35] {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let got: Vec<Bytes> = slice_of(src.clone(), len, tx).try_collect().await.unwrap();
            let got: Vec<u8> = got.concat();
            assert_eq!(got.len() as u64, len);
            rx.await.expect("fired once the last byte was taken");
            all.extend(got);
        }
        let expected: Vec<u8> = (0u8..10).flat_map(|i| vec![i; 7]).collect();
        assert_eq!(all, expected);
        // A slice longer than what is left fails, and never fires.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let short: std::io::Result<Vec<Bytes>> = slice_of(src.clone(), 1, tx).try_collect().await;
        assert!(short.is_err());
        assert!(rx.await.is_err());
    }

    #[test]
    fn streamed_parts_fit_in_ten_thousand() {
        assert_eq!(StreamLimits::part_for(STREAMED_PART_SIZE, 6 << 30), STREAMED_PART_SIZE);
        let huge = 5u64 << 40;
        let p = StreamLimits::part_for(STREAMED_PART_SIZE, huge);
        assert!(huge.div_ceil(p) <= u64::from(MAX_PARTS), "{p}");
        assert_eq!(p % (1 << 20), 0);
    }

    #[test]
    fn part_sizes_respect_s3_limits() {
        assert_eq!(initial_part_size(None), DEFAULT_PART_SIZE);
        assert_eq!(initial_part_size(Some(100 << 20)), DEFAULT_PART_SIZE);
        let huge = 200u64 << 30;
        let ps = initial_part_size(Some(huge));
        assert!(ps >= MIN_PART_SIZE && huge.div_ceil(ps) <= MAX_PARTS as u64, "{ps}");
        assert_eq!(ps % (1 << 20), 0);
        let mut size = DEFAULT_PART_SIZE;
        let mut total = 0u64;
        for n in 1..=MAX_PARTS {
            total += size;
            size = grown_part_size(size, n);
        }
        assert!(total > 1 << 40, "10,000 growing parts hold more than 1 TiB: {total}");
        assert!(size <= MAX_GROWN_PART_SIZE);
    }

    #[tokio::test]
    async fn parts_split_chunks_at_the_part_size_chunks_at_the_part_size() {
        let chunks: Vec<std::io::Result<Bytes>> = (0..10).map(|i| Ok(Bytes::from(vec![i as u8; 3]))).collect();
        let mut reader = PartReader::new(stream::iter(chunks).boxed());
        let (p1, end1) = reader.read(7).await.unwrap();
        assert_eq!((p1.len(), end1), (7, false));
        let (p2, end2) = reader.read(7).await.unwrap();
        assert_eq!((p2.len(), end2), (7, false));
        let mut all = p1.to_bytes().to_vec();
        all.extend_from_slice(&p2.to_bytes());
        let (p3, end3) = reader.read(100).await.unwrap();
        assert_eq!((p3.len(), end3), (16, true));
        all.extend_from_slice(&p3.to_bytes());
        let expected: Vec<u8> = (0..10u8).flat_map(|i| [i; 3]).collect();
        assert_eq!(all, expected);
    }

    #[tokio::test]
    async fn a_source_error_reaches_the_part_reader() {
        let mut reader = PartReader::new(
            stream::iter(vec![Ok(Bytes::from_static(b"abc")), Err(std::io::Error::other("boom"))]).boxed(),
        );
        assert!(reader.read(10).await.is_err());
    }

    #[tokio::test]
    async fn a_cancelled_part_read_loses_nothing() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<std::io::Result<Bytes>>();
        let body = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) }).boxed();
        let mut reader = PartReader::new(body);
        tx.send(Ok(Bytes::from_static(b"abc"))).unwrap();
        tx.send(Ok(Bytes::from_static(b"def"))).unwrap();
        // The source stalls: the read is cancelled with 6 bytes taken from the body.
        assert!(tokio::time::timeout(Duration::from_millis(20), reader.read(100)).await.is_err());
        tx.send(Ok(Bytes::from_static(b"ghi"))).unwrap();
        drop(tx);
        let (part, ended) = reader.read(100).await.unwrap();
        assert!(ended);
        assert_eq!(part.to_bytes(), Bytes::from_static(b"abcdefghi"));
    }

    #[test]
    fn error_documents_in_200_answers_are_found() {
        let body = Bytes::from_static(
            b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>InternalError</Code><Message>We encountered an internal error</Message></Error>",
        );
        let err = error_in_body(&body, &reqwest::header::HeaderMap::new()).unwrap();
        assert_eq!(err.message().as_deref(), Some("We encountered an internal error"));
        let ok = Bytes::from_static(
            b"<?xml version=\"1.0\"?><CompleteMultipartUploadResult></CompleteMultipartUploadResult>",
        );
        assert!(error_in_body(&ok, &reqwest::header::HeaderMap::new()).is_none());
    }

    #[test]
    fn keys_are_escaped_for_the_delete_document() {
        assert_eq!(xml_escape("a&b<c>'\""), "a&amp;b&lt;c&gt;&apos;&quot;");
    }
}
