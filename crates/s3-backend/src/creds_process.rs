//! `credential_process` in a profile (of the shared credentials file or the config file): a
//! command whose standard output is the JSON document the AWS CLI defines (`Version: 1`,
//! `AccessKeyId`, `SecretAccessKey`, optional `SessionToken` and `Expiration`). As the AWS SDKs
//! run it, the value is a command line for `sh -c`. It runs again before the credentials expire;
//! without an `Expiration` its credentials are kept. Its standard error goes to our log's debug
//! level, never into messages (a helper may print what it should not); its output is bounded in
//! time ([`PROCESS_TIMEOUT`]) and size.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::creds_source::{json_credentials, Found, Origin};

/// Bound on one run of the command.
pub const PROCESS_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest output read.
const MAX_OUTPUT: u64 = 64 << 10;

/// The `credential_process` link of a keyring.
pub(crate) struct Process {
    command: String,
    /// `profile P of FILE`, for messages.
    source: String,
}

impl Process {
    pub fn new(command: String, source: String) -> Process {
        Process { command, source }
    }

    pub fn name(&self) -> String {
        format!("credential_process of {}", self.source)
    }

    pub async fn fetch(&self) -> Result<Found, String> {
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start it with sh: {e}"))?;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let run = async {
            let read_out = async {
                if let Some(s) = stdout {
                    s.take(MAX_OUTPUT + 1).read_to_end(&mut out).await?;
                }
                Ok::<_, std::io::Error>(())
            };
            let read_err = async {
                if let Some(s) = stderr {
                    s.take(MAX_OUTPUT).read_to_end(&mut err).await?;
                }
                Ok::<_, std::io::Error>(())
            };
            let (a, b) = tokio::join!(read_out, read_err);
            a.and(b)?;
            child.wait().await
        };
        let status = match tokio::time::timeout(PROCESS_TIMEOUT, run).await {
            Err(_) => return Err(format!("it did not finish within {}s", PROCESS_TIMEOUT.as_secs())),
            Ok(Err(e)) => return Err(format!("cannot read its output: {e}")),
            Ok(Ok(s)) => s,
        };
        if !err.is_empty() {
            tracing::debug!(source = %self.source, stderr = %String::from_utf8_lossy(&err).trim(), "credential_process wrote to stderr");
        }
        if !status.success() {
            return Err(format!("it failed ({status}); run it by hand to see why"));
        }
        if out.len() as u64 > MAX_OUTPUT {
            return Err(format!("its output is larger than {} KiB", MAX_OUTPUT >> 10));
        }
        let text = String::from_utf8(out).map_err(|_| "its output is not UTF-8 text".to_string())?;
        let version = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("Version").and_then(|v| v.as_i64()));
        if version != Some(1) {
            return Err("its output is not a credential_process document with \"Version\": 1".into());
        }
        json_credentials(&text, "its output", false, Origin::Process { source: self.source.clone() })
    }
}
