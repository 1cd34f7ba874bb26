//! Trainer hyper-parameters, named as TRL's `GRPOConfig` names them where it has them.

use grail_core::fused::ChunkSizes;

use crate::advantages::ScaleRewards;
use crate::error::{Result, TrainerError};
use crate::loss::GrpoLossConfig;
use crate::schedule::LrSchedulerType;

/// Everything one optimizer step needs to know.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainerConfig {
    /// Peak learning rate (AdamW).
    pub learning_rate: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW β₁.
    pub adam_beta1: f64,
    /// AdamW β₂.
    pub adam_beta2: f64,
    /// AdamW ε.
    pub adam_epsilon: f64,
    /// Global gradient-norm clip (0 disables).
    pub max_grad_norm: f64,
    /// Schedule after warm-up.
    pub lr_scheduler_type: LrSchedulerType,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// Total optimizer steps (the schedule's horizon).
    pub max_steps: usize,
    /// Optimizer steps per batch of groups (μ); old log-probs are computed once per batch.
    pub num_iterations: usize,
    /// The GRPO loss.
    pub loss: GrpoLossConfig,
    /// Advantage scaling.
    pub scale_rewards: ScaleRewards,
    /// Weight of each reward function in the total reward.
    pub reward_weights: Vec<f32>,
    /// Drop groups whose rewards are all equal (they carry no gradient), counting them.
    pub filter_zero_std_groups: bool,
    /// Token budget of one micro-batch.
    pub max_tokens_per_microbatch: usize,
    /// Pack sequences into rows (true) or pad each micro-batch to its longest sequence (false,
    /// for comparison only).
    pub packing: bool,
    /// Cap C of the truncated importance-sampling correction `min(π_old / π_behaviour, C)` per
    /// token between trainer and rollout log-probs; `None` disables it.
    pub importance_sampling_cap: Option<f64>,
    /// Tiles of the fused log-prob op.
    pub logprob_chunks: ChunkSizes,
    /// Use the unfused log_softmax + gather path (for comparison only).
    pub naive_logprob: bool,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            learning_rate: 1e-6,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            lr_scheduler_type: LrSchedulerType::Constant,
            warmup_steps: 0,
            max_steps: 1000,
            num_iterations: 1,
            loss: GrpoLossConfig::default(),
            scale_rewards: ScaleRewards::Group,
            reward_weights: vec![1.0],
            filter_zero_std_groups: false,
            max_tokens_per_microbatch: 4096,
            packing: true,
            importance_sampling_cap: None,
            logprob_chunks: ChunkSizes::default(),
            naive_logprob: false,
        }
    }
}

impl TrainerConfig {
    /// Checks every value's range, naming the key.
    pub fn validate(&self) -> Result<()> {
        self.loss.validate()?;
        let nonneg = |k: &str, v: f64| {
            if v >= 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(TrainerError::config(k, v, "must be a finite number ≥ 0"))
            }
        };
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(TrainerError::config(
                "learning_rate",
                self.learning_rate,
                "must be positive",
            ));
        }
        nonneg("weight_decay", self.weight_decay)?;
        nonneg("max_grad_norm", self.max_grad_norm)?;
        for (k, v) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(TrainerError::config(k, v, "must be in [0, 1)"));
            }
        }
        if self.adam_epsilon.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            return Err(TrainerError::config(
                "adam_epsilon",
                self.adam_epsilon,
                "must be positive",
            ));
        }
        if self.num_iterations == 0 {
            return Err(TrainerError::config(
                "num_iterations",
                0,
                "must be at least 1",
            ));
        }
        if self.max_tokens_per_microbatch == 0 {
            return Err(TrainerError::config(
                "max_tokens_per_microbatch",
                0,
                "must be positive",
            ));
        }
        if self.reward_weights.is_empty() || self.reward_weights.iter().any(|w| !w.is_finite()) {
            return Err(TrainerError::config(
                "reward_weights",
                format!("{:?}", self.reward_weights),
                "need at least one finite weight",
            ));
        }
        if let Some(c) = self.importance_sampling_cap
            && !(c >= 1.0 && c.is_finite())
        {
            return Err(TrainerError::config(
                "importance_sampling_cap",
                c,
                "must be ≥ 1",
            ));
        }
        if self.logprob_chunks.tokens == 0 || self.logprob_chunks.vocab == 0 {
            return Err(TrainerError::config(
                "logprob_chunks",
                format!("{:?}", self.logprob_chunks),
                "chunk sizes must be positive",
            ));
        }
        Ok(())
    }
}
