//! The GRPO objective itself: per-token policy loss (clipped, CISPO or SAPO; token or sequence
//! importance ratio; δ cap; behaviour weights; k3 KL), normalised as the loss type says, and the
//! clip metrics TRL logs, all as tensor math on the `[sequences, width]` grid of log-probs.

use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Tensor, TensorData};

use super::{
    GrpoLossConfig, ImportanceSamplingLevel, LossBatch, LossStats, LossType, StepNormalizer,
};

/// `values` placed at `cells` of a zero `[rows, cols]` grid (`size` = rows × cols) on `device`.
pub(super) fn grid(
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

/// The grid tensors one loss call works on (`[sequences, width]`; `adv` is `[sequences, 1]`).
struct LossGrids {
    logp: Tensor<2>,
    old: Tensor<2>,
    mask: Tensor<2>,
    adv: Tensor<2>,
    reference: Option<Tensor<2>>,
    is_ratio: Option<Tensor<2>>,
}

/// The per-token policy loss and its normalisation, on grids (`logp` requires grad).
/// Returns the scalar loss and `(kl_sum, clipped_low, clipped_high, outside_region)`.
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

/// The policy loss of a batch and its clip and KL counts (`[kl_sum, clipped_low, clipped_high,
/// outside_region]`).
pub(super) struct PolicyLoss {
    pub(super) loss: Tensor<1>,
    pub(super) metrics: [f64; 4],
}

/// The policy loss of `batch` given its log-probs as a grid `logp` (on whatever autodiff graph
/// produced them) and as host values `logp_host` (the detached "old" log-probs when the batch has
/// none).
pub(super) fn loss_on_grid(
    cfg: &GrpoLossConfig,
    norm: StepNormalizer,
    batch: &LossBatch,
    logp: Tensor<2>,
    logp_host: &[f32],
) -> PolicyLoss {
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
    PolicyLoss { loss, metrics }
}

/// The values of a `[n]` tensor on the host.
pub(super) fn host_f32(t: Tensor<1>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec()
        .expect("f32 data")
}

/// The stats of one call from its loss value, clip and KL counts, entropy sum and token count.
pub(super) fn stats(loss: f64, metrics: [f64; 4], entropy_sum: f64, tokens: usize) -> LossStats {
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
/// Σ of every element, as `[1]`. Through a per-axis reduction rather than `sum()`: burn's
/// whole-tensor reduction kernel cannot be compiled by Mesa's lavapipe, the CPU Vulkan driver CI
/// checks the GPU path on, while a per-axis reduction can; the two mean the same.
pub(super) fn total<const D: usize>(t: Tensor<D>) -> Tensor<1> {
    let n = t.shape().num_elements();
    t.reshape([n]).sum_dim(0)
}
