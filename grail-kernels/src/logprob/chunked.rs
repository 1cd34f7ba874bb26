//! Chunked selective log-probs: `logp_t = log softmax(h_t · Wᵀ / T)[y_t]`, with an online
//! log-sum-exp over vocabulary chunks, and a backward that recomputes each chunk.
//!
//! Memory is `O(chunk.tokens × chunk.vocab)` in both directions: the forward keeps only the
//! per-token log-sum-exp, the backward rebuilds each `[tokens × vocab]` tile from it. This is the
//! scheme of Liger-Kernel's chunked GRPO loss.
//!
//! # Autodiff
//! The forward and backward run on plain (non-autodiff) tensors. A caller training through them
//! computes `dL/dlogp` for the loss it wants (a `[tokens]` vector), gets `dL/dh` and `dL/dW` from
//! [`selective_logprobs_backward`], and hands them to the autodiff graph with
//! [`gradient_surrogate`]: a scalar whose gradient with respect to `h` and `W` is exactly those
//! tensors, so `surrogate.backward()` continues through the model.

use burn::tensor::{IndexingUpdateOp, Int, Tensor};

/// How many tokens and vocabulary rows one tile covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChunkSizes {
    /// Tokens per tile (rows of hidden states).
    pub tokens: usize,
    /// Vocabulary rows per tile.
    pub vocab: usize,
}

impl Default for ChunkSizes {
    /// 128 tokens × 2048 vocabulary rows: a 1 MiB f32 tile (stays in a CPU's L2/L3).
    fn default() -> Self {
        Self {
            tokens: 128,
            vocab: 2048,
        }
    }
}

/// Output of [`selective_logprobs_forward`].
#[derive(Debug, Clone)]
pub struct SelectiveLogProbs {
    /// `[tokens]`: log-prob of each selected token.
    pub logp: Tensor<1>,
    /// `[tokens]`: log-sum-exp of each row of scaled logits (kept for the backward).
    pub lse: Tensor<1>,
    /// `[tokens]`: entropy of each token's distribution, when asked for.
    pub entropy: Option<Tensor<1>>,
}

/// Whether the backend has the fused kernel for these tensors (f32 hidden states and a weight the
/// kernels take, no autodiff: the op is used on plain tensors); elsewhere the tiles run as burn
/// tensor ops.
fn kernel_applies(hidden: &Tensor<2>, weight: &Tensor<2>) -> bool {
    let device = hidden.device();
    !device.is_autodiff()
        && crate::supported_dtype(hidden.dtype())
        && crate::supported_weight(&device, weight.dtype())
}

/// The ranges `0..step`, `step..2·step`, … covering `0..total` (the last one shorter).
pub(crate) fn ranges(total: usize, step: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let step = step.max(1);
    (0..total)
        .step_by(step)
        .map(move |s| s..(s + step).min(total))
}

/// Log-probs (and optionally entropies) of `targets` under `softmax(hidden · weightᵀ / temperature)`.
///
/// # Shapes
/// - `hidden` `[tokens, hidden]`, `weight` `[vocab, hidden]`, `targets` `[tokens]` (ids < vocab).
///
/// # Panics
/// If `temperature` is not positive or the shapes disagree.
pub fn selective_logprobs_forward(
    hidden: &Tensor<2>,
    weight: &Tensor<2>,
    targets: &Tensor<1, Int>,
    temperature: f64,
    chunks: ChunkSizes,
    with_entropy: bool,
) -> SelectiveLogProbs {
    assert!(
        temperature > 0.0,
        "temperature must be positive, got {temperature}"
    );
    let [n, h] = hidden.dims();
    let [vocab, wh] = weight.dims();
    assert_eq!(h, wh, "hidden width {h} != weight width {wh}");
    assert_eq!(targets.dims()[0], n, "targets length != tokens");
    if kernel_applies(hidden, weight) {
        let (logp, lse, entropy) = super::logprob_forward(
            hidden,
            weight,
            targets,
            (1.0 / temperature) as f32,
            chunks,
            with_entropy,
        );
        return SelectiveLogProbs {
            logp,
            lse,
            entropy: with_entropy.then_some(entropy),
        };
    }
    let inv_t = 1.0 / temperature;
    let (mut logps, mut lses, mut ents) = (Vec::new(), Vec::new(), Vec::new());
    for tr in ranges(n, chunks.tokens) {
        let hc = hidden.clone().slice(tr.clone());
        let tc = targets.clone().slice(tr.clone());
        // Online log-sum-exp over vocabulary tiles: running max m, Σ e^(x−m), Σ e^(x−m)·x.
        let mut state: Option<(Tensor<2>, Tensor<2>, Tensor<2>)> = None;
        for vr in ranges(vocab, chunks.vocab) {
            let x = hc.clone().matmul(weight.clone().slice(vr).transpose()) * inv_t;
            let tile_max = x.clone().max_dim(1);
            state = Some(match state {
                None => {
                    let e = (x.clone() - tile_max.clone()).exp();
                    let ex = (e.clone() * x).sum_dim(1);
                    (tile_max, e.sum_dim(1), ex)
                }
                Some((m, s, ex)) => {
                    let m_new = m.clone().max_pair(tile_max);
                    let rescale = (m - m_new.clone()).exp();
                    let e = (x.clone() - m_new.clone()).exp();
                    let s = s * rescale.clone() + e.clone().sum_dim(1);
                    let ex = ex * rescale + (e * x).sum_dim(1);
                    (m_new, s, ex)
                }
            });
        }
        let (m, s, ex) = state.expect("vocab > 0");
        let lse = m + s.clone().log();
        let target_logit = (hc * weight.clone().select(0, tc)).sum_dim(1) * inv_t;
        logps.push(target_logit - lse.clone());
        if with_entropy {
            ents.push(lse.clone() - ex / s);
        }
        lses.push(lse);
    }
    let flat = |v: Vec<Tensor<2>>| Tensor::cat(v, 0).reshape([n]);
    SelectiveLogProbs {
        logp: flat(logps),
        lse: flat(lses),
        entropy: with_entropy.then(|| flat(ents)),
    }
}

