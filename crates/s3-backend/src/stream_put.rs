//! One PUT request whose body streams from the caller, for bodies whose length is known before
//! the first byte (etcd announces a snapshot's size in its first message; a file has a length).
//!
//! minio 0.4 holds every request body in memory and hashes it before signing, so this request is
//! built from minio's public pieces (URL builder, header canonicalisation, dates, credentials)
//! and signed here with SigV4 over `STREAMING-UNSIGNED-PAYLOAD-TRAILER`: the headers are signed,
//! the body is not hashed up front; it goes out `aws-chunked` with a CRC32C trailer that S3
//! checks against what it received ([`crate::checksum`]). It goes out through its own `reqwest`
//! client set up like minio's (same CA file, same skip-verify choice, environment proxies).
//!
//! Why one request instead of a multipart upload: nothing is buffered but the chunks in flight,
//! and the server stores the object once. A multipart upload makes S3 servers that assemble
//! parts on completion (s3s-fs among them) read and write every byte a second time.
//!
//! What it cannot do is retry: the body is consumed as it goes. Callers that can produce the
//! body again (a file) retry around it; see `k3s_snapshot_core::transfer::upload_file`.
//!
//! Atomicity: S3 stores an object only when a PUT's whole body arrived. [`ExactBody`] makes sure
//! a body that errs, ends early or runs long never lets the last byte go out: the final chunk is
//! held back until the source has ended, so a failure aborts the request before it completes.
//!
//! The body belongs to the HTTP connection's task, which outlives this request's future when the
//! network is cut (until TCP gives up, minutes later). The caller's source therefore sits in a
//! shared slot that [`StreamPut::put`] empties when it returns or is dropped: the source (etcd's
//! tee, a file) is released at once, and the connection's next poll of the body fails.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use hmac::{Hmac, Mac};
use minio::s3::http::BaseUrl;
use minio::s3::minio_error_response::MinioErrorResponse;
use minio::s3::multimap_ext::{Multimap, MultimapExt};
use minio::s3::types::{BucketName, ObjectKey};
use minio::s3::utils::{sha256_hash, to_amz_date, to_signer_date, utc_now};
use sha2::Sha256;
use tokio::time::Instant;

use k3s_snapshot_core::store::ByteStream;

use crate::checksum::{self, AwsChunked};
use crate::creds_source::Key;
use crate::error::{innermost_detail, Classifier, S3Error};

/// The largest object S3 accepts in one PUT.
pub const MAX_SINGLE_PUT: u64 = 5 << 30;

/// What a streamed PUT needs besides the body and the credentials: where, and how to reach it.
pub(crate) struct StreamPut {
    pub base: BaseUrl,
    pub http: reqwest::Client,
}

/// One streamed PUT.
pub(crate) struct PutRequest<'a> {
    pub bucket: &'a str,
    pub object: &'a str,
    pub len: u64,
    pub content_type: &'a str,
    pub user_metadata: &'a [(String, String)],
    /// More headers, signed with the rest (server-side encryption, customer key, object lock).
    pub extra_headers: &'a [(&'static str, String)],
    /// Query parameters, signed (`partNumber` and `uploadId` for a part of a multipart upload).
    pub query: &'a [(&'static str, String)],
    /// No progress (no body chunk taken, or no answer after the body) for this long fails it.
    pub stall_timeout: Duration,
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("hmac accepts any key"));
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

/// What a streamed PUT answered: the ETag and the checksum S3 checked the body against.
#[derive(Debug)]
pub(crate) struct PutAnswer {
    pub etag: Option<String>,
    /// The CRC32C sent as the trailer (base64).
    pub checksum: String,
}

