//! grail's runnable RL jobs: a TOML job config ([`job`]), the run driver ([`run`]) and its plot.
#![warn(missing_docs)]

pub mod job;
pub mod plot;
pub mod run;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A flag set by Ctrl-C: the run stops GRPO, evaluates and writes its final checkpoint.
pub fn ctrl_c_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    if let Err(e) = ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            std::process::exit(130); // second Ctrl-C: leave now
        }
        eprintln!("\nstopping after this step (Ctrl-C again to quit at once)");
    }) {
        tracing::warn!("cannot install the Ctrl-C handler: {e}");
    }
    flag
}

/// Logging to stderr (`RUST_LOG` filters; default `info`).
pub fn init_logging() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
