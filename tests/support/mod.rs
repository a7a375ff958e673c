//! Test support, one module per real component.

pub mod age;
pub mod bin;
pub mod etcd;
pub mod imds;
pub mod k3s;
pub mod moto;
pub mod s3;
pub mod server;
