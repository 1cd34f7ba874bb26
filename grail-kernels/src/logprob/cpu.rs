//! CPU selective log-prob kernels: each token tile (one rayon task) streams the vocabulary in
//! tiles, a GEMM per tile and an online max / Σe / Σe·x per row.

use burn::backend::Flex;
use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use rayon::prelude::*;

use super::LogprobOps;
use crate::cpu_gemm::{View, dot, matmul};
use crate::cpu_math::{exp_shifted, max_of};
use crate::flex_io::{flex, host, host_ids};

/// Sizes of a selective log-prob call: `hidden` `[tokens, width]`, `weight` `[vocab, width]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogprobDims {
    /// Tokens (rows of hidden states).
    pub tokens: usize,
    /// Hidden width.
    pub width: usize,
    /// Vocabulary rows.
    pub vocab: usize,
}

/// Per-token `log softmax(h · Wᵀ · inv_t)[target]`, the log-sum-exp, and (when asked) the entropy,
/// in `[tile_tokens × tile_vocab]` tiles: each token tile (one rayon task) streams the vocabulary,
/// a GEMM per tile, an online max / Σ e / Σ e·x per row. Returns `(logp, lse, entropy)`.
#[allow(clippy::too_many_arguments)]
pub fn selective_logprobs_forward(
    h: &[f32],
    w: &[f32],
    targets: &[usize],
    dims: LogprobDims,
    inv_t: f32,
    tile_tokens: usize,
    tile_vocab: usize,
    with_entropy: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let LogprobDims {
        tokens,
        width,
        vocab,
    } = dims;
    let (tt, tv) = (
        tile_tokens.clamp(1, tokens.max(1)),
        tile_vocab.clamp(1, vocab),
    );
    let mut logp = vec![0f32; tokens];
    let mut lse = vec![0f32; tokens];
    let mut ent = vec![0f32; tokens];
    logp.par_chunks_mut(tt)
        .zip(lse.par_chunks_mut(tt))
        .zip(ent.par_chunks_mut(tt))
        .enumerate()
        .for_each(|(ti, ((logp, lse), ent))| {
            let t0 = ti * tt;
            let rows = logp.len();
            let mut x = vec![0f32; rows * tv];
            let mut e = vec![0f32; tv];
            let (mut m, mut sum, mut ex) = (
                vec![f32::NEG_INFINITY; rows],
                vec![0f32; rows],
                vec![0f32; rows],
            );
            for v0 in (0..vocab).step_by(tv) {
                let cols = tv.min(vocab - v0);
                let x = &mut x[..rows * cols];
                let hv = View::rows(t0 * width, width);
                let wv = View::rows(v0 * width, width).t();
                matmul(x, rows, cols, width, h, hv, w, wv, inv_t, false);
                for r in 0..rows {
                    let row = &x[r * cols..(r + 1) * cols];
                    let m_new = m[r].max(max_of(row));
                    let rescale = (m[r] - m_new).exp();
                    let e = &mut e[..cols];
                    e.copy_from_slice(row);
                    exp_shifted(e, m_new);
                    sum[r] = sum[r] * rescale + e.iter().sum::<f32>();
                    if with_entropy {
                        ex[r] = ex[r] * rescale + dot(e, row);
                    }
                    m[r] = m_new;
                }
            }
            for r in 0..rows {
                let t = t0 + r;
                lse[r] = m[r] + sum[r].ln();
                let target = &w[targets[t] * width..(targets[t] + 1) * width];
                logp[r] = dot(&h[t * width..(t + 1) * width], target) * inv_t - lse[r];
                if with_entropy {
                    ent[r] = lse[r] - ex[r] / sum[r];
                }
            }
        });
    (logp, lse, ent)
}

