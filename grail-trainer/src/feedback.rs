//! What the trainer tells the rollout side after each step — new weights, and how many groups
//! it has consumed — and its in-process form, the channel back to the pool.

use grail_core::model::CausalLm;
use grail_protocol::{PolicyVersion, PoolMessage};

use crate::error::Result;
use crate::publisher::WeightPublisher;

/// Where the trainer's news for the rollout side goes: a [`PoolFeedback`] in one process, an
/// object store across processes. The trainer does not know which.
pub trait Feedback {
    /// Publishes `model`'s weights as `version`.
    fn publish(&mut self, version: PolicyVersion, model: &CausalLm) -> Result<()>;
    /// Records that the trainer is done with `groups` more groups (trained, filtered or dropped
    /// as stale), which frees the rollout side to take as many new prompts.
    fn consumed(&mut self, groups: usize) -> Result<()>;
}

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
}

impl Feedback for PoolFeedback {
    /// Sends `model`'s weights as `version`. A closed pool is not an error: the trainer keeps its
    /// weights and its run ends when the group channel closes.
    fn publish(&mut self, version: PolicyVersion, model: &CausalLm) -> Result<()> {
        let update = self.publisher.publish(version, model);
        let _ = self.tx.send(PoolMessage::Weights(update));
        Ok(())
    }

    /// Tells the pool the new total of groups consumed.
    fn consumed(&mut self, groups: usize) -> Result<()> {
        self.consumed += groups as u64;
        let _ = self.tx.send(PoolMessage::Consumed(self.consumed));
        Ok(())
    }
}
