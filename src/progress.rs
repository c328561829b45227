//! Progress on stderr for the long steps (loading, passes, writing GBs of weights). Drawn
//! only on a terminal; `--quiet` hides it.
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A spinner showing `msg`; hidden when `quiet`.
    pub fn start(msg: &str, quiet: bool) -> Self {
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
        };
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("valid template"),
        );
        bar.set_message(msg.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        Progress { bar }
    }

    /// Runs `f` (which prints to the terminal) with the bar cleared meanwhile.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.bar.suspend(f)
    }

    pub fn step(&self, msg: &str) {
        self.bar.set_message(msg.to_string());
    }

    /// Switches to a byte bar (`done` of `total`).
    pub fn bytes(&self, done: u64, total: u64) {
        if self.bar.length() != Some(total) {
            self.bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            self.bar.set_length(total);
        }
        self.bar.set_position(done);
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear(); // errors leave no half-drawn bar
    }
}
