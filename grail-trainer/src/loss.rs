//! The GRPO family of losses, named and computed as TRL's `GRPOTrainer` and Liger-Kernel's
//! `LigerFusedLinearGRPOLoss` do, on top of the fused chunked log-probs.
//!
//! The loss itself is written once, as tensor math on a `[sequences, max_completion_tokens]` grid
//! of per-token log-probs (tiny next to the model): autodiff of that small graph gives `dL/dlogp`,
//! and the fused op turns it into `dL/dhidden` and `dL/dW` tile by tile, so the
//! `[tokens × vocab]` logits never exist.
//!
//! Normalisers come from the whole optimizer step ([`StepNormalizer`]), not from the micro-batch,
//! so that gradients accumulated over micro-batches do not depend on how the step was split.

use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Int, Tensor, TensorData};
use grail_kernels::{ChunkSizes, selective_logprobs_backward, selective_logprobs_forward};

use crate::error::{Result, TrainerError};

/// The policy-loss variants, as TRL names them (`loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Per-sequence token mean, then mean over sequences.
    Grpo,
    /// Token sum over the step's completion-token count (batch-normalised).
    Bnpo,
    /// Token sum over (sequences × max_completion_length).
    DrGrpo,
    /// Token sum over the step's completion-token count (DAPO).
    Dapo,
    /// Clipped, detached importance weight times log-prob (MiniMax CISPO).
    Cispo,
    /// Soft sigmoid gate instead of hard clipping (SAPO), GRPO normalisation.
    Sapo,
}

/// Where the importance ratio is taken (`importance_sampling_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceSamplingLevel {
    /// One ratio per token (GRPO).
    Token,
    /// One ratio per sequence: exp of the mean token log-ratio (GSPO).
    Sequence,
}

/// Loss hyper-parameters, under TRL's names.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GrpoLossConfig {
    /// Loss variant.
    pub loss_type: LossType,
    /// Token- or sequence-level importance ratio.
    pub importance_sampling_level: ImportanceSamplingLevel,
    /// Lower clip: ratios below `1 − epsilon_low` are clipped.
    pub epsilon_low: f64,
    /// Upper clip: ratios above `1 + epsilon_high` are clipped (CISPO: above `epsilon_high`).
    pub epsilon_high: f64,
    /// Two-sided clipping cap on the unclipped ratio (INTELLECT-2), if set.
    pub delta: Option<f64>,
    /// Weight of the k3 KL penalty against the reference model; 0 skips the reference entirely.
    pub beta: f64,
    /// Sampling temperature the log-probs are computed at.
    pub temperature: f64,
    /// Completion-length budget (the dr_grpo normaliser).
    pub max_completion_length: usize,
    /// SAPO gate temperature for positive advantages.
    pub sapo_temperature_pos: f64,
    /// SAPO gate temperature for negative advantages.
    pub sapo_temperature_neg: f64,
}

impl Default for GrpoLossConfig {
    /// TRL's defaults: dapo, token level, ε = 0.2 both sides, β = 0, T = 1.
    fn default() -> Self {
        Self {
            loss_type: LossType::Dapo,
            importance_sampling_level: ImportanceSamplingLevel::Token,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            delta: None,
            beta: 0.0,
            temperature: 1.0,
            max_completion_length: 256,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
        }
    }
}

