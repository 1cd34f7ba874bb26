//! Stopping a run from outside: SIGINT (Ctrl-C) and SIGTERM (what SLURM, Kubernetes and
//! `timeout` send) ask the run to stop after the current step; a second signal leaves at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Signals this soon after the first are the same request: `timeout` and SLURM deliver SIGTERM
/// to the process and to its process group, so one request can arrive twice.
const SAME_REQUEST: Duration = Duration::from_secs(1);

/// A flag set by the first SIGINT or SIGTERM: the run stops after its current step, writes its
/// checkpoint and evaluates. A later signal (more than a second after the first) exits the
/// process at once (status 130); checkpoints already on disk stay valid, since each is renamed
/// into place whole.
///
/// The handler is process-wide: the first call installs it, every call returns the same flag.
pub fn stop_on_signals() -> Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(install).clone()
}

fn install() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let first: Mutex<Option<Instant>> = Mutex::new(None);
    if let Err(e) = ctrlc::set_handler(move || {
        let mut first = first.lock().unwrap_or_else(|p| p.into_inner());
        match *first {
            Some(at) if at.elapsed() >= SAME_REQUEST => std::process::exit(130),
            Some(_) => {}
            None => {
                *first = Some(Instant::now());
                f.store(true, Ordering::SeqCst);
                eprintln!("\nstopping after this step (signal again to quit at once)");
            }
        }
    }) {
        tracing::warn!("cannot install the signal handler (another one is set): {e}");
    }
    flag
}
