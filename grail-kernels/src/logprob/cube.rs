//! Selective log-probs on the CubeCL backends: per token tile, the logits tile through the shared
//! GEMM, then row kernels (per-block partial max / Σe / Σe·x, combined per row) and the tile's
//! gradient; never more than one `[tile_tokens × vocab]` tile of logits.

// Kernel code indexes buffers explicitly: iterators do not exist inside `#[cube]` functions.
#![allow(clippy::needless_range_loop)]

use burn::backend::TensorMetadata;
use burn::backend::ops::{FloatTensorOps, IntTensorOps};
use burn::tensor::Slice;
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::LogprobOps;
use super::chunked::ranges;
use crate::cube_gemm::product;
use crate::cube_launch::{arg, empty_like, f32_contiguous, grid};

type B = CubeBackend;

/// Vocabulary entries per thread in the first stage of the log-prob rows.
const VOCAB_BLOCK: usize = 512;

/// One thread per (row, block of `block` vocabulary entries) of a `[rows, vocab]` tile of scaled
/// logits: the block's max `m`, `Σ e^(z−m)` and `Σ e^(z−m)·z`, at `[row · blocks + block_index]`
/// of the three partial buffers. A whole row per thread would leave a GPU nearly idle (a tile has
/// ~100 rows of ~100k entries).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn logprob_partial_kernel(
    logits: &[f32],
    part_max: &mut [f32],
    part_sum: &mut [f32],
    part_weighted: &mut [f32],
    vocab: u32,
    blocks: u32,
    block: u32,
    #[comptime] with_entropy: bool,
) {
    let i = ABSOLUTE_POS;
    if i >= part_max.len() {
        terminate!();
    }
    let vocab = vocab as usize;
    let row = i / blocks as usize;
    let first = (i % blocks as usize) * block as usize;
    let mut last = first + block as usize;
    if last > vocab {
        last = vocab;
    }
    let base = row * vocab;
    let mut m = f32::new(-1.0e30);
    for c in first..last {
        let z = logits[base + c];
        if z > m {
            m = z;
        }
    }
    let mut sum = f32::new(0.0);
    let mut weighted = f32::new(0.0);
    for c in first..last {
        let z = logits[base + c];
        let e = (z - m).exp();
        sum += e;
        if comptime![with_entropy] {
            weighted += e * z;
        }
    }
    part_max[i] = m;
    part_sum[i] = sum;
    part_weighted[i] = weighted;
}

/// One thread per row: combines the row's partials into its log-sum-exp, the target's log-prob
/// and (when asked) the entropy, written at `row0 + row` of the outputs.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn logprob_combine_kernel(
    logits: &[f32],
    targets: &[f32],
    part_max: &[f32],
    part_sum: &[f32],
    part_weighted: &[f32],
    logp: &mut [f32],
    lse: &mut [f32],
    entropy: &mut [f32],
    rows: u32,
    vocab: u32,
    blocks: u32,
    row0: u32,
    #[comptime] with_entropy: bool,
) {
    let r = ABSOLUTE_POS;
    if r >= rows as usize {
        terminate!();
    }
    let blocks = blocks as usize;
    let first = r * blocks;
    let mut m = f32::new(-1.0e30);
    for b in 0..blocks {
        let x = part_max[first + b];
        if x > m {
            m = x;
        }
    }
    let mut sum = f32::new(0.0);
    let mut weighted = f32::new(0.0);
    for b in 0..blocks {
        let scale = (part_max[first + b] - m).exp();
        sum += part_sum[first + b] * scale;
        if comptime![with_entropy] {
            weighted += part_weighted[first + b] * scale;
        }
    }
    let l = m + sum.ln();
    let out = row0 as usize + r;
    lse[out] = l;
    let target = u32::cast_from(targets[out]) as usize;
    logp[out] = logits[r * vocab as usize + target] - l;
    if comptime![with_entropy] {
        entropy[out] = l - weighted / sum;
    } else {
        entropy[out] = f32::new(0.0);
    }
}

/// Element-wise over a `[rows, vocab]` tile of scaled logits: `dL/dz · inv_t`, that is
/// `grad · inv_t · (onehot(target) − softmax)`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn logprob_grad_kernel(
    logits: &[f32],
    targets: &[f32],
    lse: &[f32],
    grad: &[f32],
    g: &mut [f32],
    vocab: u32,
    row0: u32,
    inv_t: f32,
) {
    let i = ABSOLUTE_POS;
    if i >= g.len() {
        terminate!();
    }
    let vocab = vocab as usize;
    let row = row0 as usize + i / vocab;
    let c = i % vocab;
    let p = (logits[i] - lse[row]).exp();
    let target = u32::cast_from(targets[row]) as usize;
    let mut onehot = f32::new(0.0);
    if c == target {
        onehot = f32::new(1.0);
    }
    g[i] = grad[row] * inv_t * (onehot - p);
}