impl GrpoLossConfig {
    /// Checks ranges and combinations, naming the offending key.
    pub fn validate(&self) -> Result<()> {
        let positive = |key: &str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(TrainerError::config(key, v, "must be a positive number"))
            }
        };
        positive("temperature", self.temperature)?;
        positive("epsilon_high", self.epsilon_high)?;
        if !(0.0..1.0).contains(&self.epsilon_low) {
            return Err(TrainerError::config(
                "epsilon",
                self.epsilon_low,
                "epsilon_low must be in [0, 1)",
            ));
        }
        if !(self.beta >= 0.0 && self.beta.is_finite()) {
            return Err(TrainerError::config("beta", self.beta, "must be ≥ 0"));
        }
        if let Some(d) = self.delta
            && !(d > 1.0 && d.is_finite())
        {
            return Err(TrainerError::config(
                "delta",
                d,
                "must be > 1 (a cap on the ratio)",
            ));
        }
        if self.max_completion_length == 0 {
            return Err(TrainerError::config(
                "max_completion_length",
                0,
                "must be positive",
            ));
        }
        positive("sapo_temperature_pos", self.sapo_temperature_pos)?;
        positive("sapo_temperature_neg", self.sapo_temperature_neg)?;
        if self.importance_sampling_level == ImportanceSamplingLevel::Sequence
            && matches!(self.loss_type, LossType::Cispo | LossType::Sapo)
        {
            return Err(TrainerError::config(
                "importance_sampling_level",
                "sequence",
                format!(
                    "not supported with loss_type {:?} (use token)",
                    self.loss_type
                ),
            ));
        }
        Ok(())
    }
}

/// Counts over the whole optimizer step that fix each loss type's normaliser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepNormalizer {
    /// Sequences in the step (grpo, sapo, dr_grpo).
    pub sequences: usize,
    /// Completion tokens in the step (bnpo, dapo, cispo; and the metric means).
    pub tokens: usize,
}

