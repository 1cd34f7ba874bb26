//! Errors of the rollout side: bad configuration, a prompt that cannot be generated from, a
//! failed worker; each names the culprit.

use grail_core::GrailError;

/// Rollout errors.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// A configuration value out of range or inconsistent with another.
    #[error("rollout config `{key}` = {value}: {reason}")]
    Config {
        /// The config key.
        key: String,
        /// The offending value.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A prompt the pool cannot generate from: empty, too long for the limits, or the
    /// environment failed to make it.
    #[error("prompt {index}: {reason}")]
    Prompt {
        /// The prompt's index in its environment.
        index: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A rollout worker thread panicked.
    #[error("a rollout worker panicked")]
    WorkerPanicked,
    /// A worker thread could not be started.
    #[error("cannot start a rollout thread: {0}")]
    Spawn(std::io::Error),
    /// An error from grail-core (model, tokenizer, weights).
    #[error(transparent)]
    Core(#[from] GrailError),
}

/// Result alias for the rollout side.
pub type Result<T, E = RolloutError> = std::result::Result<T, E>;

impl RolloutError {
    /// A config error for `key` holding `value`.
    pub fn config(key: &str, value: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        Self::Config {
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// An error about prompt `index`.
    pub fn prompt(index: u64, reason: impl Into<String>) -> Self {
        Self::Prompt {
            index,
            reason: reason.into(),
        }
    }
}
