//! What a k3s-like server embeds to run etcd and its snapshots: the data-dir layout
//! ([`layout::DataDir`]), the cluster token and certificates ([`token`], [`tls`]), one server per
//! data dir ([`lock`]), supervision of a real `etcd` process ([`etcd_proc`]), scheduled snapshots
//! ([`schedule`], [`scheduler`], [`metrics`]) and the S3 upload queue ([`upload_queue`]), the supervisor HTTPS API ([`api`]),
//! `--cluster-reset` ([`reset`]), restore drills ([`verify`], scheduled by [`drills`]), joining a cluster with `--server` ([`join`], [`wal`]) and the
//! service manager's readiness protocol ([`notify`]).
//! [`server::run`] ties them together.
//!
//! This crate never parses flags and never prints: the binary turns flags into a
//! [`config::ServerConfig`], passes a [`tokio_util::sync::CancellationToken`] for shutdown, and
//! reads [`tracing`] events.

pub mod api;
pub mod children;
pub mod config;
mod crash;
pub mod deltas;
pub mod drills;
pub mod error;
pub mod etcd_proc;
pub mod health;
mod https_client;
pub mod inspect;
pub mod join;
pub mod layout;
pub mod lock;
pub mod metrics;
pub mod notify;
pub mod replay;
pub mod reset;
pub mod schedule;
pub mod scheduler;
pub mod server;
pub mod snapshot_api;
pub mod tls;
pub mod token;
pub mod upload_queue;
pub mod verify;
pub mod wal;

pub use error::{Error, Result};
