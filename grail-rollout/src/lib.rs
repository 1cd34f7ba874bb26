//! grail-rollout: turns prompts into scored groups for the trainer: seeded sampling with raw
//! behaviour log-probs ([`sampling`]), continuous-batching generation over per-sequence KV caches
//! ([`generate`]), prompt length limits ([`prompt_limits`]), the worker pool ([`pool`]) and each worker's copy of
//! the weights ([`weight_state`]).
#![warn(missing_docs)]

pub mod generate;
pub mod pool;
pub mod prompt_limits;
pub mod sampling;
pub mod weight_state;

pub use pool::{PoolConfig, PoolReport, RolloutPool, spawn_pool};
pub use prompt_limits::{PromptLimits, PromptTruncation};
pub use weight_state::WeightState;
