//! Test support, one module per real component.

pub mod bin;
pub mod etcd;
pub mod imds;
pub mod k3s;
pub mod s3;
pub mod server;
