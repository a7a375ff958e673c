//! Streamed multipart uploads ([`StreamLimits`]): a body of known length above the single-PUT
//! limit goes up in parts that stream as the single PUT does, sliced from the one body
//! ([`slice_of`]) or taken from its byte ranges; nothing is buffered.

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{self, StreamExt};
use minio::s3::types::PartInfo;
use tokio::task::JoinSet;

use k3s_snapshot_core::store::{ByteStream, PutOptions};
use k3s_snapshot_core::Result;

use crate::checksum;
use crate::error::{innermost_detail, S3Error};
use crate::stream_put::{PutRequest, MAX_SINGLE_PUT};

use super::multipart::{joined, settle, AbortOnDrop, PARTS_IN_FLIGHT};
use super::{Inner, S3Store};
use super::{MAX_PARTS, MIN_PART_SIZE};

/// Above `single_put` bytes (S3's limit for one PUT) a body of known length goes up as a
/// multipart upload whose parts stream like the single PUT: nothing is buffered. When the caller
/// gives the body's byte ranges ([`Ranges`](k3s_snapshot_core::store::Ranges): a save's file as it is written), up to
/// [`STREAMED_PARTS_IN_FLIGHT`] parts go up at once, each starting once its first bytes are
/// there. Otherwise each part is a consecutive slice of the one body, and the next part's request
/// starts as soon as the previous one has taken its last byte, while that one awaits its answer.
#[derive(Debug, Clone, Copy)]
pub(super) struct StreamLimits {
    pub(super) single_put: u64,
    pub(super) part: u64,
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
    pub(super) fn of(configured: Option<(u64, u64)>) -> StreamLimits {
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

impl Inner {
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
}

impl S3Store {
    /// [`StreamLimits`]: a multipart upload of streamed parts, two in flight, for a body of exactly
    /// `len` bytes. Returns the number of parts. Any failure aborts the upload.
    pub(super) async fn put_streamed_parts(
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures::stream::TryStreamExt;
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
}
