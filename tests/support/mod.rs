//! Test support, one module per real component.

pub mod bin;
pub mod etcd;
pub mod k3s;
pub mod s3;
pub mod server;
