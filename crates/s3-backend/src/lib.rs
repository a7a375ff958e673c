//! The S3 implementation of [`k3s_snapshot_core::store::SnapshotStore`], built on the `minio` crate.
//!
//! [`S3Store::connect`] takes an [`S3Config`] (what the `--etcd-s3-*` flags say), checks that the
//! bucket is there, and returns a store whose keys live under `folder/`; [`S3Store::new`] builds
//! the same store without a request (a server starts whatever S3's state). The store's guarantees
//! are the trait's: atomic puts (multipart uploads are aborted on any failure), streamed gets,
//! paged listings, batched deletes. Failures become [`k3s_snapshot_core::Error::Storage`] with a
//! one-line cause from [`S3Error`] and a typed `retryable` flag; credentials never appear in
//! errors, logs or `Debug` output. Credentials come from k3s's chain: the keys in [`S3Config`],
//! else the shared credentials file, else the instance role ([`CredentialChain`], `creds.rs`).
//!
//! [`download_snapshot`] and [`upload_file`] move whole snapshot files between a local directory
//! and any store, verifying size and SHA-256 before anything is renamed into place.

mod checksum;
mod config;
mod creds;
mod creds_container;
mod creds_file;
mod creds_imds;
mod creds_keyring;
mod creds_process;
mod creds_source;
mod creds_web;
mod duration;
mod error;
mod object_lock;
mod sse;
mod store;
mod stream_put;

pub use config::{BucketLookup, S3Config, ServerSideEncryption, DEFAULT_ENDPOINT, DEFAULT_REGION, DEFAULT_TIMEOUT};
pub use creds::{CredentialChain, DEFAULT_IMDS_ENDPOINT};
pub use creds_container::{ContainerConfig, Redacted, CONTAINER_TIMEOUT};
pub use creds_imds::IMDS_TIMEOUT;
pub use creds_process::PROCESS_TIMEOUT;
pub use creds_web::{WebIdentityConfig, STS_TIMEOUT};
pub use duration::format_duration;
pub use error::S3Error;
/// The store-agnostic transfers live in the core; re-exported here, where S3 users look for them.
pub use k3s_snapshot_core::transfer::{
    download_snapshot, download_snapshot_with_progress, download_to_scratch, download_with_metadata, fetch_metadata,
    upload_file,
};
pub use object_lock::{LockMode, ObjectLock, MAX_LOCK_DAYS};
pub use sse::CustomerKey;
pub use store::{ObjectDetails, S3Store, DEFAULT_PART_SIZE, DELETE_BATCH, MAX_PARTS, MIN_PART_SIZE};
pub use stream_put::MAX_SINGLE_PUT;

/// `--etcd-s3-proxy none`: no proxy at all, whatever the environment says (as k3s reads it).
pub const NO_PROXY_VALUE: &str = "none";

/// The environment variables that route the S3 client through `proxy` (`--etcd-s3-proxy`),
/// replacing any proxy settings already in the environment, as k3s does. For `none`, every
/// proxy variable is emptied and `NO_PROXY` is `*`.
///
/// The `minio` crate builds its own HTTP client and offers no way to pass it a proxy; that client
/// reads `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` when it is built. Setting environment variables is
/// only sound while the process has a single thread, so the binary applies these in `main` before
/// it starts the async runtime; [`S3Store::connect`] refuses a `proxy` that is not in effect.
pub fn proxy_env(proxy: &str) -> Vec<(&'static str, String)> {
    let mut vars = Vec::new();
    if proxy == NO_PROXY_VALUE {
        for name in ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"] {
            vars.push((name, String::new()));
        }
        vars.extend([("NO_PROXY", "*".to_string()), ("no_proxy", "*".to_string())]);
        return vars;
    }
    for name in ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"] {
        vars.push((name, proxy.to_string()));
    }
    for name in ["ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"] {
        vars.push((name, String::new()));
    }
    vars
}
