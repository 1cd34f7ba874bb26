//! Environments: where prompts come from and how completions are scored.
//!
//! An [`Environment`] hands out prompts by index (deterministic, so a run is reproducible and
//! workers can share one source through a counter) and names its reward functions with weights.
//! Rewards are plain functions `fn(&Prompt, &Completion) -> f32`; the rollout pool runs them on
//! rayon, off the generation thread, and treats a panic or a NaN as a failed group.

use std::sync::Arc;

use grail_core::Result;

/// A prompt with what its rewards need to judge a completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// Identifier (also seeds the prompt's sampling streams).
    pub id: u64,
    /// Prompt text as shown to the model (after any chat template).
    pub text: String,
    /// Prompt token ids.
    pub ids: Arc<Vec<u32>>,
    /// The reference answer, if the task has one.
    pub answer: String,
    /// Anything else a reward function needs (task parameters), as JSON.
    pub metadata: serde_json::Value,
}

/// A completion as rewards see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Completion token ids.
    pub ids: Vec<u32>,
    /// Decoded completion text.
    pub text: String,
    /// Whether it ended on its own (EOS or stop sequence) rather than at the length limit.
    pub finished: bool,
}

/// A reward function.
pub type RewardFn = Arc<dyn Fn(&Prompt, &Completion) -> f32 + Send + Sync>;

/// A named, weighted reward function.
#[derive(Clone)]
pub struct Reward {
    /// Name used in metrics (`reward/<name>`).
    pub name: String,
    /// Weight in the total reward.
    pub weight: f32,
    /// The function.
    pub func: RewardFn,
}

impl std::fmt::Debug for Reward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reward")
            .field("name", &self.name)
            .field("weight", &self.weight)
            .finish()
    }
}

impl Reward {
    /// A reward called `name` with `weight`.
    pub fn new(
        name: impl Into<String>,
        weight: f32,
        func: impl Fn(&Prompt, &Completion) -> f32 + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            weight,
            func: Arc::new(func),
        }
    }
}

/// A task: a prompt source and its reward functions.
pub trait Environment: Send + Sync {
    /// The prompt with this index, `Ok(None)` when the source is exhausted, or an error (a text
    /// the tokenizer cannot encode, say) that stops the run.
    fn prompt(&self, index: u64) -> Result<Option<Prompt>>;

    /// The reward functions, in the order their values appear in each sample.
    fn rewards(&self) -> &[Reward];

    /// Text of completion tokens (for reward functions that read text).
    fn decode(&self, ids: &[u32]) -> String;

    /// A correct completion of `prompt` to imitate in the SFT warm-up, if the task has one.
    fn reference_completion(&self, _prompt: &Prompt) -> Option<String> {
        None
    }
}

/// Every reward of `env` for `completion` of `prompt`, in order; an error naming the reward that
/// panicked or returned a value that is not finite. The pool scores its groups with it, and the
/// trainer recomputes a worker's rewards with it.
pub fn score(
    env: &dyn Environment,
    prompt: &Prompt,
    completion: &Completion,
) -> std::result::Result<Vec<f32>, String> {
    env.rewards()
        .iter()
        .map(|r| {
            let value = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                (r.func)(prompt, completion)
            }))
            .map_err(|p| {
                let msg = grail_protocol::panic_message(p.as_ref());
                format!("reward `{}` panicked: {msg}", r.name)
            })?;
            if value.is_finite() {
                Ok(value)
            } else {
                Err(format!("reward `{}` returned {value}", r.name))
            }
        })
        .collect()
}
