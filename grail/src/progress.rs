//! Progress on stderr: a bar on a terminal; elsewhere (a log file, a batch job) a plain line at
//! least every 10 seconds, so a long phase is never silent.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Lines to a non-terminal stderr come at least this often while work goes on.
const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// Progress of one phase (`sft`, `grpo`) of `len` steps.
pub struct Progress {
    bar: ProgressBar,
    what: String,
    plain: bool,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    /// Progress of `len` steps labelled `what`.
    pub fn new(len: u64, what: &str) -> Self {
        let plain = !std::io::stderr().is_terminal();
        let bar = if plain {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(len)
        };
        bar.set_length(len);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>6} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(what.to_string());
        Self {
            bar,
            what: what.to_string(),
            plain,
            started: Instant::now(),
            last_line: Instant::now(),
        }
    }

    /// Starts counting at `pos` (a resumed run).
    pub fn set_position(&self, pos: u64) {
        self.bar.set_position(pos);
    }

    /// One step done; `msg` says how it went.
    pub fn step(&mut self, msg: String) {
        self.bar.inc(1);
        self.update(msg);
    }

    /// No step, but news (waiting for rollouts, say).
    pub fn update(&mut self, msg: String) {
        if self.plain {
            if self.last_line.elapsed() >= PLAIN_EVERY {
                eprintln!(
                    "{} {}/{} {:.0}s {msg}",
                    self.what,
                    self.bar.position(),
                    self.bar.length().unwrap_or(0),
                    self.started.elapsed().as_secs_f64()
                );
                self.last_line = Instant::now();
            }
        } else {
            self.bar.set_message(msg);
        }
    }

    /// The phase is over.
    pub fn finish(&self) {
        self.bar.finish();
        if self.plain {
            eprintln!(
                "{} done: {} steps in {:.0}s",
                self.what,
                self.bar.position(),
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}
