//! [`S3Error`]: what went wrong talking to S3, with a typed retry classification.
//!
//! Every `minio` error is turned into one of these by [`Classifier::classify`], from typed data
//! only: the S3 error code of the response (`NoSuchBucket`, `SlowDown`, ...), the HTTP status when
//! there is no body, and the `reqwest`/`std::io`/`rustls` error types in the source chain. Messages
//! are never parsed. The store then wraps an `S3Error` into the core
//! [`k3s_snapshot_core::Error::Storage`], whose `retryable` flag is [`S3Error::is_retryable`].

use std::time::Duration;

use minio::s3::error::{Error as MinioError, NetworkError, S3ServerError, ValidationErr};
use minio::s3::minio_error_response::{MinioErrorCode, MinioErrorResponse};

use crate::duration::format_duration;

/// One S3 failure, already reduced to what a user needs: the cause and what to do.
/// Never carries credentials: nothing here is built from the request's headers.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("bucket {bucket} does not exist at endpoint {endpoint}; create it or fix --etcd-s3-bucket")]
    NoSuchBucket { bucket: String, endpoint: String },

    #[error("object {key} does not exist in bucket {bucket}")]
    NoSuchKey { bucket: String, key: String },

    #[error("access denied by {endpoint} for bucket {bucket} ({code}) to {}", access_denied_advice(credentials.as_deref()))]
    AccessDenied {
        endpoint: String,
        bucket: String,
        code: String,
        /// Whose credentials were refused, or which sources were tried when none were found
        /// (filled in by the store: `Keyring::describe`).
        credentials: Option<String>,
    },

    #[error("bucket {bucket} is not in region {region} at {endpoint} ({code}{}); fix --etcd-s3-region", hint.as_deref().map(|r| format!(", the bucket is in {r}")).unwrap_or_default())]
    WrongRegion { endpoint: String, bucket: String, region: String, code: String, hint: Option<String> },

    #[error("s3 endpoint {endpoint} did not answer within {} (--etcd-s3-timeout)", format_duration(*.timeout))]
    Timeout { endpoint: String, timeout: Duration },

    #[error("the upload to s3 endpoint {endpoint} did not finish within {} (--etcd-s3-timeout bounds a whole upload, as in k3s); raise --etcd-s3-timeout for large snapshots or a slow link", format_duration(*.timeout))]
    UploadDeadline { endpoint: String, timeout: Duration },

    #[error("cannot connect to s3 endpoint {endpoint}: {detail}; check --etcd-s3-endpoint and that the s3 server is running")]
    Unreachable { endpoint: String, detail: String },

    #[error(
        "tls with s3 endpoint {endpoint} failed: {detail}; pass --etcd-s3-endpoint-ca or --etcd-s3-skip-ssl-verify"
    )]
    Certificate { endpoint: String, detail: String },

    #[error("tls with s3 endpoint {endpoint} failed: {detail}; check that the endpoint speaks https, or pass --etcd-s3-insecure for plain http")]
    Tls { endpoint: String, detail: String },

    #[error("connection to s3 endpoint {endpoint} failed: {detail}")]
    Network { endpoint: String, detail: String },

    #[error("s3 endpoint {endpoint} answered {code}{}", message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Server { endpoint: String, code: String, message: Option<String>, retryable: bool },

    #[error("s3 endpoint {endpoint} answered http {status}")]
    Status { endpoint: String, status: u16 },

    #[error("the data to upload failed: {0}; nothing was stored")]
    Source(String),

    /// The object is encrypted with a customer key (SSE-C) that was not given, or not this one.
    #[error("{0}")]
    CustomerKey(String),

    #[error("{0}")]
    Invalid(String),
}

impl S3Error {
    /// Whether trying again may succeed: network failures, 5xx, throttling, and a body that failed
    /// (a caller that can produce it again, from a file, may resend it). Authentication, missing
    /// buckets, certificates, timeouts (the deadline has passed) and other 4xx are final.
    pub fn is_retryable(&self) -> bool {
        match self {
            S3Error::Unreachable { .. } | S3Error::Network { .. } | S3Error::Source(_) => true,
            S3Error::Server { retryable, .. } => *retryable,
            S3Error::Status { status, .. } => status_is_retryable(*status),
            S3Error::NoSuchBucket { .. }
            | S3Error::NoSuchKey { .. }
            | S3Error::AccessDenied { .. }
            | S3Error::WrongRegion { .. }
            | S3Error::Timeout { .. }
            | S3Error::UploadDeadline { .. }
            | S3Error::Certificate { .. }
            | S3Error::Tls { .. }
            | S3Error::CustomerKey(_)
            | S3Error::Invalid(_) => false,
        }
    }
}

