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
//!
//! The parts: [`client`] (the minio client and the credentials it signs with), [`retry`] (the one
//! retry helper), [`request`] (plain requests on one object), [`multipart`] (buffered multipart
//! uploads and what every multipart upload shares), [`streamed`] (streamed parts of a body of known
//! length), [`download`] (the resuming GET). Listing and batched deletes are here, in the
//! [`SnapshotStore`] implementation.

mod client;
mod download;
mod multipart;
mod request;
mod retry;
mod streamed;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use minio::s3::builders::ObjectToDelete;
use minio::s3::http::BaseUrl;
use minio::s3::minio_error_response::MinioErrorResponse;
use minio::s3::response::DeleteResult;
use minio::s3::response_traits::HasS3Fields;
use minio::s3::types::{BucketName, Region, S3Api, ToStream};

use k3s_snapshot_core::store::{part_bounds, ByteStream, Hold, ObjectInfo, Part, PutOptions, SnapshotStore};
use k3s_snapshot_core::{Error, Result};

use crate::config::{BucketLookup, S3Config};
use crate::creds_keyring::Keyring;
use crate::error::{innermost_detail, Classifier, S3Error};
use crate::object_lock::{hold_of, ObjectLock};
use crate::sse::CustomerKey;
use crate::stream_put::{PutRequest, StreamPut};

use client::{ca_bundle, check_proxy_env, stream_put_client, ClientParts, Signer};
use download::Download;
use multipart::{initial_part_size, PartReader};
use request::{last_modified, multimap};
use streamed::StreamLimits;

/// Smallest part the S3 API accepts (except the last one).
pub const MIN_PART_SIZE: u64 = 5 << 20;
/// Bodies up to this size go up as one PUT; larger ones as a multipart upload of parts this big.
pub const DEFAULT_PART_SIZE: u64 = 8 << 20;
/// Largest number of parts of a multipart upload.
pub const MAX_PARTS: u16 = 10_000;
/// Keys per `DeleteObjects` request (the S3 limit).
pub const DELETE_BATCH: usize = 1000;
/// Keys per `ListObjectsV2` page.
const LIST_PAGE: u16 = 1000;

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
    /// The version's ETag, which a ranged read pins with `If-Match`.
    pub etag: Option<String>,
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
            etag: header("etag"),
        }))
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
        let (info, whole) = Download::whole(self.inner.clone(), key).await?;
        Ok((info, stream::unfold(whole, Download::next).boxed()))
    }

    async fn get_parts(
        &self,
        key: &str,
        parts: usize,
        min_part: u64,
        min_size: u64,
    ) -> Result<Option<(ObjectInfo, Vec<Part>)>> {
        // The first part is the whole object's GET, read up to its end: its response gives the
        // size and the ETag the other parts are pinned to, and no request is spent on a HEAD.
        let (info, whole) = Download::whole(self.inner.clone(), key).await?;
        let bounds = if info.size < min_size { vec![(0, info.size)] } else { part_bounds(info.size, parts, min_part) };
        let mut out = Vec::with_capacity(bounds.len());
        let (object, etag) = (whole.object.clone(), whole.etag.clone());
        let mut first = Some(whole);
        for (offset, len) in bounds {
            let state = match first.take() {
                Some(w) => Download { size: len, cut: true, ..w },
                None => Download::range(self.inner.clone(), key, &object, etag.clone(), offset, len),
            };
            out.push(Part { offset, len, body: stream::unfold(state, Download::next).boxed() });
        }
        Ok(Some((info, out)))
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

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn keys_are_escaped_for_the_delete_document() {
        assert_eq!(xml_escape("a&b<c>'\""), "a&amp;b&lt;c&gt;&apos;&quot;");
    }
}
