//! Integrity checksums on every upload: CRC32C, which S3 checks against the bytes it received
//! and which a bucket with Object Lock requires on every PUT (rancher #39986: k3s sends none).
//!
//! - Buffered bodies (a small PUT, a part of an upload of unknown size) carry it as a header,
//!   computed before the request: [`of_segments`] and [`headers`].
//! - Streamed bodies, whose bytes are not known when the request starts, carry it as a trailer:
//!   the body goes out `aws-chunked` ([`AwsChunked`]), fixed-size chunks and, after the last one,
//!   `x-amz-checksum-crc32c:<base64>` (`STREAMING-UNSIGNED-PAYLOAD-TRAILER`; the headers are
//!   signed, the payload is not, as before). The checksum is computed as the bytes pass, so the
//!   upload stays one pass over the source with nothing buffered.
//!
//! Multipart uploads declare CRC32C at their initiation and list each part's checksum when they
//! complete, so S3 checks every part and the whole.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use base64::Engine;
use bytes::Bytes;
use futures::Stream;
use minio::s3::segmented_bytes::SegmentedBytes;
use minio::s3::utils::ChecksumAlgorithm;

/// The algorithm, as S3 names it.
pub(crate) const ALGORITHM: ChecksumAlgorithm = ChecksumAlgorithm::CRC32C;
/// The header (or trailer) that carries the value.
pub(crate) const HEADER: &str = "x-amz-checksum-crc32c";
/// Says which checksum the request carries; S3 (and moto) require it, or Content-MD5, on a PUT to a
/// bucket with Object Lock.
pub(crate) const SDK_ALGORITHM: &str = "x-amz-sdk-checksum-algorithm";
/// `x-amz-content-sha256` of a streamed body with a trailing checksum.
pub(crate) const STREAMING_TRAILER: &str = "STREAMING-UNSIGNED-PAYLOAD-TRAILER";
/// Payload bytes per `aws-chunked` chunk (the AWS SDKs' size).
pub(crate) const CHUNK: u64 = 64 << 10;

/// A CRC32C as S3 writes it: the four big-endian bytes in base64.
pub(crate) fn encode(crc: u32) -> String {
    base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes())
}

/// The checksum of a buffered body.
pub(crate) fn of_segments(data: &SegmentedBytes) -> String {
    encode(data.iter().fold(0, |crc, seg| crc32c::crc32c_append(crc, &seg)))
}