/// The end of an access-denied message: whose credentials, and what to check.
fn access_denied_advice(credentials: Option<&str>) -> String {
    match credentials {
        Some(c) if c.starts_with("anonymous") => c.to_string(),
        Some(c) => format!("{c}; check them and the bucket's policy"),
        None => "the credentials given; check --etcd-s3-access-key/--etcd-s3-secret-key (and --etcd-s3-session-token) and the bucket's policy".into(),
    }
}

fn status_is_retryable(status: u16) -> bool {
    status >= 500 || status == 429 || status == 408
}

/// S3 error codes (the `<Code>` of an error response) that AWS documents as transient.
/// These are protocol identifiers, compared exactly (minio lowercases unknown ones).
const RETRYABLE_CODES: &[&str] = &[
    "internalerror",
    "serviceunavailable",
    "slowdown",
    "requesttimeout",
    "throttling",
    "throttlingexception",
    "requestlimitexceeded",
    "toomanyrequests",
    "requestthrottled",
    "bandwidthlimitexceeded",
    "xminioservernotinitialized",
    "xminioserverbusy",
];

/// Codes that mean the credentials are wrong, expired or not allowed.
const AUTH_CODES: &[&str] = &[
    "signaturedoesnotmatch",
    "invalidaccesskeyid",
    "invalidtoken",
    "expiredtoken",
    "invalidsecuritytoken",
    "tokenrefreshrequired",
    "accountproblem",
    "allaccessdisabled",
    "missingsecurityheader",
    "invalidrequest_signature",
];

/// Codes that mean the request went to the wrong region.
const REGION_CODES: &[&str] = &["authorizationheadermalformed", "illegallocationconstraintexception"];

/// Turns `minio` errors into [`S3Error`]s for one store.
#[derive(Debug, Clone)]
pub(crate) struct Classifier {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
}

impl Classifier {
    pub fn classify(&self, err: MinioError) -> S3Error {
        match err {
            MinioError::S3Server(S3ServerError::S3Error(resp)) => self.classify_response(&resp),
            MinioError::S3Server(S3ServerError::InvalidServerResponse { http_status_code, content_type, .. }) => {
                if status_is_retryable(http_status_code) {
                    S3Error::Status { endpoint: self.endpoint.clone(), status: http_status_code }
                } else {
                    S3Error::Server {
                        endpoint: self.endpoint.clone(),
                        code: format!("http {http_status_code}"),
                        message: Some(format!(
                            "not an s3 error response (content type {content_type:?}); check --etcd-s3-endpoint"
                        )),
                        retryable: false,
                    }
                }
            }
            MinioError::S3Server(S3ServerError::HttpError(status, _)) => {
                S3Error::Status { endpoint: self.endpoint.clone(), status }
            }
            MinioError::Network(NetworkError::ServerError(status)) => {
                S3Error::Status { endpoint: self.endpoint.clone(), status }
            }
            MinioError::Network(NetworkError::ReqwestError(e)) => self.classify_reqwest(&e),
            MinioError::Validation(ValidationErr::HttpError(e)) => self.classify_reqwest(&e),
            MinioError::Validation(ValidationErr::IOError(e)) => {
                S3Error::Network { endpoint: self.endpoint.clone(), detail: lower_first(&e.to_string()) }
            }
            MinioError::Validation(ValidationErr::XmlParseError(e)) => S3Error::Server {
                endpoint: self.endpoint.clone(),
                code: "an unreadable response".into(),
                message: Some(format!("{e}; check that --etcd-s3-endpoint is an s3 server")),
                retryable: false,
            },
            MinioError::Validation(e) => S3Error::Invalid(lower_first(&e.to_string())),
            MinioError::DriveIo(e) => S3Error::Invalid(lower_first(&e.to_string())),
        }
    }

