//! What the rollout pool sends the trainer: groups of scored completions, each tagged with the
//! policy version that sampled it.

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
    /// The GRAIL proof's commitment to each completion token (the sketch of the hidden state it
    /// was sampled from, [`crate::proof`]), or empty when the worker made none.
    pub sketches: Vec<u32>,
}

impl Sample {
    /// A sample whose every token came from one policy version, without sketches.
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
            sketches: Vec::new(),
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