/// Gradients `(dL/dhidden, dL/dweight)` given `grad_logp = dL/dlogp`, recomputing each tile from
/// the saved log-sum-exp: `dL/dx_tv = g_t (1[v = y_t] − p_tv) / T`.
///
/// # Shapes
/// - as [`selective_logprobs_forward`]; `lse` and `grad_logp` `[tokens]`; returns
///   `[tokens, hidden]` and `[vocab, hidden]`.
pub fn selective_logprobs_backward(
    hidden: &Tensor<2>,
    weight: &Tensor<2>,
    targets: &Tensor<1, Int>,
    lse: &Tensor<1>,
    grad_logp: &Tensor<1>,
    temperature: f64,
    chunks: ChunkSizes,
) -> (Tensor<2>, Tensor<2>) {
    if kernel_applies(hidden, weight) {
        return super::logprob_backward(
            hidden,
            weight,
            targets,
            lse,
            grad_logp,
            (1.0 / temperature) as f32,
            chunks,
        );
    }
    let [n, _] = hidden.dims();
    let [vocab, _] = weight.dims();
    let inv_t = 1.0 / temperature;
    let vocab_ranges: Vec<_> = ranges(vocab, chunks.vocab).collect();
    let mut grad_w_tiles: Vec<Option<Tensor<2>>> = vec![None; vocab_ranges.len()];
    // The one-hot part of dL/dW lands on the target rows only.
    let mut grad_w_target = Tensor::<2>::zeros(weight.dims(), &weight.device());
    let mut grad_h = Vec::new();
    for tr in ranges(n, chunks.tokens) {
        let c = tr.len();
        let hc = hidden.clone().slice(tr.clone());
        let tc = targets.clone().slice(tr.clone());
        let g = (grad_logp.clone().slice(tr.clone()) * inv_t).reshape([c, 1]);
        let lse_c = lse.clone().slice(tr).reshape([c, 1]);
        let mut gh = g.clone() * weight.clone().select(0, tc.clone());
        grad_w_target =
            grad_w_target.select_assign(0, tc, g.clone() * hc.clone(), IndexingUpdateOp::Add);
        for (i, vr) in vocab_ranges.iter().enumerate() {
            let wv = weight.clone().slice(vr.clone());
            let x = hc.clone().matmul(wv.clone().transpose()) * inv_t;
            let gp = (x - lse_c.clone()).exp() * g.clone().neg();
            gh = gh + gp.clone().matmul(wv);
            let tile = gp.transpose().matmul(hc.clone());
            grad_w_tiles[i] = Some(match grad_w_tiles[i].take() {
                Some(acc) => acc + tile,
                None => tile,
            });
        }
        grad_h.push(gh);
    }
    let grad_w = Tensor::cat(
        grad_w_tiles
            .into_iter()
            .map(|t| t.expect("every tile visited"))
            .collect(),
        0,
    );
    (Tensor::cat(grad_h, 0), grad_w + grad_w_target)
}

/// The unfused reference: `log_softmax(hidden · weightᵀ / T)` gathered at `targets`. Builds the
/// full `[tokens × vocab]` logits; differentiable under autodiff.
pub fn naive_selective_logprobs(
    hidden: Tensor<2>,
    weight: Tensor<2>,
    targets: Tensor<1, Int>,
    temperature: f64,
) -> Tensor<1> {
    let n = targets.dims()[0];
    let logits = hidden.matmul(weight.transpose()) / temperature;
    burn::tensor::activation::log_softmax(logits, 1)
        .gather(1, targets.reshape([n, 1]))
        .reshape([n])
}

/// A scalar `Σ hidden ⊙ grad_hidden + Σ weight ⊙ grad_weight` on the autodiff graph of `hidden`
/// and `weight`, with the gradients held constant: its backward delivers exactly `grad_hidden`
/// to `hidden` and `grad_weight` to `weight`, and continues through whatever produced them.
pub fn gradient_surrogate(
    hidden: Tensor<2>,
    weight: Tensor<2>,
    grad_hidden: Tensor<2>,
    grad_weight: Tensor<2>,
) -> Tensor<1> {
    let gh = grad_hidden.autodiff().detach();
    let gw = grad_weight.autodiff().detach();
    (hidden * gh).sum() + (weight * gw).sum()
}