    pub fn classify_response(&self, resp: &MinioErrorResponse) -> S3Error {
        let endpoint = self.endpoint.clone();
        let bucket = self.bucket.clone();
        let message = resp.message().clone().filter(|m| !m.is_empty());
        match resp.code() {
            MinioErrorCode::NoSuchBucket => S3Error::NoSuchBucket { bucket, endpoint },
            MinioErrorCode::NoSuchKey => S3Error::NoSuchKey {
                bucket,
                key: resp.object_name().map(|o| o.to_string()).unwrap_or_else(|| resp.resource().to_string()),
            },
            MinioErrorCode::AccessDenied => {
                S3Error::AccessDenied { endpoint, bucket, code: "AccessDenied".into(), credentials: None }
            }
            MinioErrorCode::PermanentRedirect | MinioErrorCode::Redirect => S3Error::WrongRegion {
                endpoint,
                bucket,
                region: self.region.clone(),
                code: "PermanentRedirect".into(),
                hint: bucket_region(resp),
            },
            MinioErrorCode::OtherError(code) => {
                let c = code.to_ascii_lowercase();
                if AUTH_CODES.contains(&c.as_str()) {
                    S3Error::AccessDenied { endpoint, bucket, code: canonical_code(&c), credentials: None }
                } else if REGION_CODES.contains(&c.as_str()) {
                    S3Error::WrongRegion {
                        endpoint,
                        bucket,
                        region: self.region.clone(),
                        code: canonical_code(&c),
                        hint: bucket_region(resp),
                    }
                } else {
                    let retryable = RETRYABLE_CODES.contains(&c.as_str());
                    S3Error::Server { endpoint, code: canonical_code(&c), message, retryable }
                }
            }
            other => S3Error::Server { endpoint, code: other.to_string(), message, retryable: false },
        }
    }

    /// An HTTP status without an S3 error document.
    pub fn classify_status(&self, status: u16) -> S3Error {
        S3Error::Status { endpoint: self.endpoint.clone(), status }
    }

    pub fn classify_reqwest(&self, e: &reqwest::Error) -> S3Error {
        let endpoint = self.endpoint.clone();
        if let Some(tls) = find_rustls_error(e) {
            let detail = tls.to_string();
            return match tls {
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
                    S3Error::Certificate { endpoint, detail }
                }
                _ => S3Error::Tls { endpoint, detail },
            };
        }
        let detail = innermost_detail(e);
        if e.is_builder() {
            return S3Error::Invalid(format!("cannot build the request for {endpoint}: {detail}"));
        }
        if e.is_connect() {
            return S3Error::Unreachable { endpoint, detail };
        }
        S3Error::Network { endpoint, detail }
    }
}

/// `x-amz-bucket-region` of an error response, if the server said where the bucket is.
fn bucket_region(resp: &MinioErrorResponse) -> Option<String> {
    resp.headers().get("x-amz-bucket-region").and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// S3's spelling of a code minio lowercased (`signaturedoesnotmatch` → `SignatureDoesNotMatch`).
fn canonical_code(lower: &str) -> String {
    const KNOWN: &[&str] = &[
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "InvalidToken",
        "ExpiredToken",
        "InvalidSecurityToken",
        "TokenRefreshRequired",
        "AccountProblem",
        "AllAccessDisabled",
        "MissingSecurityHeader",
        "AuthorizationHeaderMalformed",
        "IllegalLocationConstraintException",
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "RequestThrottled",
        "BandwidthLimitExceeded",
        "XMinioServerNotInitialized",
        "XMinioServerBusy",
        "NoSuchUpload",
        "InvalidPart",
        "InvalidPartOrder",
        "EntityTooSmall",
        "EntityTooLarge",
        "InvalidBucketName",
        "InvalidArgument",
        "NotImplemented",
        "XAmzContentSHA256Mismatch",
        "BadDigest",
        "RequestTimeTooSkewed",
    ];
    KNOWN.iter().find(|k| k.eq_ignore_ascii_case(lower)).map(|k| k.to_string()).unwrap_or_else(|| lower.to_string())
}

/// Whether an S3 error is `NoSuchUpload` (the multipart upload is gone: completed or aborted).
pub(crate) fn is_no_such_upload(err: &MinioError) -> bool {
    matches!(err, MinioError::S3Server(S3ServerError::S3Error(resp))
        if matches!(resp.code(), MinioErrorCode::OtherError(ref c) if c.eq_ignore_ascii_case("nosuchupload")))
}

/// Walks an error's sources, looking inside `std::io::Error`s (whose `source()` skips the error
/// they wrap), for the `rustls::Error` of a failed handshake.
fn find_rustls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(t) = find_rustls_error(inner) {
                    return Some(t);
                }
            }
        }
        cur = e.source();
    }
    None
}

