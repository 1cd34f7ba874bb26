//! What an optimizer step reports ([`StepMetrics`]) and how each number is computed: the
//! batch's part once per batch (rewards, staleness, filtering, sizes), the step's part from what
//! its pass and its update measured.

use grail_core::model::ModelConfig;
use grail_protocol::{Group, PolicyVersion, Sample};

use crate::advantages::Advantages;
use crate::batch::{Batch, Sequence};
use crate::config::TrainerConfig;
use crate::flops::train_flops;
use crate::loss::LossStats;
use crate::off_policy::ImportanceSamplingStats;

/// What one optimizer step did and measured.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct StepMetrics {
    /// Optimizer steps taken so far (after this one).
    pub step: usize,
    /// Policy version of the weights after this step.
    pub policy_version: PolicyVersion,
    /// The GRPO loss of the step (before the update).
    pub loss: f64,
    /// Mean k3 KL to the reference model per completion token (0 when beta = 0).
    pub kl: f64,
    /// TRL's clip ratio: tokens clipped in the direction that matters / completion tokens.
    pub clip_ratio: f64,
    /// Fraction of tokens clipped low with a negative advantage.
    pub clip_ratio_low: f64,
    /// Fraction of tokens clipped high with a positive advantage.
    pub clip_ratio_high: f64,
    /// Fraction of tokens whose ratio left the trust region.
    pub clip_ratio_region: f64,
    /// Mean entropy of the policy over completion tokens.
    pub entropy: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Mean total reward of the batch's samples.
    pub reward_mean: f64,
    /// Mean of each reward function (unweighted), in the environment's order.
    pub reward_means: Vec<f64>,
    /// Mean completion length (tokens).
    pub completion_length_mean: f64,
    /// Shortest completion.
    pub completion_length_min: usize,
    /// Longest completion.
    pub completion_length_max: usize,
    /// How many samples were 0, 1, 2, ... versions behind the weights they were trained with
    /// (by the oldest of their tokens).
    pub staleness_histogram: Vec<usize>,
    /// How many completion tokens were 0, 1, 2, ... versions behind (differs from the sample
    /// histogram only with in-flight weight updates).
    pub token_staleness_histogram: Vec<usize>,
    /// Completions whose tokens came from more than one policy version.
    pub mixed_version_samples: usize,
    /// Smallest importance ratio π_prox / π_behav (per token or per sequence, as the mode says),
    /// before truncation or masking. `None` when the trainer did not recompute π_prox.
    pub importance_sampling_ratio_min: Option<f64>,
    /// Mean importance ratio (see `importance_sampling_ratio_min`).
    pub importance_sampling_ratio_mean: Option<f64>,
    /// Largest importance ratio (see `importance_sampling_ratio_min`).
    pub importance_sampling_ratio_max: Option<f64>,
    /// Fraction of completion tokens the correction masked (weight 0).
    pub importance_sampling_masked_fraction: Option<f64>,
    /// Mean |log π_prox − log π_behav| per completion token.
    pub behaviour_logp_diff_mean: Option<f64>,
    /// Largest |log π_prox − log π_behav| over completion tokens.
    pub behaviour_logp_diff_max: Option<f64>,
    /// Standard deviation of the total reward.
    pub reward_std: f64,
    /// Fraction of groups whose rewards had zero spread.
    pub frac_reward_zero_std: f64,
    /// Groups dropped because their rewards had zero spread (when filtering).
    pub dropped_zero_std_groups: usize,
    /// Samples in those groups.
    pub dropped_zero_std_samples: usize,
    /// Sequences trained on.
    pub sequences: usize,
    /// Real tokens (prompt + completion) processed.
    pub real_tokens: usize,
    /// Completion tokens in the loss.
    pub completion_tokens: usize,
    /// Micro-batches the step was split into.
    pub micro_batches: usize,
    /// Real tokens / allocated token slots (1.0 when packed; padding lowers it).
    pub packing_efficiency: f64,
    /// Wall time of the step: forward, loss, backward, optimizer, and (on a batch's first pass)
    /// the preparation, including the no-grad π_prox / reference forwards.
    pub seconds: f64,
    /// Where that time went.
    pub times: StepTimes,
    /// Real tokens per second.
    pub tokens_per_s: f64,
    /// Counted matmul FLOPs of the step (see [`crate::flops`]).
    pub flops: f64,
    /// FLOPs / seconds / the device's peak, when the trainer was given one
    /// ([`GrpoTrainer::with_peak_flops`](crate::GrpoTrainer::with_peak_flops)).
    pub mfu: Option<f64>,
}

/// Where a step's wall time went (seconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StepTimes {
    /// Advantages, packing and the no-grad forwards for π_prox and the reference model (counted
    /// on a batch's first pass only).
    pub prepare_s: f64,
    /// Model forward to the final hidden states.
    pub forward_s: f64,
    /// Log-probs, loss, and its gradients for the hidden states and the lm_head (fused kernels).
    pub loss_s: f64,
    /// Autodiff backward through the model and gradient accumulation.
    pub backward_s: f64,
    /// Gradient-norm clipping and the AdamW update.
    pub optimizer_s: f64,
}

/// What a batch of groups says, the same for every pass over it: rewards, staleness, filtering,
/// the behaviour-policy gap, and the sizes the throughput numbers need.
pub(crate) struct BatchMetrics {
    reward_mean: f64,
    reward_std: f64,
    reward_means: Vec<f64>,
    staleness: Vec<usize>,
    token_staleness: Vec<usize>,
    mixed_version_samples: usize,
    importance_sampling: Option<ImportanceSamplingStats>,
    frac_reward_zero_std: f64,
    dropped_groups: usize,
    dropped_samples: usize,
    sequences: usize,
    real_tokens: usize,
    completion_lens: Vec<usize>,
    flops: f64,
}