/// The headers of a buffered body with checksum `value`.
pub(crate) fn headers(value: &str) -> [(&'static str, String); 2] {
    [(SDK_ALGORITHM, ALGORITHM.as_str().to_string()), (HEADER, value.to_string())]
}

/// The headers that announce a streamed body of `len` bytes with a trailing checksum (besides
/// `x-amz-content-sha256`, which the signer sets). `content-length` is the encoded length.
pub(crate) fn streaming_headers(len: u64) -> [(&'static str, String); 5] {
    [
        ("content-length", encoded_len(len).to_string()),
        ("content-encoding", "aws-chunked".to_string()),
        ("x-amz-decoded-content-length", len.to_string()),
        ("x-amz-trailer", HEADER.to_string()),
        (SDK_ALGORITHM, ALGORITHM.as_str().to_string()),
    ]
}

/// The bytes of one chunk's size line: `<hex size>\r\n`.
fn size_line(size: u64) -> String {
    format!("{size:x}\r\n")
}

/// The end of the body: the empty last chunk, the trailer, the empty line.
fn closing(value: &str) -> String {
    format!("0\r\n{HEADER}:{value}\r\n\r\n")
}

/// What `len` payload bytes take on the wire as [`AwsChunked`] sends them.
pub(crate) fn encoded_len(len: u64) -> u64 {
    let full = len / CHUNK;
    let rest = len % CHUNK;
    let chunk = |size: u64| size_line(size).len() as u64 + size + 2;
    let mut n = full * chunk(CHUNK);
    if rest > 0 {
        n += chunk(rest);
    }
    n + closing(&encode(0)).len() as u64
}

/// A body of exactly `len` bytes (the caller's stream must hold to that; [`crate::stream_put`]'s
/// `ExactBody` fails otherwise) sent as `aws-chunked` with the CRC32C as a trailer. Chunks are cut
/// from the source's buffers without copying. The trailer goes out only after the source ended
/// cleanly; a source error is passed on and ends the body. The value sent is kept in `sent`.
pub(crate) struct AwsChunked<S> {
    inner: S,
    len: u64,
    /// Payload bytes passed on.
    pos: u64,
    /// Payload bytes left in the current chunk.
    left_in_chunk: u64,
    crc: u32,
    out: VecDeque<Bytes>,
    done: bool,
    sent: Arc<OnceLock<String>>,
}

impl<S> AwsChunked<S> {
    pub(crate) fn new(inner: S, len: u64, sent: Arc<OnceLock<String>>) -> Self {
        AwsChunked { inner, len, pos: 0, left_in_chunk: 0, crc: 0, out: VecDeque::new(), done: false, sent }
    }

    /// Frames one buffer of payload.
    fn frame(&mut self, mut b: Bytes) {
        self.crc = crc32c::crc32c_append(self.crc, &b);
        while !b.is_empty() {
            if self.left_in_chunk == 0 {
                // The previous chunk's CRLF and this chunk's size line in one small buffer.
                // More than announced cannot reach here (`ExactBody` fails first); if it did, the
                // chunk still frames what there is and the length check ends the request.
                let size = match CHUNK.min(self.len.saturating_sub(self.pos)) {
                    0 => CHUNK.min(b.len() as u64),
                    n => n,
                };
                let sep = if self.pos > 0 { "\r\n" } else { "" };
                self.out.push_back(Bytes::from(format!("{sep}{}", size_line(size))));
                self.left_in_chunk = size;
            }
            let n = (self.left_in_chunk as usize).min(b.len());
            self.out.push_back(b.split_to(n));
            self.pos += n as u64;
            self.left_in_chunk -= n as u64;
        }
    }

    fn close(&mut self) {
        let value = encode(self.crc);
        let sep = if self.pos > 0 { "\r\n" } else { "" };
        self.out.push_back(Bytes::from(format!("{sep}{}", closing(&value))));
        let _ = self.sent.set(value);
        self.done = true;
    }
}

impl<S, E> Stream for AwsChunked<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    type Item = Result<Bytes, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(b) = this.out.pop_front() {
                return Poll::Ready(Some(Ok(b)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Some(Ok(b))) => this.frame(b),
                Poll::Ready(None) => this.close(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{StreamExt, TryStreamExt};

    async fn encode_all(chunks: Vec<Vec<u8>>) -> (Vec<u8>, String) {
        let len = chunks.iter().map(|c| c.len() as u64).sum();
        let src = futures::stream::iter(chunks.into_iter().map(|c| Ok::<_, std::io::Error>(Bytes::from(c))));
        let sent = Arc::new(OnceLock::new());
        let body: Vec<Bytes> = AwsChunked::new(src, len, sent.clone()).try_collect().await.unwrap();
        (body.concat(), sent.get().cloned().unwrap())
    }

    /// Decodes an aws-chunked body: payload and trailer lines.
    fn decode(mut wire: &[u8]) -> (Vec<u8>, Vec<String>, Vec<usize>) {
        let (mut payload, mut sizes) = (Vec::new(), Vec::new());
        loop {
            let eol = wire.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(std::str::from_utf8(&wire[..eol]).unwrap(), 16).unwrap();
            wire = &wire[eol + 2..];
            if size == 0 {
                break;
            }
            sizes.push(size);
            payload.extend_from_slice(&wire[..size]);
            assert_eq!(&wire[size..size + 2], b"\r\n");
            wire = &wire[size + 2..];
        }
        let text = std::str::from_utf8(wire).unwrap();
        assert!(text.ends_with("\r\n\r\n"), "{text:?}");
        (payload, text.trim_end().split("\r\n").map(str::to_string).collect(), sizes)
    }

    #[test]
    fn crc32c_is_sent_as_s3_writes_it() {
        // The check value of CRC-32C (RFC 3720): "123456789" → 0xE3069283.
        assert_eq!(encode(crc32c::crc32c(b"123456789")), "4waSgw==");
        let mut seg = SegmentedBytes::new();
        seg.append(Bytes::from_static(b"12345"));
        seg.append(Bytes::from_static(b"6789"));
        assert_eq!(of_segments(&seg), "4waSgw==");
    }

    #[tokio::test]
    async fn chunks_have_the_fixed_size_whatever_the_source_buffers() {
        let data: Vec<u8> = (0..(2 * CHUNK + 1000)).map(|i| (i % 251) as u8).collect();
        // Uneven source buffers, one of them spanning a chunk boundary, one empty.
        let cuts = [0usize, 10, 70_000, 70_000, 131_000, data.len()];
        let chunks: Vec<Vec<u8>> = cuts.windows(2).map(|w| data[w[0]..w[1]].to_vec()).collect();
        let (wire, sent) = encode_all(chunks).await;
        assert_eq!(wire.len() as u64, encoded_len(data.len() as u64));
        let (payload, trailer, sizes) = decode(&wire);
        assert_eq!(payload, data);
        assert_eq!(sizes, vec![CHUNK as usize, CHUNK as usize, 1000]);
        let crc = encode(crc32c::crc32c(&data));
        assert_eq!(trailer, vec![format!("{HEADER}:{crc}")]);
        assert_eq!(sent, crc);
    }

    #[tokio::test]
    async fn an_empty_body_is_only_the_trailer() {
        let (wire, sent) = encode_all(vec![]).await;
        assert_eq!(wire.len() as u64, encoded_len(0));
        assert_eq!(String::from_utf8(wire).unwrap(), format!("0\r\n{HEADER}:AAAAAA==\r\n\r\n"));
        assert_eq!(sent, "AAAAAA==");
        let (wire, _) = encode_all(vec![vec![7; CHUNK as usize]]).await;
        assert_eq!(wire.len() as u64, encoded_len(CHUNK));
    }

    #[tokio::test]
    async fn a_source_error_ends_the_body_without_a_trailer() {
        let src = futures::stream::iter(vec![Ok(Bytes::from_static(b"abc")), Err(std::io::Error::other("boom"))]);
        let sent = Arc::new(OnceLock::new());
        let items: Vec<_> = AwsChunked::new(src, 10, sent.clone()).collect().await;
        assert!(items.last().unwrap().is_err());
        assert!(items.iter().flatten().all(|b| !String::from_utf8_lossy(b).contains(HEADER)));
        assert!(sent.get().is_none());
    }
}
