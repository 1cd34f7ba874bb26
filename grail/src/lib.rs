//! **grail**: asynchronous GRPO post-training of language models, in one call.
//!
//! A run is one [`GrpoConfig`] (TRL's `GRPOConfig` names, loadable from TOML or built in code)
//! and a task: the config's built-in `[env]`, a [`Task`] of (prompt, answer) rows with reward
//! closures, or environments of your own. [`Grpo`] owns the whole loop: tokenizer and model, an
//! optional SFT warm-up, the rollout pool and the trainer running at the same time and meeting
//! only through channels (groups of scored completions one way, versioned weights the other),
//! held-out evaluation, checkpoints and resume, metrics, signals, and the run summary with its
//! sample accounting.
//!
//! ```no_run
//! use grail::prelude::*;
//!
//! # fn main() -> anyhow::Result<()> {
//! grail::init_logging();
//! let config = GrpoConfig::from_toml("[grpo]\nmax_steps = 50\n")?;
//! let summary = Grpo::new(config).run()?; // countdown, a tiny model from scratch
//! grail::report(&summary);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod async_grpo;
pub mod checkpoint;
mod claimed_prompts;
pub mod config;
pub mod evaluate;
pub mod output;
pub mod plot;
pub mod progress;
mod rollout_ledger;
mod rollout_verification;
pub mod rollout_worker;
pub mod runner;
pub mod setup;
pub mod signals;
mod store_trainer;
pub mod summary;
pub mod task;
pub mod tasks;
mod warm_up;

pub use config::GrpoConfig;
pub use evaluate::evaluate;
pub use rollout_worker::WorkerSummary;
pub use runner::{Grpo, run};
pub use signals::stop_on_signals;
pub use summary::{RunSummary, report, report_worker};
pub use task::Task;

/// What a run needs, in one import.
pub mod prelude {
    pub use crate::config::{EnvSection, GrpoConfig, ResumeFrom};
    pub use crate::runner::Grpo;
    pub use crate::summary::{RunSummary, report};
    pub use crate::task::Task;
    pub use grail_core::tokenizer::Tokenizer;
    pub use grail_rollout::{Completion, Environment, Prompt, Reward, Split};
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
