//! The trainer's side of the channel: weights and the consumed-group count, in one ordered stream.

use crate::weights::WeightUpdate;

/// What the trainer sends the rollout pool, in order on one channel: weights and the consumption
/// count travel together, so a worker that sees a count has also seen every update before it.
#[derive(Debug, Clone, PartialEq)]
pub enum PoolMessage {
    /// New weights.
    Weights(WeightUpdate),
    /// Groups the trainer has consumed in all since the pool started: trained on, filtered out
    /// (zero reward spread) or dropped as stale. The pool's admission bound counts these, so no
    /// mix of filtered and stale groups can stall it.
    Consumed(u64),
}

impl From<WeightUpdate> for PoolMessage {
    fn from(update: WeightUpdate) -> Self {
        PoolMessage::Weights(update)
    }
}
