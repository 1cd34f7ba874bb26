//! grail-rollout: turns prompts into scored groups for the trainer. Prompts and rewards come from
//! an [`Environment`] ([`environment`]; rows of prompt and answer: [`dataset`]; train / held-out:
//! [`split`]); seeded sampling with raw behaviour log-probs ([`sampling`]), continuous-batching
//! generation with a paged KV cache and prompts prefilled once per group ([`generate`]),
//! prompt length limits ([`prompt_limits`]), the worker pool ([`pool`]) and each worker's copy
//! of the weights ([`weight_state`]) turn them into groups. [`kv_blocks`] is the bookkeeping of
//! the paged KV cache (block pool, block tables, prefix sharing, copy on write). [`verify`]
//! checks a completion an untrusted worker claims (GRAIL sketches, log-probs, plausibility).
#![warn(missing_docs)]

pub mod dataset;
pub mod environment;
pub mod error;
pub mod generate;
pub mod group_check;
pub mod kv_blocks;
pub mod pool;
pub mod prompt_cursor;
pub mod prompt_limits;
pub mod sampling;
mod scheduler;
mod sequence_kv;
pub mod split;
pub mod verify;
pub mod weight_state;

pub use dataset::{Dataset, Row};
pub use environment::{Completion, Environment, Prompt, Reward, RewardFn};
pub use error::RolloutError;
pub use pool::{PoolConfig, PoolReport, RolloutPool, spawn_pool, spawn_pool_with};
pub use prompt_cursor::{Counter, PromptCursor};
pub use prompt_limits::{PromptLimits, PromptTruncation};
pub use split::Split;
pub use weight_state::WeightState;