/// The headers of a streamed PUT, every one of which is signed: the body's length (encoded and
/// decoded) and type, the trailing checksum announced, the user metadata, the extra headers.
fn request_headers(req: &PutRequest<'_>, host: String, date: chrono::DateTime<chrono::Utc>) -> Multimap {
    let mut headers = Multimap::new();
    headers.add("host", host);
    headers.add("content-type", req.content_type);
    for (k, v) in checksum::streaming_headers(req.len) {
        headers.add(k, v);
    }
    headers.add("x-amz-content-sha256", checksum::STREAMING_TRAILER);
    headers.add("x-amz-date", to_amz_date(date));
    for (k, v) in req.user_metadata {
        headers.add(format!("x-amz-meta-{}", k.to_ascii_lowercase()), v.clone());
    }
    for (k, v) in req.extra_headers {
        headers.add(*k, v.clone());
    }
    headers
}

impl StreamPut {
    /// Sends `body` (exactly `req.len` bytes) to `bucket/object` as one request, signed with
    /// `creds` (their session token, if any, goes in `x-amz-security-token`), or anonymous.
    /// Returns the ETag the server answered with, if any, and the checksum it checked.
    pub async fn put(
        &self,
        classifier: &Classifier,
        creds: Option<&Key>,
        req: PutRequest<'_>,
        body: ByteStream,
    ) -> Result<PutAnswer, S3Error> {
        let bucket = BucketName::new(req.bucket).map_err(|e| classifier.classify(e.into()))?;
        let object = ObjectKey::new(req.object).map_err(|e| classifier.classify(e.into()))?;
        let mut query = Multimap::new();
        for (k, v) in req.query {
            query.add(*k, v.clone());
        }
        let region = &self.base.region;
        let url = self
            .base
            .build_url(&reqwest::Method::PUT, region, &query, Some(&bucket), Some(&object))
            .map_err(|e| classifier.classify(e.into()))?;

        let date = utc_now();
        let mut headers = request_headers(&req, url.host_header_value(), date);
        let mut authorization = None;
        if let Some(creds) = creds {
            if let Some(token) = &creds.session_token {
                headers.add("x-amz-security-token", token);
            }
            let (signed, canonical) = headers.get_canonical_headers();
            let canonical_request = format!(
                "PUT\n{}\n{}\n{canonical}\n\n{signed}\n{}",
                url.path,
                query.get_canonical_query_string(),
                checksum::STREAMING_TRAILER
            );
            let day = to_signer_date(date);
            let scope = format!("{day}/{}/s3/aws4_request", region.as_str());
            let to_sign = format!(
                "AWS4-HMAC-SHA256\n{}\n{scope}\n{}",
                to_amz_date(date),
                sha256_hash(canonical_request.as_bytes())
            );
            let mut key = hmac_sha256(format!("AWS4{}", creds.secret_key).as_bytes(), day.as_bytes());
            for part in [region.as_str().as_bytes(), b"s3", b"aws4_request"] {
                key = hmac_sha256(&key, part);
            }
            let signature = hex::encode(hmac_sha256(&key, to_sign.as_bytes()));
            authorization = Some(format!(
                "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={signature}",
                creds.access_key
            ));
        }

        let progress = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let source = Source(Arc::new(Mutex::new(Some(body))));
        let sent = Arc::new(OnceLock::new());
        let body = AwsChunked::new(
            ExactBody::new(source.0.clone(), req.len, progress.clone(), started),
            req.len,
            sent.clone(),
        );
        let mut request = self.http.put(url.to_string());
        if let Some(a) = authorization {
            request = request.header("authorization", a);
        }
        for (k, vs) in headers.iter_all() {
            for v in vs {
                request = request.header(k.as_str(), v.as_str());
            }
        }
        let send = request.body(reqwest::Body::wrap_stream(body)).send();
        tokio::pin!(send);
        // Stalled, not slow: the deadline moves on whenever the server takes another chunk.
        let resp = loop {
            let last = started + Duration::from_millis(progress.load(Ordering::Relaxed));
            tokio::select! {
                r = &mut send => break r,
                _ = tokio::time::sleep_until(last + req.stall_timeout) => {
                    let now = started + Duration::from_millis(progress.load(Ordering::Relaxed));
                    if now == last {
                        return Err(S3Error::Timeout { endpoint: classifier.endpoint.clone(), timeout: req.stall_timeout });
                    }
                }
            }
        };
        let resp = resp.map_err(|e| match source_error(&e) {
            Some(detail) => S3Error::Source(detail),
            None => classifier.classify_reqwest(&e),
        })?;
        let status = resp.status();
        if status.is_success() {
            let etag =
                resp.headers().get("etag").and_then(|v| v.to_str().ok()).map(|v| v.trim_matches('"').to_string());
            // The trailer went out before the server could answer.
            let checksum = sent
                .get()
                .cloned()
                .ok_or_else(|| S3Error::Invalid("the server answered before the upload's checksum was sent".into()))?;
            return Ok(PutAnswer { etag, checksum });
        }
        let headers = resp.headers().clone();
        let text = resp.bytes().await.unwrap_or_default();
        Err(match MinioErrorResponse::new_from_body(text, headers) {
            Ok(doc) => classifier.classify_response(&doc),
            Err(_) => classifier.classify_status(status.as_u16()),
        })
    }
}

