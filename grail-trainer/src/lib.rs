//! grail-trainer: the GRPO trainer (advantages, fused chunked log-probs and losses, sequence
//! packing, token-budget micro-batches, AdamW, train state, MFU) and its end of the channels
//! ([`channel`]; weights back to the pool through [`feedback`] and [`publisher`]).
//!
//! [`GrpoTrainer::train_step`] trains on a batch of groups; [`GrpoTrainer::run_from_channel`]
//! trains from the rollout pool's channel. The main types are re-exported here.
#![warn(missing_docs)]

pub mod advantages;
mod batch;
pub mod channel;
pub mod config;
pub mod error;
pub mod feedback;
pub mod flops;
pub mod learner;
pub mod loss;
pub mod metrics;
pub mod off_policy;
pub mod optimizer;
pub mod packing;
mod prepare;
pub mod publisher;
pub mod schedule;
pub mod sft;
pub mod state;
pub mod step;
pub mod trainer;

pub use channel::{ChannelRun, RunEvent, RunStats};
pub use config::TrainerConfig;
pub use error::{Result, TrainerError};
pub use feedback::{Feedback, PoolFeedback};
pub use learner::Learner;
pub use loss::{GrpoLoss, GrpoLossConfig, LogProbPath, LossType, grpo_loss};
pub use metrics::{StepMetrics, StepTimes};
pub use publisher::WeightPublisher;
pub use sft::{SftExample, SftMetrics};
pub use state::TrainerState;
pub use step::{StepGradients, StepOutcome};
pub use trainer::GrpoTrainer;
