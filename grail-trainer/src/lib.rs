//! grail-trainer: the GRPO trainer (advantages, fused chunked log-probs and losses, sequence
//! packing, token-budget micro-batches, AdamW, train state, MFU) and its end of the channels
//! ([`channel`]; weights back to the pool through [`feedback`] and [`publisher`]).
#![warn(missing_docs)]

pub mod error;
pub mod loss;
pub mod off_policy;
pub mod optimizer;

pub use error::{Result, TrainerError};
pub use feedback::PoolFeedback;
pub use publisher::WeightPublisher;
pub mod advantages;
pub mod channel;
pub mod config;
pub mod feedback;
pub mod flops;
pub mod packing;
pub mod publisher;
pub mod schedule;
pub mod sft;
pub mod state;
pub mod trainer;