/// The per-token outputs of the log-prob forward, `[tokens]` each.
struct LogprobOutputs<'a> {
    logp: &'a CubeTensor,
    lse: &'a CubeTensor,
    entropy: &'a CubeTensor,
}

/// Log-sum-exp, target log-prob and entropy of each row of a `[rows, vocab]` tile of scaled
/// logits, written at `row0..row0 + rows` of the outputs.
fn logprob_rows(
    logits: &CubeTensor,
    targets: &CubeTensor,
    out: LogprobOutputs<'_>,
    row0: usize,
    with_entropy: bool,
) {
    let (rows, vocab) = (logits.shape()[0], logits.shape()[1]);
    let blocks = vocab.div_ceil(VOCAB_BLOCK).max(1);
    let part = || empty_like(logits, [rows * blocks]);
    let (part_max, part_sum, part_weighted) = (part(), part(), part());
    let (count, dim) = grid(logits, rows * blocks);
    logprob_partial_kernel::launch(
        &logits.client,
        count,
        dim,
        arg(logits),
        arg(&part_max),
        arg(&part_sum),
        arg(&part_weighted),
        vocab as u32,
        blocks as u32,
        VOCAB_BLOCK as u32,
        with_entropy,
    );
    let (count, dim) = grid(logits, rows);
    logprob_combine_kernel::launch(
        &logits.client,
        count,
        dim,
        arg(logits),
        arg(targets),
        arg(&part_max),
        arg(&part_sum),
        arg(&part_weighted),
        arg(out.logp),
        arg(out.lse),
        arg(out.entropy),
        rows as u32,
        vocab as u32,
        blocks as u32,
        row0 as u32,
        with_entropy,
    );
}

/// `dL/dz · inv_t` over a `[rows, vocab]` tile of scaled logits whose rows are tokens
/// `row0..row0 + rows` (`lse`, `grad`, `targets` are `[tokens]`).
fn logprob_tile_grad(
    logits: &CubeTensor,
    targets: &CubeTensor,
    lse: &CubeTensor,
    grad: &CubeTensor,
    row0: usize,
    inv_t: f32,
) -> CubeTensor {
    let (rows, vocab) = (logits.shape()[0], logits.shape()[1]);
    let g = empty_like(logits, [rows, vocab]);
    let (count, dim) = grid(logits, rows * vocab);
    logprob_grad_kernel::launch(
        &logits.client,
        count,
        dim,
        arg(logits),
        arg(targets),
        arg(lse),
        arg(grad),
        arg(&g),
        vocab as u32,
        row0 as u32,
        inv_t,
    );
    g
}

/// Target ids as f32 (exact below 2²⁴, far above any vocabulary), so the row kernels read them
/// without a host round trip or an integer-dtype variant.
fn float_targets(targets: CubeTensor) -> CubeTensor {
    into_contiguous(B::int_into_float(targets, burn::tensor::FloatDType::F32))
}

/// A tile's hidden rows `h` `[rows, width]` times `Wᵀ · inv_t` (`W` `[vocab, width]`),
/// contiguous `[rows, vocab]`: the only logits that exist.
fn scaled_logits(h: CubeTensor, weight: &CubeTensor, inv_t: f32) -> CubeTensor {
    let logits = B::float_mul_scalar(product(h, false, weight.clone(), true), inv_t.into());
    into_contiguous(logits)
}

impl LogprobOps for CubeBackend {
    fn fused_logprob_forward(
        hidden: CubeTensor,
        weight: CubeTensor,
        targets: CubeTensor,
        inv_t: f32,
        tile_tokens: usize,
        _tile_vocab: usize,
        with_entropy: bool,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        let (hidden, weight) = (f32_contiguous(hidden), f32_contiguous(weight));
        let targets = float_targets(targets);
        let tokens = hidden.shape()[0];
        let (logp, lse, ent) = (
            empty_like(&hidden, [tokens]),
            empty_like(&hidden, [tokens]),
            empty_like(&hidden, [tokens]),
        );
        for rows in ranges(tokens, tile_tokens) {
            let h = B::float_slice(hidden.clone(), &[Slice::from(rows.clone())]);
            let logits = scaled_logits(h, &weight, inv_t);
            let outputs = LogprobOutputs {
                logp: &logp,
                lse: &lse,
                entropy: &ent,
            };
            logprob_rows(&logits, &targets, outputs, rows.start, with_entropy);
        }
        (logp, lse, ent)
    }

