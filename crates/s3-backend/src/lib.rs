//! The S3 implementation of [`k3s_snapshot_core::store::SnapshotStore`], built on the `minio` crate.
