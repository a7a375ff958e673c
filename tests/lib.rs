//! Helpers for the workspace's end-to-end tests: start real etcd (3.4.23 and 3.5.1) and real S3
//! servers on loopback, run the built `k3s-snapshot` binary. When a program is missing the helper
//! panics with a message naming `cargo xtask test`, which installs it: tests never skip.

pub mod support;