/// The most specific message in an error chain (`connection refused (os error 111)`), which is
/// what tells a user what happened; reqwest's outer layers only repeat the URL.
pub(crate) fn innermost_detail(err: &(dyn std::error::Error + 'static)) -> String {
    let mut last = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !s.is_empty() {
            last = s;
        }
        cur = match e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    lower_first(&last.replace(['\n', '\r', '\t'], " "))
}

pub(crate) fn lower_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_uppercase() && !chars.clone().next().is_some_and(char::is_uppercase) => {
            c.to_lowercase().chain(chars).collect()
        }
        _ => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_free::*;

    /// Helpers that build minio error responses without a server.
    mod http_free {
        pub use minio::s3::minio_error_response::{MinioErrorCode, MinioErrorResponse};
        pub fn resp(code: MinioErrorCode) -> MinioErrorResponse {
            MinioErrorResponse::new(
                Default::default(),
                code,
                Some("Some Message".into()),
                "/b/k".into(),
                String::new(),
                String::new(),
                None,
                None,
            )
        }
    }

    fn classifier() -> Classifier {
        Classifier { endpoint: "https://s3.example:9000".into(), bucket: "snaps".into(), region: "us-east-1".into() }
    }

    fn classify(code: MinioErrorCode) -> S3Error {
        classifier().classify(MinioError::S3Server(S3ServerError::S3Error(Box::new(resp(code)))))
    }

    #[test]
    fn throttling_and_5xx_are_retryable() {
        for c in ["slowdown", "internalerror", "serviceunavailable"] {
            let e = classify(MinioErrorCode::OtherError(c.into()));
            assert!(e.is_retryable(), "{c}: {e}");
        }
        let e = classifier().classify(MinioError::Network(NetworkError::ServerError(503)));
        assert!(e.is_retryable(), "{e}");
        let e = classifier().classify(MinioError::Network(NetworkError::ServerError(429)));
        assert!(e.is_retryable(), "{e}");
    }

    #[test]
    fn auth_bucket_and_4xx_are_final() {
        let e = classify(MinioErrorCode::OtherError("signaturedoesnotmatch".into()));
        assert!(!e.is_retryable());
        let msg = e.to_string();
        assert!(msg.contains("SignatureDoesNotMatch") && msg.contains("--etcd-s3-secret-key"), "{msg}");
        let e = classify(MinioErrorCode::AccessDenied);
        assert!(matches!(e, S3Error::AccessDenied { .. }) && !e.is_retryable());
        let e = classify(MinioErrorCode::NoSuchBucket);
        assert_eq!(
            e.to_string(),
            "bucket snaps does not exist at endpoint https://s3.example:9000; create it or fix --etcd-s3-bucket"
        );
        assert!(!e.is_retryable());
        let e = classify(MinioErrorCode::OtherError("invalidargument".into()));
        assert!(!e.is_retryable());
        let e = classifier().classify(MinioError::Network(NetworkError::ServerError(404)));
        assert!(!e.is_retryable());
    }

    #[test]
    fn wrong_region_says_which_flag() {
        let e = classify(MinioErrorCode::OtherError("authorizationheadermalformed".into()));
        assert!(e.to_string().contains("--etcd-s3-region"), "{e}");
    }

    #[test]
    fn timeout_message_names_the_flag() {
        let e = S3Error::Timeout { endpoint: "http://127.0.0.1:1".into(), timeout: Duration::from_secs(5) };
        assert_eq!(e.to_string(), "s3 endpoint http://127.0.0.1:1 did not answer within 5s (--etcd-s3-timeout)");
        assert!(!e.is_retryable());
    }

    #[test]
    fn rustls_errors_are_found_inside_io_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        let found = find_rustls_error(&io).unwrap();
        assert_eq!(found.to_string(), "invalid peer certificate: UnknownIssuer");
    }

    #[test]
    fn lower_first_keeps_acronyms() {
        assert_eq!(lower_first("Connection refused"), "connection refused");
        assert_eq!(lower_first("TLS failed"), "TLS failed");
    }
}