/// The caller's body, shared with the connection's task; emptied when the request is over.
type SourceSlot = Arc<Mutex<Option<ByteStream>>>;

/// Empties the slot when dropped, i.e. whenever [`StreamPut::put`] returns or is dropped.
struct Source(SourceSlot);

impl Drop for Source {
    fn drop(&mut self) {
        let taken = self.0.lock().map(|mut s| s.take()).unwrap_or_default();
        drop(taken);
    }
}

/// The message of our own body's failure, when that is what ended the request.
fn source_error(e: &reqwest::Error) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(b) = err.downcast_ref::<BodyError>() {
            return Some(b.0.clone());
        }
        cur = err.source();
    }
    None
}

/// Why the body stream stopped short of a whole object.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BodyError(String);

/// The caller's stream, made to yield exactly `len` bytes or fail: the chunk that completes the
/// length is only passed on once the source has ended, so neither a source error after it nor
/// extra bytes can slip past a completed request. Records when the last chunk was taken.
struct ExactBody {
    src: SourceSlot,
    len: u64,
    seen: u64,
    held: Option<Bytes>,
    done: bool,
    progress: Arc<AtomicU64>,
    started: Instant,
}

impl ExactBody {
    fn new(src: SourceSlot, len: u64, progress: Arc<AtomicU64>, started: Instant) -> Self {
        ExactBody { src, len, seen: 0, held: None, done: false, progress, started }
    }

    fn fail(&mut self, msg: String) -> Poll<Option<Result<Bytes, BodyError>>> {
        self.done = true;
        self.held = None;
        Poll::Ready(Some(Err(BodyError(msg))))
    }
}