impl BatchMetrics {
    /// The metrics of `groups`, whose advantages are `adv` and whose kept samples make up `batch`,
    /// trained on `model` at policy `version`; `importance_sampling` when π_prox was recomputed.
    pub(crate) fn new(
        groups: &[Group],
        adv: &Advantages,
        batch: &Batch,
        model: &ModelConfig,
        config: &TrainerConfig,
        version: PolicyVersion,
        importance_sampling: Option<ImportanceSamplingStats>,
    ) -> Self {
        let all: Vec<&Sample> = groups.iter().flat_map(|g| &g.samples).collect();
        let reward_means = (0..config.reward_weights.len())
            .map(|k| all.iter().map(|s| s.rewards[k] as f64).sum::<f64>() / all.len().max(1) as f64)
            .collect();
        // How many versions behind `version` each of `versions` is, as a histogram.
        let histogram = |versions: &mut dyn Iterator<Item = u64>| {
            let mut h = Vec::new();
            for v in versions {
                let lag = version.saturating_sub(v) as usize;
                if h.len() <= lag {
                    h.resize(lag + 1, 0);
                }
                h[lag] += 1;
            }
            h
        };
        let dropped: Vec<&Group> = (0..groups.len())
            .filter(|g| !adv.kept.contains(g))
            .map(|g| &groups[g])
            .collect();
        let lens: Vec<usize> = batch.sequences.iter().map(|s| s.tokens.len()).collect();
        let completion_lens: Vec<usize> = batch
            .sequences
            .iter()
            .map(Sequence::completion_len)
            .collect();
        Self {
            reward_mean: adv.reward_mean,
            reward_std: adv.reward_std,
            reward_means,
            staleness: histogram(&mut all.iter().map(|s| s.policy_version)),
            token_staleness: histogram(
                &mut all.iter().flat_map(|s| s.token_versions.iter().copied()),
            ),
            mixed_version_samples: all.iter().filter(|s| s.spans_versions()).count(),
            importance_sampling,
            frac_reward_zero_std: adv.zero_std_groups as f64 / groups.len() as f64,
            dropped_groups: dropped.len(),
            dropped_samples: dropped.iter().map(|g| g.samples.len()).sum(),
            sequences: batch.sequences.len(),
            real_tokens: lens.iter().sum(),
            flops: train_flops(model, &lens, &completion_lens),
            completion_lens,
        }
    }
}

/// What one optimizer step measured: its pass over the batch, its update, and where it leaves
/// the trainer.
pub(crate) struct StepMeasurements {
    pub(crate) loss: LossStats,
    pub(crate) micro_batches: usize,
    pub(crate) allocated_tokens: usize,
    pub(crate) times: StepTimes,
    pub(crate) grad_norm: f64,
    pub(crate) lr: f64,
    pub(crate) seconds: f64,
    /// Optimizer steps taken, this one included.
    pub(crate) step: usize,
    pub(crate) policy_version: PolicyVersion,
    /// The device's measured peak FLOP/s, when MFU is reported.
    pub(crate) peak_flops: Option<f64>,
}

impl StepMetrics {
    /// The metrics of one step over a batch.
    pub(crate) fn new(batch: &BatchMetrics, m: StepMeasurements) -> Self {
        let s = m.loss;
        let tokens = s.tokens.max(1) as f64;
        let completion = &batch.completion_lens;
        let is = batch.importance_sampling;
        let real = batch.real_tokens;
        StepMetrics {
            step: m.step,
            policy_version: m.policy_version,
            loss: s.loss,
            kl: s.kl(),
            clip_ratio: s.clip_ratio(),
            clip_ratio_low: s.clipped_low / tokens,
            clip_ratio_high: s.clipped_high / tokens,
            clip_ratio_region: s.outside_region / tokens,
            entropy: s.entropy(),
            grad_norm: m.grad_norm,
            lr: m.lr,
            reward_mean: batch.reward_mean,
            reward_means: batch.reward_means.clone(),
            completion_length_mean: completion.iter().sum::<usize>() as f64
                / completion.len().max(1) as f64,
            completion_length_min: completion.iter().copied().min().unwrap_or(0),
            completion_length_max: completion.iter().copied().max().unwrap_or(0),
            staleness_histogram: batch.staleness.clone(),
            token_staleness_histogram: batch.token_staleness.clone(),
            mixed_version_samples: batch.mixed_version_samples,
            importance_sampling_ratio_min: is.map(|s| s.ratio_min),
            importance_sampling_ratio_mean: is.map(|s| s.ratio_mean),
            importance_sampling_ratio_max: is.map(|s| s.ratio_max),
            importance_sampling_masked_fraction: is.map(|s| s.masked_fraction()),
            behaviour_logp_diff_mean: is.map(|s| s.logp_diff_mean()),
            behaviour_logp_diff_max: is.map(|s| s.logp_diff_max),
            reward_std: batch.reward_std,
            frac_reward_zero_std: batch.frac_reward_zero_std,
            dropped_zero_std_groups: batch.dropped_groups,
            dropped_zero_std_samples: batch.dropped_samples,
            sequences: batch.sequences,
            real_tokens: real,
            completion_tokens: s.tokens,
            micro_batches: m.micro_batches,
            packing_efficiency: real as f64 / m.allocated_tokens.max(1) as f64,
            seconds: m.seconds,
            times: m.times,
            tokens_per_s: real as f64 / m.seconds,
            flops: batch.flops,
            mfu: m.peak_flops.map(|peak| batch.flops / m.seconds / peak),
        }
    }
}
