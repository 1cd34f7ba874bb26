//! The GRPO family of losses, named and computed as TRL's `GRPOTrainer` and Liger-Kernel's
//! `LigerFusedLinearGRPOLoss` do, on top of the fused chunked log-probs.
//!
//! The loss itself is written once, as tensor math on a `[sequences, max_completion_tokens]` grid
//! of per-token log-probs (tiny next to the model).
//! [`grpo_loss`] is its one entry point; a [`LogProbPath`] says how the log-probs and their
//! gradients come from the hidden states and the lm_head. On the fused paths the `[tokens × vocab]`
//! logits never exist.
//!
//! Normalisers come from the whole optimizer step ([`StepNormalizer`]), not from the micro-batch,
//! so that gradients accumulated over micro-batches do not depend on how the step was split.

mod config;
mod inputs;
mod objective;

use burn::tensor::{Int, Tensor, TensorData};
use grail_kernels::{
    ChunkSizes, gradient_surrogate, selective_logprobs_backward, selective_logprobs_forward,
};

pub use config::{GrpoLossConfig, ImportanceSamplingLevel, LossType};
pub use inputs::{LossBatch, StepNormalizer};

use crate::error::Result;
use objective::{PolicyLoss, grid, host_f32, loss_on_grid, stats, total};

/// How the per-token log-probs, and the loss's gradients through them, are computed from the
/// hidden states and the lm_head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogProbPath {
    /// log_softmax + gather over the full `[tokens × vocab]` logits under autodiff: the unfused
    /// reference, to measure what fusion saves and to cross-check it.
    Reference,
    /// The chunked fused log-prob kernels on plain tensors, on every backend: autodiff of the
    /// small loss graph gives `dL/dlogp`, the chunked backward turns it into `dL/dhidden` and
    /// `dL/dweight` tile by tile, and [`gradient_surrogate`] hands those to the model's graph.
    Fused(ChunkSizes),
    /// The differentiable fused op ([`grail_kernels::selective_logprobs`]) as one node on
    /// the model's graph, whose backward recomputes each tile: one backward through loss, op and
    /// model. Needs a backend with the fused kernels (`grail_kernels::supported`).
    FusedAutodiff(ChunkSizes),
}

/// What one loss call returns.
#[derive(Debug)]
pub struct GrpoLoss {
    /// What the call measured; the loss value is `stats.loss`.
    pub stats: LossStats,
    /// A scalar on the autodiff graph of `hidden` and `weight` whose `backward()` delivers the
    /// loss's gradients to them: the loss itself, or on [`LogProbPath::Fused`] a surrogate with the
    /// same gradients (whose value is not the loss).
    pub objective: Tensor<1>,
}

/// What one loss call measured. Sums are over this call's tokens; divide by the step's token count
/// for means (so micro-batches add up).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossStats {
    /// This call's share of the step loss (already divided by the step normaliser).
    pub loss: f64,
    /// Σ k3 KL over tokens (0 when beta = 0).
    pub kl_sum: f64,
    /// Tokens whose ratio was clipped low while the advantage is negative.
    pub clipped_low: f64,
    /// Tokens whose ratio was clipped high while the advantage is positive.
    pub clipped_high: f64,
    /// Tokens whose ratio left the trust region, whatever the advantage.
    pub outside_region: f64,
    /// Σ entropy over tokens.
    pub entropy_sum: f64,
    /// Tokens in this call.
    pub tokens: usize,
}

impl LossStats {
    /// Adds another call's stats (micro-batch accumulation).
    pub fn add(&mut self, o: &LossStats) {
        self.loss += o.loss;
        self.kl_sum += o.kl_sum;
        self.clipped_low += o.clipped_low;
        self.clipped_high += o.clipped_high;
        self.outside_region += o.outside_region;
        self.entropy_sum += o.entropy_sum;
        self.tokens += o.tokens;
    }

    /// TRL's `clip_ratio`: clipped tokens (in the direction that matters) over all tokens.
    pub fn clip_ratio(&self) -> f64 {
        (self.clipped_low + self.clipped_high) / self.tokens.max(1) as f64
    }

    /// Mean KL per token.
    pub fn kl(&self) -> f64 {
        self.kl_sum / self.tokens.max(1) as f64
    }

    /// Mean entropy per token.
    pub fn entropy(&self) -> f64 {
        self.entropy_sum / self.tokens.max(1) as f64
    }
}

/// The GRPO loss of one batch of completion tokens, its stats, and what to call `backward()` on.
///
/// `hidden` `[tokens, hidden]` holds the final hidden states that predict each completion token,
/// `weight` the lm_head `[vocab, hidden]`; both on an autodiff graph (the model's, or leaves that
/// require grad). `targets` are the completion tokens, `batch` places them on the loss grid and
/// `norm` holds the whole step's normalisers.
pub fn grpo_loss(
    path: LogProbPath,
    cfg: &GrpoLossConfig,
    norm: StepNormalizer,
    batch: &LossBatch,
    hidden: Tensor<2>,
    weight: Tensor<2>,
    targets: Tensor<1, Int>,
) -> Result<GrpoLoss> {
    batch.validate(cfg, hidden.dims()[0], &targets)?;
    Ok(match path {
        LogProbPath::Reference => reference(cfg, norm, batch, hidden, weight, targets),
        LogProbPath::Fused(chunks) => fused(cfg, norm, batch, hidden, weight, targets, chunks),
        LogProbPath::FusedAutodiff(chunks) => {
            fused_autodiff(cfg, norm, batch, hidden, weight, targets, chunks)
        }
    })
}