/// `(dL/dh, dL/dW)` of [`selective_logprobs_forward`] given `grad = dL/dlogp`, recomputing each
/// tile from the saved log-sum-exp: `dL/dx_tv = g_t (1[v = y_t] − p_tv) · inv_t`. Each vocabulary
/// tile is one rayon task (it owns its rows of `dW`); `dh` partials are summed per thread.
#[allow(clippy::too_many_arguments)]
pub fn selective_logprobs_backward(
    h: &[f32],
    w: &[f32],
    targets: &[usize],
    lse: &[f32],
    grad: &[f32],
    dims: LogprobDims,
    inv_t: f32,
    tile_tokens: usize,
    tile_vocab: usize,
) -> (Vec<f32>, Vec<f32>) {
    let LogprobDims {
        tokens,
        width,
        vocab,
    } = dims;
    let (tt, tv) = (
        tile_tokens.clamp(1, tokens.max(1)),
        tile_vocab.clamp(1, vocab),
    );
    let mut dw = vec![0f32; vocab * width];
    let dh = dw
        .par_chunks_mut(tv * width)
        .enumerate()
        .fold(
            || vec![0f32; tokens * width],
            |mut dh, (vi, dw)| {
                let v0 = vi * tv;
                let cols = dw.len() / width;
                let mut x = vec![0f32; tt * cols];
                for t0 in (0..tokens).step_by(tt) {
                    let rows = tt.min(tokens - t0);
                    let x = &mut x[..rows * cols];
                    let hv = View::rows(t0 * width, width);
                    let wv = View::rows(v0 * width, width);
                    matmul(x, rows, cols, width, h, hv, w, wv.t(), inv_t, false);
                    for r in 0..rows {
                        let t = t0 + r;
                        let row = &mut x[r * cols..(r + 1) * cols];
                        exp_shifted(row, lse[t]);
                        let g = grad[t] * inv_t;
                        row.iter_mut().for_each(|p| *p *= -g);
                        if (v0..v0 + cols).contains(&targets[t]) {
                            row[targets[t] - v0] += g;
                        }
                    }
                    let dh_tile = &mut dh[t0 * width..(t0 + rows) * width];
                    matmul(
                        dh_tile,
                        rows,
                        width,
                        cols,
                        x,
                        View::rows(0, cols),
                        w,
                        wv,
                        1.0,
                        true,
                    );
                    matmul(
                        dw,
                        cols,
                        width,
                        rows,
                        x,
                        View::rows(0, cols).t(),
                        h,
                        hv,
                        1.0,
                        true,
                    );
                }
                dh
            },
        )
        .reduce(
            || vec![0f32; tokens * width],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        );
    (dh, dw)
}

fn logprob_dims(hidden: &FlexTensor, weight: &FlexTensor) -> LogprobDims {
    let (hs, ws) = (hidden.shape(), weight.shape());
    LogprobDims {
        tokens: hs[0],
        width: hs[1],
        vocab: ws[0],
    }
}

impl LogprobOps for Flex {
    fn fused_logprob_forward(
        hidden: FlexTensor,
        weight: FlexTensor,
        targets: FlexTensor,
        inv_t: f32,
        tile_tokens: usize,
        tile_vocab: usize,
        with_entropy: bool,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let dims = logprob_dims(&hidden, &weight);
        let (logp, lse, ent) = selective_logprobs_forward(
            &host(&hidden),
            &host(&weight),
            &host_ids(&targets),
            dims,
            inv_t,
            tile_tokens,
            tile_vocab,
            with_entropy,
        );
        let n = dims.tokens;
        (flex(logp, [n]), flex(lse, [n]), flex(ent, [n]))
    }

    fn fused_logprob_backward(
        hidden: FlexTensor,
        weight: FlexTensor,
        targets: FlexTensor,
        lse: FlexTensor,
        grad: FlexTensor,
        inv_t: f32,
        tile_tokens: usize,
        tile_vocab: usize,
    ) -> (FlexTensor, FlexTensor) {
        let dims = logprob_dims(&hidden, &weight);
        let (dh, dw) = selective_logprobs_backward(
            &host(&hidden),
            &host(&weight),
            &host_ids(&targets),
            &host(&lse),
            &host(&grad),
            dims,
            inv_t,
            tile_tokens,
            tile_vocab,
        );
        (flex(dh, hidden.shape()), flex(dw, weight.shape()))
    }
}
