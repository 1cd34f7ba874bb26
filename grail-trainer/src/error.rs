//! Errors of the trainer: bad configuration or bad input data, each naming the culprit.

/// Trainer errors.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// A configuration value out of range or inconsistent with another.
    #[error("trainer config `{key}` = {value}: {reason}")]
    Config {
        /// The config key, named as in TRL's GRPOConfig where it exists.
        key: String,
        /// The offending value.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// Input data the trainer cannot use (empty group, NaN reward, mismatched shapes, ...).
    #[error("invalid input: {0}")]
    Input(String),
    /// The run made no progress for longer than its `stall_timeout`; the message says what was
    /// seen meanwhile (nothing arriving, zero-spread batches, stale groups).
    #[error("the run stalled: {0}")]
    Stalled(String),
    /// The rollout side could not be told of new weights or consumed groups (a store that
    /// failed after its retries); the message names what and where.
    #[error("feedback to the rollout side: {0}")]
    Feedback(String),
    /// An error from grail-core (model, checkpoint).
    #[error(transparent)]
    Core(#[from] grail_core::GrailError),
}

/// Result alias for the trainer.
pub type Result<T, E = TrainerError> = std::result::Result<T, E>;

impl TrainerError {
    /// A config error for `key` holding `value`.
    pub fn config(key: &str, value: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        Self::Config {
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}
