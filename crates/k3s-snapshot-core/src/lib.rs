//! The heart of k3s-snapshot: everything about an etcd snapshot that does not depend on where the
//! process runs or how it was asked. Snapshot names, their metadata, the [`store::SnapshotStore`]
//! trait with its local implementation, retention, zip compression in k3s's layout, age encryption, the streaming
//! SHA-256 trailer check, and the save pipeline that turns etcd's Maintenance `Snapshot` stream into
//! a file. This crate never prints, never parses flags and knows nothing of S3 or signals: callers
//! pass a [`tokio_util::sync::CancellationToken`] and read [`tracing`] events.

pub mod bbolt;
pub mod compress;
pub mod delta;
pub mod delta_replay;
pub mod encryption;
pub mod error;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod etcd_config;
pub mod inspect;
pub mod integrity;
pub mod k3s_list;
pub mod list;
#[cfg(feature = "etcd")]
pub mod maintenance;
pub mod metadata;
pub mod name;
pub mod progress;
pub mod restore_db;
pub mod retention;
pub mod revision;
#[cfg(feature = "etcd")]
pub mod save;
pub mod status;
pub mod store;
pub mod transfer;

pub use error::{Error, Result};
