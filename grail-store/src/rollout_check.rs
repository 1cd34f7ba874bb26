//! What the trainer checks in a rollout object before any of it can be trained on: it was made
//! for this run (rewards, group size) by a policy the trainer published, and its numbers are
//! usable. A failed check rejects the whole object.

use grail_protocol::PolicyVersion;

use crate::rollout_batch::RolloutBatch;

/// The run's shape, as the trainer knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutCheck {
    /// Token ids must be below this.
    pub vocab_size: usize,
    /// Samples per group.
    pub num_generations: usize,
    /// Longest completion, in tokens.
    pub max_completion_length: usize,
    /// The reward functions' names, in order.
    pub reward_names: Vec<String>,
}

impl RolloutCheck {
    /// `Ok` when every group of `batch` could have come from this run's workers sampling with a
    /// policy no newer than `newest` (the newest version the trainer published); otherwise what
    /// is wrong, naming the prompt and sample.
    pub fn check(&self, batch: &RolloutBatch, newest: PolicyVersion) -> Result<(), String> {
        if batch.reward_names != self.reward_names {
            return Err(format!(
                "rewards {:?}, this run's are {:?}",
                batch.reward_names, self.reward_names
            ));
        }
        let vocab = self.vocab_size as u64;
        for g in &batch.groups {
            let at = |i: usize| format!("prompt {} sample {i}", g.prompt_id);
            if g.samples.len() != self.num_generations {
                return Err(format!(
                    "prompt {}: {} samples, num_generations is {}",
                    g.prompt_id,
                    g.samples.len(),
                    self.num_generations
                ));
            }
            if let Some(t) = g.prompt_ids.iter().find(|&&t| t as u64 >= vocab) {
                return Err(format!(
                    "prompt {}: prompt token {t} is outside the vocabulary ({vocab})",
                    g.prompt_id
                ));
            }
            for (i, s) in g.samples.iter().enumerate() {
                if s.completion_ids.len() > self.max_completion_length {
                    return Err(format!(
                        "{}: {} completion tokens (at most {} allowed)",
                        at(i),
                        s.completion_ids.len(),
                        self.max_completion_length
                    ));
                }
                if let Some(t) = s.completion_ids.iter().find(|&&t| t as u64 >= vocab) {
                    return Err(format!(
                        "{}: token {t} is outside the vocabulary ({vocab})",
                        at(i)
                    ));
                }
                if let Some(l) = s
                    .behaviour_logps
                    .iter()
                    .find(|l| !(l.is_finite() && **l <= 0.0))
                {
                    return Err(format!(
                        "{}: behaviour log-prob {l} is not a log-probability",
                        at(i)
                    ));
                }
                if s.rewards.len() != self.reward_names.len()
                    || s.rewards.iter().any(|r| !r.is_finite())
                {
                    return Err(format!("{}: rewards {:?}", at(i), s.rewards));
                }
                let oldest = s.token_versions.iter().copied().min();
                if oldest != Some(s.policy_version) {
                    return Err(format!(
                        "{}: policy_version {} is not the oldest token version",
                        at(i),
                        s.policy_version
                    ));
                }
                if let Some(v) = s.token_versions.iter().find(|&&v| v > newest) {
                    return Err(format!(
                        "{}: version {v} was never published (newest: {newest})",
                        at(i)
                    ));
                }
            }
        }
        Ok(())
    }
}
