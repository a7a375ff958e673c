//! Test support, one module per real component.

pub mod age;
pub mod bin;
pub mod cred_agent;
pub mod etcd;
pub mod flip;
pub mod imds;
pub mod k3s;
pub mod moto;
pub mod s3;
pub mod server;
