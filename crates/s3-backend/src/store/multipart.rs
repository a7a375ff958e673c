//! Multipart uploads: initiation, parts, completion (with its error in a 200 answer) and abort,
//! the guard that aborts an upload its `put` dropped, and the buffered upload of a body whose
//! size is unknown or below the streamed limit, its parts cut by [`PartReader`].

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::StreamExt;
use minio::s3::builders::UploadPart;
use minio::s3::minio_error_response::MinioErrorResponse;
use minio::s3::response_traits::{HasEtagFromHeaders, HasS3Fields};
use minio::s3::segmented_bytes::SegmentedBytes;
use minio::s3::types::{BucketName, ObjectKey, PartInfo, S3Api};
use tokio::task::JoinSet;

use k3s_snapshot_core::store::{ByteStream, PutOptions};
use k3s_snapshot_core::Result;

use crate::checksum;
use crate::error::{innermost_detail, is_no_such_upload, S3Error};

use super::request::multimap;
use super::{Inner, S3Store};
use super::{DEFAULT_PART_SIZE, MAX_PARTS};

/// Largest part we buffer when the size is unknown and the upload keeps growing.
const MAX_GROWN_PART_SIZE: u64 = 512 << 20;
/// Parts uploading at the same time while the next one is read from the body.
pub(super) const PARTS_IN_FLIGHT: usize = 2;

impl Inner {
    pub(super) async fn start_multipart(&self, key: &str, object: &str, opts: &PutOptions) -> Result<String, S3Error> {
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

    pub(super) async fn upload_part(
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
    pub(super) async fn complete_multipart(
        &self,
        key: &str,
        object: &str,
        upload_id: &str,
        parts: Vec<PartInfo>,
        total: u64,
    ) -> Result<(), S3Error> {
        let mut tries = 0u32;
        let key_headers = multimap(&self.key_headers());
        let (started, n) = (std::time::Instant::now(), parts.len());
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
        // The server may assemble the parts before it answers (s3s-fs copies them into one
        // file): how long that took is the part of an upload no client can overlap.
        tracing::info!(key, parts = n, secs = format!("{:.2}", started.elapsed().as_secs_f64()), store = %self.describe, "completed the multipart upload");
        Ok(())
    }

    pub(super) async fn abort_multipart(&self, key: &str, object: &str, upload_id: &str) {
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
pub(super) struct AbortOnDrop {
    inner: Arc<Inner>,
    key: String,
    object: String,
    upload_id: String,
    armed: bool,
}

impl AbortOnDrop {
    pub(super) fn armed(inner: &Arc<Inner>, key: &str, object: &str, upload_id: &str) -> Self {
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
pub(super) struct PartReader {
    body: ByteStream,
    /// The part being filled; kept here so that [`PartReader::read`] is cancel-safe.
    pending: SegmentedBytes,
    /// What was read beyond the last part.
    carry: Option<Bytes>,
}

impl PartReader {
    pub(super) fn new(body: ByteStream) -> Self {
        PartReader { body, pending: SegmentedBytes::new(), carry: None }
    }

    /// Reads up to `size` bytes into one part. `Ok((part, true))` when the body ended.
    /// Cancel-safe: if the future is dropped, the bytes read so far stay for the next call.
    pub(super) async fn read(&mut self, size: u64) -> std::io::Result<(SegmentedBytes, bool)> {
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
pub(super) fn initial_part_size(size_hint: Option<u64>) -> u64 {
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
    pub(super) async fn put_multipart(
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

/// The end of a multipart upload: kept when `res` is ok; otherwise the part uploads still running
/// are stopped (and waited for, so that none lands after the abort), then the upload is aborted
/// so that its parts are dropped.
pub(super) async fn settle<T>(
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

pub(super) fn joined(
    done: Option<std::result::Result<Result<PartInfo, S3Error>, tokio::task::JoinError>>,
) -> Result<PartInfo, S3Error> {
    match done {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(S3Error::Invalid(format!("part upload task failed: {e}"))),
        None => Err(S3Error::Invalid("no part upload in flight".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MIN_PART_SIZE;
    use futures::stream;
    use std::time::Duration;
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
}