/// [`LogProbPath::Reference`].
fn reference(
    cfg: &GrpoLossConfig,
    norm: StepNormalizer,
    batch: &LossBatch,
    hidden: Tensor<2>,
    weight: Tensor<2>,
    targets: Tensor<1, Int>,
) -> GrpoLoss {
    let n = hidden.dims()[0];
    let logits = hidden.matmul(weight.transpose()) / cfg.temperature;
    let logprobs = burn::tensor::activation::log_softmax(logits, 1);
    let entropy_sum = total(logprobs.clone().exp() * logprobs.clone())
        .neg()
        .into_scalar::<f64>();
    let logp = logprobs.gather(1, targets.reshape([n, 1])).reshape([n]);
    loss_of_logp(cfg, norm, batch, logp, entropy_sum)
}

/// [`LogProbPath::Fused`].
fn fused(
    cfg: &GrpoLossConfig,
    norm: StepNormalizer,
    batch: &LossBatch,
    hidden: Tensor<2>,
    weight: Tensor<2>,
    targets: Tensor<1, Int>,
    chunks: ChunkSizes,
) -> GrpoLoss {
    let n = hidden.dims()[0];
    let h = hidden.clone().without_autodiff();
    let w = weight.clone().without_autodiff();
    let targets = targets.without_autodiff();
    let fwd = selective_logprobs_forward(&h, &w, &targets, cfg.temperature, chunks, true);
    let logp_host = host_f32(fwd.logp.clone());
    let entropy_sum = total(fwd.entropy.clone().expect("asked for")).into_scalar::<f64>();

    // The loss on a small autodiff graph whose only leaf is the [sequences × width] logp grid.
    let device = h.device().autodiff();
    let logp = grid(
        &logp_host,
        &batch.cells,
        batch.sequences * batch.width,
        &device,
        batch.sequences,
        batch.width,
    )
    .require_grad();
    let PolicyLoss { loss, metrics } = loss_on_grid(cfg, norm, batch, logp.clone(), &logp_host);
    let loss_value = loss.clone().into_scalar::<f64>();
    let grads = loss.backward();
    let grad_grid = logp.grad(&grads).expect("logp is a leaf of the loss");
    let grad_grid = host_f32(grad_grid.reshape([batch.sequences * batch.width]));
    let grad_logp: Vec<f32> = batch.cells.iter().map(|&c| grad_grid[c]).collect();
    let grad_logp = Tensor::<1>::from_data(TensorData::new(grad_logp, [n]), &h.device());
    let (gh, gw) = selective_logprobs_backward(
        &h,
        &w,
        &targets,
        &fwd.lse,
        &grad_logp,
        cfg.temperature,
        chunks,
    );
    GrpoLoss {
        stats: stats(loss_value, metrics, entropy_sum, n),
        objective: gradient_surrogate(hidden, weight, gh, gw),
    }
}

/// [`LogProbPath::FusedAutodiff`].
fn fused_autodiff(
    cfg: &GrpoLossConfig,
    norm: StepNormalizer,
    batch: &LossBatch,
    hidden: Tensor<2>,
    weight: Tensor<2>,
    targets: Tensor<1, Int>,
    chunks: ChunkSizes,
) -> GrpoLoss {
    let (logp, entropy) =
        grail_kernels::selective_logprobs(hidden, weight, targets, cfg.temperature, chunks, true);
    let entropy_sum = total(entropy).into_scalar::<f64>();
    loss_of_logp(cfg, norm, batch, logp, entropy_sum)
}

/// The loss and its stats from per-token log-probs `logp` `[tokens]` (aligned with
/// `batch.cells`, on whatever autodiff graph produced them) and the entropy sum.
fn loss_of_logp(
    cfg: &GrpoLossConfig,
    norm: StepNormalizer,
    batch: &LossBatch,
    logp: Tensor<1>,
    entropy_sum: f64,
) -> GrpoLoss {
    let n = logp.dims()[0];
    let device = logp.device();
    let logp_host = host_f32(logp.clone().without_autodiff());
    // Scatter the token log-probs into the grid (cells without a token read the appended zero).
    let size = batch.sequences * batch.width;
    let mut source = vec![n as i64; size];
    for (i, &c) in batch.cells.iter().enumerate() {
        source[c] = i as i64;
    }
    let source = Tensor::<1, Int>::from_data(TensorData::new(source, [size]), &device);
    let padded = Tensor::cat(vec![logp, Tensor::zeros([1], &device)], 0);
    let logp_grid = padded
        .select(0, source)
        .reshape([batch.sequences, batch.width]);
    let PolicyLoss { loss, metrics } = loss_on_grid(cfg, norm, batch, logp_grid, &logp_host);
    let loss_value = loss.clone().into_scalar::<f64>();
    GrpoLoss {
        stats: stats(loss_value, metrics, entropy_sum, n),
        objective: loss,
    }
}
