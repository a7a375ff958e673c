//! The one retry helper of every request ([`Inner::call`]): what it retries, how often, and the
//! deadline of the whole operation.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use k3s_snapshot_core::Result;

use crate::error::S3Error;

use super::Inner;

/// How failed requests are retried.
#[derive(Debug, Clone, Copy)]
struct RetryPolicy {
    attempts: u32,
    first_delay: Duration,
    max_delay: Duration,
}

const RETRY: RetryPolicy =
    RetryPolicy { attempts: 4, first_delay: Duration::from_millis(250), max_delay: Duration::from_secs(4) };

impl Inner {
    /// The one retry helper. Runs `f` until it succeeds, fails with an error that is not
    /// retryable, runs out of attempts, or the operation's deadline (`timeout`) passes.
    pub(super) async fn call<T, F, Fut>(&self, op: &'static str, key: &str, mut f: F) -> Result<T, S3Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, S3Error>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut delay = RETRY.first_delay;
        let mut attempt = 1;
        loop {
            let attempt_once = async {
                self.signer.refresh().await?;
                f().await
            };
            let err = match tokio::time::timeout_at(deadline, attempt_once).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => e,
                Err(_) => return Err(self.timeout_error()),
            };
            if !err.is_retryable() || attempt >= RETRY.attempts || Instant::now() + delay >= deadline {
                return Err(err);
            }
            tracing::warn!(op, key, attempt, store = %self.describe, error = %err, "s3 request failed; retrying in {delay:?}");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY.max_delay);
            attempt += 1;
        }
    }

    pub(super) fn timeout_error(&self) -> S3Error {
        S3Error::Timeout { endpoint: self.classifier.endpoint.clone(), timeout: self.timeout }
    }
}
