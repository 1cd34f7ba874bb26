//! Trainer hyper-parameters, named as TRL's `GRPOConfig` names them where it has them.

use grail_kernels::ChunkSizes;

use crate::advantages::ScaleRewards;
use crate::error::{Result, TrainerError};
use crate::loss::GrpoLossConfig;
use crate::off_policy::{ImportanceSamplingCorrection, ImportanceSamplingMode};
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
    /// for comparison in tests and benchmarks only).
    #[doc(hidden)]
    pub packing: bool,
    /// Correct for the gap between the rollout's behaviour policy and the trainer's proximal
    /// policy (see [`crate::off_policy`]). Default on.
    pub importance_sampling_correction: bool,
    /// token_truncate | token_mask | sequence_truncate | sequence_mask (default, as TRL).
    pub importance_sampling_mode: ImportanceSamplingMode,
    /// C: the truncation cap, and the default mask range `[1/C, C]`. Default 3.0.
    pub importance_sampling_cap: f64,
    /// Lower edge of the mask range (default 1/C).
    pub importance_sampling_mask_low: Option<f64>,
    /// Upper edge of the mask range (default C).
    pub importance_sampling_mask_high: Option<f64>,
    /// AReaL's decoupled PPO objective (default on): the clipped ratio is π_θ / π_prox (the
    /// trainer's log-probs at the start of the step) and the behaviour weight π_prox / π_behav is
    /// truncated or masked by the correction above. Off: the clipped ratio is π_θ / π_behav
    /// (classic PPO against the sampler) and there is no separate behaviour weight.
    pub use_decoupled_loss: bool,
    /// Gradient (activation) checkpointing: keep only each decoder layer's input in the forward
    /// and recompute the layers one at a time in the backward (TRL's and transformers' name).
    /// Less memory for one more forward of the layers; the same gradients. Default off.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Tiles of the fused log-prob op.
    pub logprob_chunks: ChunkSizes,
    /// Use the unfused log_softmax + gather path (for comparison in tests and benchmarks only).
    #[doc(hidden)]
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
            importance_sampling_correction: true,
            importance_sampling_mode: ImportanceSamplingMode::SequenceMask,
            importance_sampling_cap: 3.0,
            importance_sampling_mask_low: None,
            importance_sampling_mask_high: None,
            use_decoupled_loss: true,
            gradient_checkpointing: false,
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
        self.importance_sampling().validate()?;
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

impl TrainerConfig {
    /// The importance-sampling settings, whether or not the correction is on.
    pub fn importance_sampling(&self) -> ImportanceSamplingCorrection {
        ImportanceSamplingCorrection {
            mode: self.importance_sampling_mode,
            cap: self.importance_sampling_cap,
            mask_low: self.importance_sampling_mask_low,
            mask_high: self.importance_sampling_mask_high,
        }
    }

    /// The behaviour-weight correction the loss applies: only with the decoupled objective (in the
    /// classic one the sampler *is* the old policy, so its weight is 1 by definition).
    pub fn behaviour_correction(&self) -> Option<ImportanceSamplingCorrection> {
        (self.importance_sampling_correction && self.use_decoupled_loss)
            .then(|| self.importance_sampling())
    }
}
