//! Crash points for tests: the process aborts (like a SIGKILL, nothing cleans up, children keep
//! running) at a named step when the test asks for it through an environment variable. They cost
//! one `getenv` where they sit and are inert unless that variable names the step.

/// Panics (in the calling task) when the environment variable `var` equals `step`: a stand-in
/// for a bug, to test that a task that dies does not go unnoticed.
pub(crate) fn panic_point(var: &str, step: &str) {
    if std::env::var(var).is_ok_and(|v| v == step) {
        panic!("{var}={step}: panicking here");
    }
}

/// Waits until `cancel` when the environment variable `var` equals `step`: a test holds the
/// process there (saying so on stderr) to interrupt it at a known moment.
pub(crate) async fn pause_point(var: &str, step: &str, cancel: &tokio_util::sync::CancellationToken) {
    if std::env::var(var).is_ok_and(|v| v == step) {
        eprintln!("{var}={step}: paused here until interrupted");
        cancel.cancelled().await;
    }
}

/// Aborts the process when the environment variable `var` equals `step`.
pub(crate) fn point(var: &str, step: &str) {
    if std::env::var(var).is_ok_and(|v| v == step) {
        eprintln!("{var}={step}: aborting here");
        std::process::abort();
    }
}
