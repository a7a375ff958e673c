//! Streaming downloads: the GET of an object's body, resumed from where it broke with a ranged
//! GET pinned to the ETag, and a body that stalls given up after the timeout.

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use minio::s3::response_traits::HasS3Fields;
use minio::s3::types::S3Api;

use k3s_snapshot_core::store::ObjectInfo;
use k3s_snapshot_core::{Error, Result};

use crate::error::{innermost_detail, S3Error};
use crate::sse::{self};

use super::request::{io_other, last_modified, meta_header, multimap};
use super::Inner;

/// Times a download resumes after its connection broke.
const DOWNLOAD_RESUMES: u32 = 3;

impl Inner {
    /// The GET request of a download, from `offset` (to `end`, exclusive, for a range), pinned to
    /// `etag` when resuming or fetching ranges.
    pub(super) async fn open_body(
        &self,
        key: &str,
        object: &str,
        offset: u64,
        end: Option<u64>,
        etag: Option<&str>,
    ) -> Result<(ObjectInfo, Option<String>, BoxStream<'static, std::io::Result<Bytes>>), S3Error> {
        let pinned = etag;
        let key_headers = multimap(&self.key_headers());
        let resp = self
            .call("download", key, || async {
                self.client()
                    .get_object(self.bucket.as_str(), object)
                    .map_err(|e| self.classifier.classify(e.into()))?
                    .offset((offset > 0 || end.is_some()).then_some(offset))
                    .length(end.map(|e| e.saturating_sub(offset)))
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
        // Some servers ignore If-Match (s3s-fs): the version is compared here too, so a replaced
        // object never has its bytes mixed with the old one's.
        if let (Some(pinned), Some(now)) = (pinned, etag.as_deref()) {
            if pinned != now {
                return Err(S3Error::Invalid(format!(
                    "the object changed during the download (ETag {pinned} became {now}); download it again"
                )));
            }
        }
        let (body, len) = resp.into_boxed_stream().map_err(|e| self.classifier.classify(e))?;
        let info = ObjectInfo { key: key.to_string(), size: offset + len, modified };
        Ok((info, etag, body.boxed()))
    }
}

/// State of a streaming download.
pub(super) struct Download {
    pub(super) inner: Arc<Inner>,
    pub(super) key: String,
    pub(super) object: String,
    pub(super) etag: Option<String>,
    pub(super) offset: u64,
    pub(super) size: u64,
    pub(super) body: Option<BoxStream<'static, std::io::Result<Bytes>>>,
    pub(super) resumes: u32,
    /// A byte range (`offset..size`) opened on the first read, rather than a whole object
    /// already opened by `get`.
    pub(super) range: bool,
    /// The body runs past `size` (the whole object's GET serving as its first part): it is cut
    /// there, rather than refused for sending more.
    pub(super) cut: bool,
}

impl Download {
    /// The whole object's GET, sent now: its size, and the download that reads it.
    pub(super) async fn whole(inner: Arc<Inner>, key: &str) -> Result<(ObjectInfo, Download)> {
        let object = inner.object_name(key)?;
        let (info, etag, body) = match inner.open_body(key, &object, 0, None, None).await {
            Ok(v) => v,
            Err(S3Error::NoSuchKey { .. }) => {
                return Err(Error::NotFound { name: key.to_string(), location: inner.describe.clone() })
            }
            Err(e) => return Err(inner.storage_error("download", key, e)),
        };
        let size = info.size;
        let d = Download {
            inner,
            key: key.to_string(),
            object,
            etag,
            offset: 0,
            size,
            body: Some(body),
            resumes: 0,
            range: false,
            cut: false,
        };
        Ok((info, d))
    }

    /// The bytes `offset..offset + len` of the object version `etag`, as a stream that sends its
    /// request when first read, and resumes like a whole download.
    pub(super) fn range(
        inner: Arc<Inner>,
        key: &str,
        object: &str,
        etag: Option<String>,
        offset: u64,
        len: u64,
    ) -> Self {
        Download {
            inner,
            key: key.to_string(),
            object: object.to_string(),
            etag,
            offset,
            size: offset + len,
            body: None,
            resumes: 0,
            range: true,
            cut: false,
        }
    }
}

impl Download {
    pub(super) async fn next(mut self) -> Option<(std::io::Result<Bytes>, Download)> {
        if self.range && self.body.is_none() && self.offset < self.size && self.resumes == 0 {
            self.range = false;
            match self
                .inner
                .open_body(&self.key, &self.object, self.offset, Some(self.size), self.etag.as_deref())
                .await
            {
                Ok((_, _, b)) => self.body = Some(b),
                Err(e) => {
                    let e = self.fail(e);
                    return Some((Err(io_other(e)), self));
                }
            }
        }
        loop {
            let mut body = self.body.take()?;
            let why = match tokio::time::timeout(self.inner.timeout, body.next()).await {
                Ok(Some(Ok(mut chunk))) => {
                    if self.cut && self.offset + chunk.len() as u64 >= self.size {
                        // The part ends here; the rest of the body is another part's.
                        chunk.truncate((self.size - self.offset) as usize);
                        self.offset = self.size;
                        return Some((Ok(chunk), self));
                    }
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
            let end = Some(self.size);
            match self.inner.open_body(&self.key, &self.object, self.offset, end, self.etag.as_deref()).await {
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
