//! grail-rollout: turns prompts into scored groups for the trainer.
//!
//! Built so far: seeded sampling with raw behaviour log-probs ([`sampling`]) and continuous-
//! batching generation over per-sequence KV caches ([`generate`]).
#![warn(missing_docs)]

pub mod generate;
pub mod pool;
pub mod sampling;

pub use pool::{PoolConfig, PoolReport, RolloutPool, spawn_pool};
