//! Helpers for the workspace's end-to-end tests: start real etcd (3.4.23 and 3.5.1) and real S3
//! servers on loopback, run the built `k3s-snapshot` binary. When a program is missing the helper
//! panics with a message naming `cargo xtask test`, which installs it: tests never skip.

pub mod support;

/// Makes, for each named `fn(EtcdVersion)`, a module with one test per supported etcd version
/// (`name::etcd_3_5`, `name::etcd_3_4`), so a failure names the version.
#[macro_export]
macro_rules! on_both_versions {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn etcd_3_5() {
                super::$name(tests::support::etcd::EtcdVersion::V3_5)
            }
            #[test]
            fn etcd_3_4() {
                super::$name(tests::support::etcd::EtcdVersion::V3_4)
            }
        }
    )*};
}
