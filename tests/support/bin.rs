//! The built `k3s-snapshot` binary.

use std::path::PathBuf;
use std::process::{Command, Output};

/// Path of the `k3s-snapshot` binary: `K3S_SNAPSHOT_BIN`, else `target/debug/k3s-snapshot`.
pub fn path() -> PathBuf {
    let p = std::env::var_os("K3S_SNAPSHOT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/k3s-snapshot"));
    assert!(
        p.is_file(),
        "the k3s-snapshot binary is not built at {}: run `cargo xtask test` (it builds it and installs etcd and s3s-fs)",
        p.display()
    );
    p
}

/// Environment variables `k3s-snapshot` reads (its clap `env` names); xtask keeps the same list.
const OUR_ENV: &[&str] = &[
    "K3S_DATA_DIR",
    "K3S_NODE_NAME",
    "K3S_TOKEN",
    "K3S_TOKEN_FILE",
    "K3S_ETCD_SERVER",
    "K3S_ETCD_TOKEN",
    "K3S_URL",
    "K3S_CONFIG_FILE",
    "K3S_CLUSTER_INIT",
    "K3S_CLUSTER_RESET",
    "K3S_ETCD_BIN_DIR",
    "K3S_SNAPSHOT_JITTER",
    "K3S_ETCD_SNAPSHOT_ENCRYPTION_RECIPIENTS_FILE",
    "K3S_ETCD_SNAPSHOT_ENCRYPTION_IDENTITY_FILE",
    "K3S_DEBUG",
    "K3S_LOG_FORMAT",
    "K3S_SNAPSHOT_LOG",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_CONFIG_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_ENDPOINT_URL_STS",
    "AWS_STS_REGIONAL_ENDPOINTS",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "NOTIFY_SOCKET",
];

/// A shared credentials file that never exists (`/nonexistent` is, by convention, never made).
pub const NO_CREDENTIALS_FILE: &str = "/nonexistent/k3s-snapshot-tests/aws-credentials";
/// Likewise for the config file (`credential_process`).
pub const NO_CONFIG_FILE: &str = "/nonexistent/k3s-snapshot-tests/aws-config";

/// A `k3s-snapshot` command with a clean environment for the variables it reads. The S3
/// credential chain reaches neither the developer's `~/.aws/credentials` nor a real instance
/// metadata service: tests of the chain set `AWS_SHARED_CREDENTIALS_FILE` and
/// `AWS_EC2_METADATA_*` again (or remove them, with `HOME` pointing somewhere of theirs).
pub fn cmd() -> Command {
    let mut c = Command::new(path());
    for v in OUR_ENV {
        c.env_remove(v);
    }
    c.env("AWS_SHARED_CREDENTIALS_FILE", NO_CREDENTIALS_FILE);
    c.env("AWS_CONFIG_FILE", NO_CONFIG_FILE);
    c.env("AWS_EC2_METADATA_DISABLED", "true");
    c
}

/// Output of a finished command, as text, for assertions.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    #[track_caller]
    pub fn assert_ok(&self) -> &Self {
        assert!(self.ok(), "expected success, got {:?}\nstdout:\n{}\nstderr:\n{}", self.code, self.stdout, self.stderr);
        self
    }

    #[track_caller]
    pub fn assert_fails_with(&self, needle: &str) -> &Self {
        assert!(!self.ok(), "expected failure, got success\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        assert!(self.stderr.contains(needle), "stderr does not mention {needle:?}\nstderr:\n{}", self.stderr);
        self
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

pub fn run(c: &mut Command) -> Run {
    c.output().unwrap_or_else(|e| panic!("cannot run {:?}: {e}", c.get_program())).into()
}