/// Per-token data of the sequences in one loss call, on a `[sequences, width]` grid. Token `i`
/// of the fused input sits at grid cell `cells[i]` (row-major); other cells are masked out.
#[derive(Debug, Clone)]
pub struct LossBatch {
    /// Number of sequences (grid rows).
    pub sequences: usize,
    /// Grid width (longest completion here).
    pub width: usize,
    /// Grid cell of each token row of the hidden states.
    pub cells: Vec<usize>,
    /// One advantage per sequence.
    pub advantages: Vec<f32>,
    /// Old (pre-update) log-prob per token, aligned with `cells`; `None` means "the current
    /// log-probs, detached" (TRL with `num_iterations = 1`: every ratio is exactly 1).
    pub old_logps: Option<Vec<f32>>,
    /// Reference-model log-prob per token (needed when beta > 0).
    pub ref_logps: Option<Vec<f32>>,
    /// Behaviour weight per token (π_prox / π_behav after truncation or masking, see
    /// [`crate::off_policy`]) multiplying the policy loss before the KL term, if used.
    pub is_ratio: Option<Vec<f32>>,
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

fn grid(
    values: &[f32],
    cells: &[usize],
    size: usize,
    device: &Device,
    rows: usize,
    cols: usize,
) -> Tensor<2> {
    let mut g = vec![0f32; size];
    for (&c, &v) in cells.iter().zip(values) {
        g[c] = v;
    }
    Tensor::from_data(TensorData::new(g, [rows, cols]), device)
}

/// The per-token policy loss and its normalisation, on grids (`logp` requires grad).
/// Returns the scalar loss and `(kl_sum, clipped_low, clipped_high, outside_region)`.
/// The grid tensors one loss call works on (`[sequences, width]`; `adv` is `[sequences, 1]`).
struct LossGrids {
    logp: Tensor<2>,
    old: Tensor<2>,
    mask: Tensor<2>,
    adv: Tensor<2>,
    reference: Option<Tensor<2>>,
    is_ratio: Option<Tensor<2>>,
}

fn policy_loss(
    cfg: &GrpoLossConfig,
    norm: StepNormalizer,
    grids: LossGrids,
) -> (Tensor<1>, [f64; 4]) {
    let LossGrids {
        logp,
        old,
        mask,
        adv,
        reference,
        is_ratio,
    } = grids;
    let log_ratio = logp.clone() - old;
    let tokens_per_seq = mask.clone().sum_dim(1).clamp_min(1.0);
    let log_w = match cfg.importance_sampling_level {
        ImportanceSamplingLevel::Token => log_ratio,
        ImportanceSamplingLevel::Sequence => {
            (log_ratio * mask.clone()).sum_dim(1) / tokens_per_seq.clone()
        }
    };
    let coef = log_w.exp();
    let (lo, hi) = match cfg.loss_type {
        LossType::Cispo => (f64::NEG_INFINITY, cfg.epsilon_high),
        LossType::Sapo => (f64::NEG_INFINITY, f64::INFINITY),
        _ => (1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high),
    };
    let per_token = match cfg.loss_type {
        LossType::Cispo => {
            let w = coef.clone().clamp_max(hi).detach();
            (w * adv.clone() * logp.clone()).neg()
        }
        LossType::Sapo => {
            let gate = |t: f64| sigmoid((coef.clone() - 1.0) * t) * (4.0 / t);
            let positive = adv.clone().greater_elem(0.0);
            let gated =
                gate(cfg.sapo_temperature_neg).mask_where(positive, gate(cfg.sapo_temperature_pos));
            (gated * adv.clone()).neg()
        }
        _ => {
            let clipped = coef.clone().clamp(lo, hi);
            let unclipped = match cfg.delta {
                Some(d) => coef.clone().clamp_max(d),
                None => coef.clone(),
            };
            (unclipped * adv.clone())
                .min_pair(clipped * adv.clone())
                .neg()
        }
    };
    let per_token = match is_ratio {
        Some(r) => per_token * r,
        None => per_token,
    };
    let (per_token, kl_sum) = match reference {
        Some(reference) if cfg.beta != 0.0 => {
            let d = reference - logp;
            let kl = d.clone().exp() - d - 1.0;
            let kl_sum = total(kl.clone().detach() * mask.clone()).into_scalar::<f64>();
            (per_token + kl * cfg.beta, kl_sum)
        }
        _ => (per_token, 0.0),
    };
    let masked = per_token * mask.clone();
    let loss = match cfg.loss_type {
        LossType::Grpo | LossType::Sapo => {
            total(masked.sum_dim(1) / tokens_per_seq) / norm.sequences.max(1) as f64
        }
        LossType::Bnpo | LossType::Dapo | LossType::Cispo => {
            total(masked) / norm.tokens.max(1) as f64
        }
        LossType::DrGrpo => {
            total(masked) / (norm.sequences.max(1) * cfg.max_completion_length) as f64
        }
    };

    // Clip metrics (as TRL logs them), from the ratio before any delta cap.
    let coef = coef.detach();
    let low = coef.clone().lower_elem(lo).float();
    let high = coef.greater_elem(hi).float();
    let neg_adv = adv.clone().lower_elem(0.0).float();
    let pos_adv = adv.greater_elem(0.0).float();
    let count = |t: Tensor<2>| total(t * mask.clone()).into_scalar::<f64>();
    let clipped_low = count(low.clone() * neg_adv);
    let clipped_high = count(high.clone() * pos_adv);
    let outside = count(low + high);
    (loss, [kl_sum, clipped_low, clipped_high, outside])
}

fn validate_batch(
    cfg: &GrpoLossConfig,
    batch: &LossBatch,
    n: usize,
    targets: &Tensor<1, Int>,
) -> Result<()> {
    let size = batch.sequences * batch.width;
    let check = |name: &str, len: usize, want: usize| {
        if len == want {
            Ok(())
        } else {
            Err(TrainerError::Input(format!(
                "{name} has {len} entries, expected {want}"
            )))
        }
    };
    check("cells", batch.cells.len(), n)?;
    check("targets", targets.dims()[0], n)?;
    check("advantages", batch.advantages.len(), batch.sequences)?;
    for (name, v) in [
        ("old_logps", &batch.old_logps),
        ("ref_logps", &batch.ref_logps),
        ("is_ratio", &batch.is_ratio),
    ] {
        if let Some(v) = v {
            check(name, v.len(), n)?;
        }
    }
    if let Some(&c) = batch.cells.iter().find(|&&c| c >= size) {
        return Err(TrainerError::Input(format!(
            "cell {c} outside the {}×{} grid",
            batch.sequences, batch.width
        )));
    }
    if cfg.beta != 0.0 && batch.ref_logps.is_none() {
        return Err(TrainerError::Input(
            "beta > 0 needs reference log-probs (a reference model)".into(),
        ));
    }
    Ok(())
}

/// The grid tensors of a batch on `device`, with `logp` given as host values (for the fused path)
/// and the policy loss computed from them.
struct Grids {
    loss: Tensor<1>,
    metrics: [f64; 4],
}

fn loss_on_grid(
    cfg: &GrpoLossConfig,
    norm: StepNormalizer,
    batch: &LossBatch,
    logp: Tensor<2>,
    logp_host: &[f32],
) -> Grids {
    let device = logp.device();
    let (b, w) = (batch.sequences, batch.width);
    let g = |v: &[f32]| grid(v, &batch.cells, b * w, &device, b, w);
    let mask = g(&vec![1.0; batch.cells.len()]);
    let adv = Tensor::<2>::from_data(TensorData::new(batch.advantages.clone(), [b, 1]), &device);
    let old = g(batch.old_logps.as_deref().unwrap_or(logp_host));
    let reference = batch.ref_logps.as_deref().map(g);
    let is_ratio = batch.is_ratio.as_deref().map(g);
    let grids = LossGrids {
        logp,
        old,
        mask,
        adv,
        reference,
        is_ratio,
    };
    let (loss, metrics) = policy_loss(cfg, norm, grids);
    Grids { loss, metrics }
}

fn host_f32(t: Tensor<1>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec()
        .expect("f32 data")
}

fn stats(loss: f64, metrics: [f64; 4], entropy_sum: f64, tokens: usize) -> LossStats {
    let [kl_sum, clipped_low, clipped_high, outside_region] = metrics;
    LossStats {
        loss,
        kl_sum,
        clipped_low,
        clipped_high,
        outside_region,
        entropy_sum,
        tokens,
    }
}

/// Loss, metrics and gradients for one batch of completion tokens through the fused path.
///
/// `hidden` `[tokens, hidden]` holds the final hidden states that predict each completion token
/// (plain tensors, no autodiff), `weight` the lm_head `[vocab, hidden]`, `targets` the completion
/// tokens. Returns the stats and `(dL/dhidden, dL/dweight)` for
/// [`grail_kernels::gradient_surrogate`].
pub fn fused_grpo_loss(
    cfg: &GrpoLossConfig,
    norm: StepNormalizer,
    batch: &LossBatch,
    hidden: &Tensor<2>,
    weight: &Tensor<2>,
    targets: &Tensor<1, Int>,
    chunks: ChunkSizes,
) -> Result<(LossStats, Tensor<2>, Tensor<2>)> {
    let n = hidden.dims()[0];
    validate_batch(cfg, batch, n, targets)?;
    let fwd = selective_logprobs_forward(hidden, weight, targets, cfg.temperature, chunks, true);
    let logp_host = host_f32(fwd.logp.clone());
    let entropy_sum = total(fwd.entropy.clone().expect("asked for")).into_scalar::<f64>();

    // The loss on a small autodiff graph whose only leaf is the [sequences × width] logp grid.
    let device = hidden.device().autodiff();
    let logp = grid(
        &logp_host,
        &batch.cells,
        batch.sequences * batch.width,
        &device,
        batch.sequences,
        batch.width,
    )
    .require_grad();
    let Grids { loss, metrics } = loss_on_grid(cfg, norm, batch, logp.clone(), &logp_host);
    let loss_value = loss.clone().into_scalar::<f64>();
    let grads = loss.backward();
    let grad_grid = logp.grad(&grads).expect("logp is a leaf of the loss");
    let grad_grid = host_f32(grad_grid.reshape([batch.sequences * batch.width]));
    let grad_logp: Vec<f32> = batch.cells.iter().map(|&c| grad_grid[c]).collect();
    let grad_logp = Tensor::<1>::from_data(TensorData::new(grad_logp, [n]), &hidden.device());
    let (gh, gw) = selective_logprobs_backward(
        hidden,
        weight,
        targets,
        &fwd.lse,
        &grad_logp,
        cfg.temperature,
        chunks,
    );
    Ok((stats(loss_value, metrics, entropy_sum, n), gh, gw))
}

/// The unfused reference path: log_softmax + gather over the full `[tokens × vocab]` logits under
/// autodiff (`hidden` and `weight` on the autodiff graph). Returns the stats and the loss tensor to
/// call `backward()` on. Used to measure what fusion saves and to cross-check it.
pub fn naive_grpo_loss(
    cfg: &GrpoLossConfig,
    norm: StepNormalizer,
    batch: &LossBatch,
    hidden: Tensor<2>,
    weight: Tensor<2>,
    targets: Tensor<1, Int>,
) -> Result<(LossStats, Tensor<1>)> {
    let n = hidden.dims()[0];
    validate_batch(cfg, batch, n, &targets)?;
    let logits = hidden.matmul(weight.transpose()) / cfg.temperature;
    let logprobs = burn::tensor::activation::log_softmax(logits, 1);
    let entropy_sum = total(logprobs.clone().exp() * logprobs.clone())
        .neg()
        .into_scalar::<f64>();
    let logp = logprobs.gather(1, targets.reshape([n, 1])).reshape([n]);
    grpo_loss_on_logp(cfg, norm, batch, logp, entropy_sum)
}

/// The fused path on the autodiff graph: log-probs from the differentiable fused op
/// ([`grail_kernels::selective_logprobs`], whose backward node recomputes each tile), then
/// the loss. `hidden`/`weight` are on the model's autodiff graph; call `backward()` on the loss.
/// Needs a backend with the fused kernels (`grail_kernels::supported`).
pub fn fused_autodiff_grpo_loss(
    cfg: &GrpoLossConfig,
    norm: StepNormalizer,
    batch: &LossBatch,
    hidden: Tensor<2>,
    weight: Tensor<2>,
    targets: Tensor<1, Int>,
    chunks: ChunkSizes,
) -> Result<(LossStats, Tensor<1>)> {
    let n = hidden.dims()[0];
    validate_batch(cfg, batch, n, &targets)?;
    let (logp, entropy) =
        grail_kernels::selective_logprobs(hidden, weight, targets, cfg.temperature, chunks, true);
    let entropy_sum = total(entropy).into_scalar::<f64>();
    grpo_loss_on_logp(cfg, norm, batch, logp, entropy_sum)
}

/// The loss and its stats from per-token log-probs `logp` `[tokens]` (aligned with
/// `batch.cells`, on whatever autodiff graph produced them) and the entropy sum.
fn grpo_loss_on_logp(
    cfg: &GrpoLossConfig,
    norm: StepNormalizer,
    batch: &LossBatch,
    logp: Tensor<1>,
    entropy_sum: f64,
) -> Result<(LossStats, Tensor<1>)> {
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
    let Grids { loss, metrics } = loss_on_grid(cfg, norm, batch, logp_grid, &logp_host);
    let loss_value = loss.clone().into_scalar::<f64>();
    Ok((stats(loss_value, metrics, entropy_sum, n), loss))
}

/// Σ of every element, as `[1]`. Through a per-axis reduction rather than `sum()`: burn's
/// whole-tensor reduction kernel cannot be compiled by Mesa's lavapipe, the CPU Vulkan driver CI
/// checks the GPU path on, while a per-axis reduction can; the two mean the same.
fn total<const D: usize>(t: Tensor<D>) -> Tensor<1> {
    let n = t.shape().num_elements();
    t.reshape([n]).sum_dim(0)
}
