//! Stopping a run from outside: SIGINT (Ctrl-C) and SIGTERM (what SLURM, Kubernetes and
//! `timeout` send) ask the run to stop after the current step; a second signal leaves at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A flag set by the first SIGINT or SIGTERM: the run stops after its current step, evaluates and
/// writes its checkpoint. A second signal exits the process at once (status 130); checkpoints
/// already on disk stay valid, since each is renamed into place whole.
///
/// The handler is process-wide and installed once; later calls return flags that are never set
/// and log a warning.
pub fn stop_on_signals() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    if let Err(e) = ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step (signal again to quit at once)");
    }) {
        tracing::warn!("cannot install the signal handler: {e}");
    }
    flag
}