    fn fused_logprob_backward(
        hidden: CubeTensor,
        weight: CubeTensor,
        targets: CubeTensor,
        lse: CubeTensor,
        grad: CubeTensor,
        inv_t: f32,
        tile_tokens: usize,
        _tile_vocab: usize,
    ) -> (CubeTensor, CubeTensor) {
        let (hidden, weight) = (f32_contiguous(hidden), f32_contiguous(weight));
        let (lse, grad) = (f32_contiguous(lse), f32_contiguous(grad));
        let targets = float_targets(targets);
        let tokens = hidden.shape()[0];
        let mut dh_tiles = Vec::new();
        let mut dw: Option<CubeTensor> = None;
        for rows in ranges(tokens, tile_tokens) {
            let h = B::float_slice(hidden.clone(), &[Slice::from(rows.clone())]);
            let logits = scaled_logits(h.clone(), &weight, inv_t);
            let g = logprob_tile_grad(&logits, &targets, &lse, &grad, rows.start, inv_t);
            dh_tiles.push(product(g.clone(), false, weight.clone(), false));
            let tile_dw = product(g, true, h, false);
            dw = Some(match dw {
                Some(acc) => B::float_add(acc, tile_dw),
                None => tile_dw,
            });
        }
        let dh = match dh_tiles.len() {
            0 => empty_like(&hidden, hidden.shape()),
            _ => B::float_cat(dh_tiles, 0),
        };
        let dw = dw.unwrap_or_else(|| {
            B::float_zeros(
                weight.shape(),
                &weight.device,
                burn::tensor::FloatDType::F32,
            )
        });
        (dh, into_contiguous(dw))
    }
}

#[cfg(test)]
mod tests {
    //! The log-prob row kernels on their own, fed logits directly (the GEMM has its own test).
    use super::*;
    use crate::cube_launch::tests::{read, upload};

    #[test]
    fn logprob_rows_and_tile_gradient_match_the_formulas() {
        // Three vocabulary blocks of the partial kernel, the last one partial.
        let (tokens, vocab, row0, rows) = (7, 2 * VOCAB_BLOCK + 37, 2, 4);
        let inv_t = 1.0 / 0.7;
        let logits: Vec<f32> = (0..rows * vocab)
            .map(|i| ((i * 7919 % 103) as f32 / 17.0 - 3.0) * inv_t)
            .collect();
        let targets: Vec<f32> = (0..tokens).map(|t| ((t * 11 + 3) % vocab) as f32).collect();
        let grad: Vec<f32> = (0..tokens).map(|t| 0.5 - t as f32 * 0.2).collect();
        let tile = upload(logits.clone(), [rows, vocab]);
        let target_t = upload(targets.clone(), [tokens]);
        let zeros = || upload(vec![0.0; tokens], [tokens]);
        let (logp, lse, ent) = (zeros(), zeros(), zeros());
        let out = LogprobOutputs {
            logp: &logp,
            lse: &lse,
            entropy: &ent,
        };
        logprob_rows(&tile, &target_t, out, row0, true);
        let g = logprob_tile_grad(
            &tile,
            &target_t,
            &lse,
            &upload(grad.clone(), [tokens]),
            row0,
            inv_t,
        );
        let (logp, lse, ent, g) = (read(logp), read(lse), read(ent), read(g));
        for r in 0..rows {
            let z = &logits[r * vocab..(r + 1) * vocab];
            let m = z
                .iter()
                .cloned()
                .fold(f64::NEG_INFINITY, |a, b| a.max(b as f64));
            let sum: f64 = z.iter().map(|&x| (x as f64 - m).exp()).sum();
            let l = m + sum.ln();
            let t = row0 + r;
            let target = targets[t] as usize;
            let entropy = l - z
                .iter()
                .map(|&x| (x as f64 - l).exp() * x as f64)
                .sum::<f64>();
            assert!((lse[t] as f64 - l).abs() < 1e-5, "lse row {t}");
            assert!(
                (logp[t] as f64 - (z[target] as f64 - l)).abs() < 1e-5,
                "logp row {t}"
            );
            assert!((ent[t] as f64 - entropy).abs() < 1e-4, "entropy row {t}");
            for c in 0..vocab {
                let p = (z[c] as f64 - l).exp();
                let onehot = if c == target { 1.0 } else { 0.0 };
                let want = grad[t] as f64 * inv_t as f64 * (onehot - p);
                assert!(
                    (g[r * vocab + c] as f64 - want).abs() < 1e-6,
                    "grad {t},{c}"
                );
            }
        }
        // Rows outside the tile are untouched.
        assert_eq!((logp[0], logp[tokens - 1]), (0.0, 0.0));
    }
}
