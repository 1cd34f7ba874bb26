//! The trainer's end of the channel back to the rollout pool.

use grail_core::model::CausalLm;
use grail_protocol::{PolicyVersion, PoolMessage};

use crate::publisher::WeightPublisher;

/// The trainer's end of the channel back to the rollout pool: new weights, encoded by the
/// publisher, and how many groups the trainer has consumed, in one ordered stream.
pub struct PoolFeedback {
    /// The pool's feedback channel.
    pub tx: flume::Sender<PoolMessage>,
    /// Encoder state.
    pub publisher: WeightPublisher,
    consumed: u64,
}

impl PoolFeedback {
    /// Feedback through `tx`, encoding weights with `publisher`.
    pub fn new(tx: flume::Sender<PoolMessage>, publisher: WeightPublisher) -> Self {
        Self {
            tx,
            publisher,
            consumed: 0,
        }
    }

    /// Sends `model`'s weights as `version`. A closed pool is not an error: the trainer keeps its
    /// weights and its run ends when the group channel closes.
    pub fn publish(&mut self, version: PolicyVersion, model: &CausalLm) {
        let update = self.publisher.publish(version, model);
        let _ = self.tx.send(PoolMessage::Weights(update));
    }

    /// Records that the trainer is done with `groups` more groups (trained, filtered or dropped as
    /// stale) and tells the pool the new total, which frees it to take as many new prompts.
    pub fn consumed(&mut self, groups: usize) {
        self.consumed += groups as u64;
        let _ = self.tx.send(PoolMessage::Consumed(self.consumed));
    }
}