impl Stream for ExactBody {
    type Item = Result<Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let this = &mut *self;
        this.progress.store(this.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        let slot = this.src.clone();
        let Ok(mut guard) = slot.lock() else {
            return this.fail("the upload's source is unusable".into());
        };
        let Some(src) = guard.as_mut() else {
            return this.fail("the upload was given up".into());
        };
        loop {
            match src.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return this.fail(innermost_detail(&e)),
                Poll::Ready(Some(Ok(b))) if b.is_empty() => continue,
                Poll::Ready(Some(Ok(b))) => {
                    if this.held.is_some() {
                        let len = this.len;
                        return this.fail(format!("the data is longer than the {len} bytes announced"));
                    }
                    this.seen += b.len() as u64;
                    if this.seen > this.len {
                        let (seen, len) = (this.seen, this.len);
                        return this.fail(format!("the data is longer ({seen}+ bytes) than the {len} announced"));
                    }
                    if this.seen < this.len {
                        return Poll::Ready(Some(Ok(b)));
                    }
                    this.held = Some(b);
                }
                Poll::Ready(None) => {
                    if this.seen < this.len {
                        let (seen, len) = (this.seen, this.len);
                        return this.fail(format!("the data ended after {seen} of the {len} bytes announced"));
                    }
                    this.done = true;
                    return Poll::Ready(this.held.take().map(Ok));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;

    fn body(chunks: Vec<std::io::Result<&'static [u8]>>) -> ByteStream {
        futures::stream::iter(chunks.into_iter().map(|c| c.map(Bytes::from_static))).boxed()
    }

    fn slot(src: ByteStream) -> SourceSlot {
        Arc::new(Mutex::new(Some(src)))
    }

    async fn drain(src: ByteStream, len: u64) -> Result<Vec<u8>, String> {
        let b = ExactBody::new(slot(src), len, Arc::new(AtomicU64::new(0)), Instant::now());
        b.map_ok(|c| c.to_vec()).try_concat().await.map_err(|e| e.to_string())
    }

    #[test]
    fn server_side_encryption_headers_are_signed() {
        let sse = crate::ServerSideEncryption::Kms { key_id: Some("alias/backups".into()) }.headers();
        let meta = vec![("k3s-node-name".to_string(), "n1".to_string())];
        let req = PutRequest {
            bucket: "b",
            object: "o",
            len: 5,
            content_type: "application/octet-stream",
            user_metadata: &meta,
            extra_headers: &sse,
            query: &[],
            stall_timeout: Duration::from_secs(1),
        };
        let headers = request_headers(&req, "127.0.0.1:9000".into(), utc_now());
        let (signed, canonical) = headers.get_canonical_headers();
        let signed: Vec<&str> = signed.split(';').collect();
        for h in
            ["x-amz-server-side-encryption", "x-amz-server-side-encryption-aws-kms-key-id", "x-amz-meta-k3s-node-name"]
        {
            assert!(signed.contains(&h), "{h} is not signed: {signed:?}");
        }
        assert!(canonical.contains("x-amz-server-side-encryption:aws:kms"), "{canonical}");
        assert!(canonical.contains("x-amz-server-side-encryption-aws-kms-key-id:alias/backups"), "{canonical}");
    }

    #[tokio::test]
    async fn exact_body_passes_exactly_the_announced_bytes() {
        let got = drain(body(vec![Ok(b"abc"), Ok(b""), Ok(b"de")]), 5).await.unwrap();
        assert_eq!(got, b"abcde");
        assert_eq!(drain(body(vec![]), 0).await.unwrap(), b"");
    }

    #[tokio::test]
    async fn exact_body_fails_short_long_and_broken_sources() {
        let e = drain(body(vec![Ok(b"abc")]), 5).await.unwrap_err();
        assert!(e.contains("ended after 3 of the 5 bytes"), "{e}");
        let e = drain(body(vec![Ok(b"abc"), Ok(b"def")]), 5).await.unwrap_err();
        assert!(e.contains("longer"), "{e}");
        let e = drain(body(vec![Ok(b"abcde"), Ok(b"f")]), 5).await.unwrap_err();
        assert!(e.contains("longer"), "{e}");
        let e = drain(body(vec![Ok(b"ab"), Err(std::io::Error::other("etcd went away"))]), 5).await.unwrap_err();
        assert!(e.contains("etcd went away"), "{e}");
    }

    #[tokio::test]
    async fn the_last_chunk_waits_for_the_end_of_the_source() {
        // A source error after the last byte must still fail the body, not complete it.
        let src = body(vec![Ok(b"abcde"), Err(std::io::Error::other("trailer mismatch"))]);
        let mut b = ExactBody::new(slot(src), 5, Arc::new(AtomicU64::new(0)), Instant::now());
        let first = b.next().await.unwrap();
        assert!(first.is_err(), "the complete chunk was released before the source ended");
    }

    #[tokio::test]
    async fn giving_up_releases_the_source_even_while_the_body_lives() {
        // The source's end is observable: a channel whose sender sees the receiver go.
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(1);
        let src = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) }).boxed();
        let source = Source(slot(src));
        let mut body = ExactBody::new(source.0.clone(), 10, Arc::new(AtomicU64::new(0)), Instant::now());
        tx.send(Ok(Bytes::from_static(b"abc"))).await.unwrap();
        assert_eq!(body.next().await.unwrap().unwrap(), Bytes::from_static(b"abc"));
        drop(source); // the request gave up; `body` is still held (by a stuck connection)
        assert!(tx.is_closed(), "the source is still held");
        let e = body.next().await.unwrap().unwrap_err().to_string();
        assert!(e.contains("given up"), "{e}");
    }
}
