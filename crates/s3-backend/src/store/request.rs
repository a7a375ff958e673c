//! Plain requests on one object and what every request carries: object names under the folder,
//! the headers of a write (encryption, customer key, object lock) and of a read, user metadata,
//! the single PUT and the HEAD of a size; and the errors they turn into.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use minio::s3::builders::{PutObject, UploadPart};
use minio::s3::client::MinioClient;
use minio::s3::multimap_ext::{Multimap, MultimapExt};
use minio::s3::segmented_bytes::SegmentedBytes;
use minio::s3::types::{BucketName, ObjectKey, S3Api};

use k3s_snapshot_core::metadata::METADATA_DIR;
use k3s_snapshot_core::name;
use k3s_snapshot_core::store::PutOptions;
use k3s_snapshot_core::{Error, Result};

use crate::checksum;
use crate::error::S3Error;
use crate::sse::KEY_MD5_META;

use super::Inner;

pub(super) fn last_modified(headers: &reqwest::header::HeaderMap) -> Option<DateTime<Utc>> {
    let v = headers.get("last-modified")?.to_str().ok()?;
    DateTime::parse_from_rfc2822(v).ok().map(|d| d.with_timezone(&Utc))
}

pub(super) fn io_other(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> std::io::Error {
    std::io::Error::other(e)
}
impl Inner {
    /// The client signing with the current credentials; [`Inner::call`] refreshes it first.
    pub(super) fn client(&self) -> MinioClient {
        self.signer.client()
    }

    pub(super) fn storage_error(&self, op: &'static str, key: &str, mut e: S3Error) -> Error {
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
    pub(super) fn object_name(&self, key: &str) -> Result<String> {
        match key.strip_prefix(METADATA_DIR).and_then(|r| r.strip_prefix('/')) {
            Some(file) => name::validate_file_name(file)?,
            None => name::validate_file_name(key)?,
        }
        Ok(format!("{}{key}", self.prefix))
    }

    pub(super) fn user_metadata(opts: &PutOptions) -> Option<Multimap> {
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
    pub(super) fn object_headers(&self) -> Vec<(&'static str, String)> {
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
    pub(super) fn key_headers(&self) -> Vec<(&'static str, String)> {
        self.customer_key.iter().flat_map(|k| k.headers()).collect()
    }

    /// A read that S3 refused as it refuses one of an SSE-C object without its key (400 with no
    /// error document on a HEAD, `InvalidRequest` on a GET), said as such when no key was given.
    pub(super) fn explain_read_refusal(&self, e: S3Error) -> S3Error {
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

    pub(super) fn content_type(opts: &PutOptions) -> String {
        if opts.content_type.is_empty() {
            "application/octet-stream".into()
        } else {
            opts.content_type.clone()
        }
    }

    pub(super) async fn put_single(
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

    pub(super) async fn stat_size(&self, key: &str, object: &str) -> Result<Option<u64>, S3Error> {
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
}

/// Headers as minio takes them; `None` for none.
pub(super) fn multimap(headers: &[(&'static str, String)]) -> Option<Multimap> {
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
pub(super) fn meta_header() -> &'static str {
    const H: &str = "x-amz-meta-k3s-sse-customer-key-md5";
    debug_assert_eq!(H.strip_prefix("x-amz-meta-"), Some(KEY_MD5_META));
    H
}
