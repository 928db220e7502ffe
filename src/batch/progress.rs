//! Progress of a task: a bar on a terminal, a JSON log line every few seconds otherwise (Cloud
//! Run jobs log to Cloud Logging, where a bar's redraws would be noise).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use super::manifest::Status;
use crate::config::ProgressMode;

/// How often a log line reports progress.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Counts inputs as they end and shows how far the task is.
pub struct Progress {
    bar: Option<ProgressBar>,
    total: usize,
    ended: usize,
    done: usize,
    failed: usize,
    started: Instant,
    last_log: Instant,
}

impl Progress {
    /// Progress over `total` inputs, shown as `mode` says.
    pub fn new(mode: ProgressMode, total: usize) -> Self {
        let bar = match mode {
            ProgressMode::Bar => true,
            ProgressMode::Log => false,
            ProgressMode::Auto => std::io::stderr().is_terminal(),
        }
        .then(|| {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:40}] {pos}/{len} {per_sec} eta {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        let now = Instant::now();
        Self {
            bar,
            total,
            ended: 0,
            done: 0,
            failed: 0,
            started: now,
            last_log: now,
        }
    }

    /// One more input ended as `status`.
    pub fn ended(&mut self, status: Status) {
        self.ended += 1;
        match status {
            Status::Done => self.done += 1,
            Status::Failed | Status::Transient => self.failed += 1,
            Status::Skipped | Status::NotStarted => {}
        }
        match &self.bar {
            Some(bar) => {
                bar.inc(1);
                if self.failed > 0 {
                    bar.set_message(format!("{} failed", self.failed));
                }
            }
            None if self.last_log.elapsed() >= LOG_EVERY || self.ended == self.total => {
                self.last_log = Instant::now();
                self.log();
            }
            None => {}
        }
    }

    fn log(&self) {
        let seconds = self.started.elapsed().as_secs_f64();
        tracing::info!(
            ended = self.ended,
            total = self.total,
            done = self.done,
            failed = self.failed,
            percent = (100 * self.ended).checked_div(self.total).unwrap_or(100) as u64,
            images_per_s = self.done as f64 / seconds.max(1e-9),
            "progress"
        );
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
