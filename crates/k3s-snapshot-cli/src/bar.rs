//! The progress bar of long transfers: on stderr when it is a terminal, nothing otherwise.

use std::io::IsTerminal;
use std::sync::Arc;

use k3s_snapshot_core::progress::{NoProgress, Progress};

/// A progress bar on stderr when it is a terminal; nothing otherwise.
pub(crate) fn bar() -> Arc<dyn Progress> {
    if std::io::stderr().is_terminal() {
        Arc::new(Bar(indicatif::ProgressBar::hidden()))
    } else {
        Arc::new(NoProgress)
    }
}

struct Bar(indicatif::ProgressBar);

impl Progress for Bar {
    fn start(&self, what: &str, total: Option<u64>) {
        let style = match total {
            Some(t) => {
                self.0.set_length(t);
                indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
            }
            None => indicatif::ProgressStyle::with_template("{msg} {spinner} {bytes} {bytes_per_sec}"),
        };
        if let Ok(s) = style {
            self.0.set_style(s.progress_chars("=> "));
        }
        self.0.set_message(what.to_string());
        self.0.set_position(0);
        self.0.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}
