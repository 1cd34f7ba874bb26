//! grail-trainer: the GRPO trainer (advantages, fused chunked log-probs and losses, sequence
//! packing, token-budget micro-batches, AdamW, train state, MFU).
#![warn(missing_docs)]

pub mod error;
pub mod loss;
pub mod off_policy;
pub mod optimizer;

pub use error::{Result, TrainerError};
pub mod advantages;
pub mod channel;
pub mod config;
pub mod flops;
pub mod packing;
pub mod schedule;
pub mod sft;
pub mod state;
pub mod trainer;
