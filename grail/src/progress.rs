//! Progress on stderr: a bar on a terminal; elsewhere (a log file, a batch job) a plain line every
//! 10 seconds from a ticker thread, so a long phase (a slow step, an evaluation) is never silent.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// A non-terminal stderr gets a line this often while a phase runs.
const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// What the plain lines show.
struct Status {
    position: u64,
    message: String,
}

/// Progress of one phase (`sft`, `grpo`) of `len` steps. The ticker stops when it is dropped.
pub struct Progress {
    bar: ProgressBar,
    status: Arc<Mutex<Status>>,
    ticker: Option<(flume::Sender<()>, std::thread::JoinHandle<()>)>,
    what: String,
    started: Instant,
}

impl Progress {
    /// Progress of `len` steps labelled `what`.
    pub fn new(len: u64, what: &str) -> Self {
        let status = Arc::new(Mutex::new(Status {
            position: 0,
            message: String::new(),
        }));
        let started = Instant::now();
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(len);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>6} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(what.to_string());
            return Self {
                bar,
                status,
                ticker: None,
                what: what.to_string(),
                started,
            };
        }
        let (stop, stopped) = flume::bounded::<()>(1);
        let (shared, label) = (status.clone(), what.to_string());
        let ticker = std::thread::Builder::new()
            .name("grail-progress".into())
            .spawn(move || {
                while let Err(flume::RecvTimeoutError::Timeout) = stopped.recv_timeout(PLAIN_EVERY)
                {
                    let s = shared.lock().unwrap_or_else(|p| p.into_inner());
                    eprintln!(
                        "{label} {}/{len} {:.0}s {}",
                        s.position,
                        started.elapsed().as_secs_f64(),
                        s.message
                    );
                }
            })
            .ok()
            .map(|handle| (stop, handle));
        Self {
            bar: ProgressBar::hidden(),
            status,
            ticker,
            what: what.to_string(),
            started,
        }
    }

    /// Starts counting at `pos` (a resumed run).
    pub fn set_position(&self, pos: u64) {
        self.bar.set_position(pos);
        self.lock().position = pos;
    }

    /// One step done; `msg` says how it went.
    pub fn step(&self, msg: String) {
        self.bar.inc(1);
        self.lock().position += 1;
        self.update(msg);
    }

    /// News without a step (waiting for rollouts, say).
    pub fn update(&self, msg: String) {
        self.bar.set_message(msg.clone());
        self.lock().message = msg;
    }

    /// The phase is over: the bar is finished (or a closing line printed).
    pub fn finish(mut self) {
        self.bar.finish();
        if self.stop_ticker() {
            eprintln!(
                "{} done: {} steps in {:.0}s",
                self.what,
                self.lock().position,
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops the ticker; whether there was one.
    fn stop_ticker(&mut self) -> bool {
        let Some((stop, handle)) = self.ticker.take() else {
            return false;
        };
        let _ = stop.send(());
        let _ = handle.join();
        true
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop_ticker();
    }
}
