//! The data that crosses the channels between the rollout pool and the trainer.

use std::sync::Arc;

/// A policy version: 0 for the initial weights, +1 per optimizer step.
pub type PolicyVersion = u64;

/// One scored completion of a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Completion token ids (without the prompt).
    pub completion_ids: Vec<u32>,
    /// Behaviour log-prob of each completion token under the policy that sampled it
    /// (temperature-scaled log-softmax of the full distribution).
    pub behaviour_logps: Vec<f32>,
    /// One reward per reward function, unweighted.
    pub rewards: Vec<f32>,
    /// Policy version that produced the completion's first token (the oldest of its tokens).
    pub policy_version: PolicyVersion,
    /// Policy version that produced each completion token. All equal to `policy_version` unless
    /// the pool switched weights in the middle of the completion (in-flight weight updates).
    pub token_versions: Vec<PolicyVersion>,
}

impl Sample {
    /// A sample whose every token came from one policy version.
    pub fn new(
        completion_ids: Vec<u32>,
        behaviour_logps: Vec<f32>,
        rewards: Vec<f32>,
        policy_version: PolicyVersion,
    ) -> Self {
        let token_versions = vec![policy_version; completion_ids.len()];
        Self {
            completion_ids,
            behaviour_logps,
            rewards,
            policy_version,
            token_versions,
        }
    }

    /// Whether the completion's tokens came from more than one policy version.
    pub fn spans_versions(&self) -> bool {
        self.token_versions.windows(2).any(|w| w[0] != w[1])
    }
}

/// `num_generations` completions of one prompt: the unit GRPO normalises advantages over.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// Identifier of the prompt (for logging and de-duplication).
    pub prompt_id: u64,
    /// Prompt token ids, shared by every sample.
    pub prompt_ids: Arc<Vec<u32>>,
    /// The completions.
    pub samples: Vec<Sample>,
}

impl Group {
    /// The oldest policy version among the samples.
    pub fn oldest_version(&self) -> PolicyVersion {
        self.samples
            .iter()
            .map(|s| s.policy_version)
            .min()
            .unwrap_or(0)
    }
}

/// One named tensor in Hugging Face naming and layout, f32 values.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// Hugging Face tensor name, e.g. `model.layers.0.mlp.up_proj.weight`.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// The content of a weight update.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightPayload {
    /// Every tensor (values already rounded to the wire dtype).
    Full(Arc<Vec<NamedTensor>>),
    /// lz4-compressed changed elements since the previous version (see [`crate::sync`]).
    Delta {
        /// The version this delta applies to (the previously published one).
        base: PolicyVersion,
        /// The dtype of the values.
        wire: crate::sync::WireDtype,
        /// The encoded delta.
        bytes: Arc<Vec<u8>>,
    },
}

impl WeightPayload {
    /// Bytes on the wire (f32 values for full payloads of f32-exact tensors).
    pub fn wire_bytes(&self) -> usize {
        match self {
            WeightPayload::Full(t) => t.iter().map(|t| t.values.len() * 4).sum(),
            WeightPayload::Delta { bytes, .. } => bytes.len(),
        }
    }
}

/// New weights published by the trainer after an optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightUpdate {
    /// The version these weights are.
    pub version: PolicyVersion,
    /// The weights, full or as a delta from the previous version.
    pub payload: WeightPayload,
}

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
