//! The CPU linear kernels over a row-major weight: the shared GEMM over the weight read in place;
//! at a few rows, dot products that also read bf16 weights as they are, widening each on load.
//! (Rollout copies hold their matrices in panel order instead: `panels.rs`.)

use std::borrow::Cow;

use burn::backend::Flex;
use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use half::bf16;

use super::LinearOps;
use super::panels::panel_forward;
use rayon::prelude::*;

use crate::cpu_gemm::{View, dot, product_parallel};
#[cfg(target_arch = "x86_64")]
use crate::cpu_math::has_avx2;
use crate::flex_io::{flex, host};

/// Rows up to which [`linear_forward`] streams the weight once through dot products rather than
/// through the GEMM: at a decode step's few rows the GEMM's packing of the weight on every call
/// costs more than the product, and the step is bound by reading the weights.
pub const FEW_ROWS: usize = 64;

/// A weight element the linear reads: f32, or bf16 widened as it is loaded. Widening is exact (a
/// bf16 is the top half of an f32), so a bf16 weight gives bit for bit what the same values
/// held as f32 give.
pub trait WeightElement: Copy + Send + Sync {
    /// The value as f32.
    fn widen(self) -> f32;

    /// The whole weight as f32, for the GEMM (borrowed when it already is).
    fn widened(w: &[Self]) -> Cow<'_, [f32]>;

    /// Eight consecutive elements from `p`, widened.
    ///
    /// # Safety
    /// Eight elements are readable from `p`, and the CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl WeightElement for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    fn widened(w: &[f32]) -> Cow<'_, [f32]> {
        Cow::Borrowed(w)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl WeightElement for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }

    fn widened(w: &[bf16]) -> Cow<'_, [f32]> {
        Cow::Owned(w.par_iter().map(|v| v.widen()).collect())
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract (16 bytes readable, AVX2).
        unsafe {
            let halves = _mm_loadu_si128(p.cast());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(halves)))
        }
    }
}

/// A linear layer without bias, `y [n × out] = x [n × in] · Wᵀ` with `W` `[out × in]` (Hugging
/// Face layout), read in place: no transposed copy of the weight.
pub fn linear_forward<W: WeightElement>(
    x: &[f32],
    w: &[W],
    n: usize,
    in_f: usize,
    out_f: usize,
) -> Vec<f32> {
    if n <= FEW_ROWS {
        return few_rows_forward(x, w, n, in_f, out_f);
    }
    product_parallel(
        n,
        out_f,
        in_f,
        x,
        View::rows(0, in_f),
        &W::widened(w),
        View::rows(0, in_f).t(),
    )
}

/// [`linear_forward`] for a few rows: each weight row read once, dotted with every input row
/// while it is in cache; blocks of weight rows spread over rayon's threads.
fn few_rows_forward<W: WeightElement>(
    x: &[f32],
    w: &[W],
    n: usize,
    in_f: usize,
    out_f: usize,
) -> Vec<f32> {
    assert!(
        x.len() >= n * in_f && w.len() >= out_f * in_f,
        "linear: operands too small"
    );
    if n == 0 || out_f == 0 {
        return vec![0f32; n * out_f];
    }
    // Each task writes one contiguous block, its features for every row (`[n × features]`);
    // the blocks' rows are then copied into place.
    let mut by_task = vec![0f32; out_f * n];
    let features_per_task = (WEIGHT_FLOATS_PER_TASK / in_f.max(1)).max(1);
    by_task
        .par_chunks_mut(features_per_task * n)
        .enumerate()
        .for_each(|(task, out)| {
            let first = task * features_per_task;
            let w = &w[first * in_f..(first + out.len() / n) * in_f];
            rows_times_weight(x, w, n, in_f, out);
        });
    let mut y = vec![0f32; n * out_f];
    for (task, block) in by_task.chunks(features_per_task * n).enumerate() {
        let (first, features) = (task * features_per_task, block.len() / n);
        for (r, row) in block.chunks_exact(features).enumerate() {
            y[r * out_f + first..][..features].copy_from_slice(row);
        }
    }
    y
}

/// Weight floats per rayon task of [`few_rows_forward`] (128 KiB: amortises the hand-off).
const WEIGHT_FLOATS_PER_TASK: usize = 32_768;

/// `out[r · features + o] = x[r] · w[o]` for every weight row `o` of `w` (`features` of them)
/// and input row `r` of `x`.
fn rows_times_weight<W: WeightElement>(x: &[f32], w: &[W], n: usize, in_f: usize, out: &mut [f32]) {
    // From 4 rows, tiles that reuse each load (below, a tile would repeat rows for nothing).
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports the features the functions were compiled for.
        unsafe {
            if n >= 4 {
                rows_times_weight_fma(x, w, n, in_f, out);
            } else {
                rows_dot_weight_fma(x, w, n, in_f, out);
            }
        }
        return;
    }
    let features = out.len() / n;
    for (o, w_row) in w.chunks_exact(in_f).enumerate() {
        let w_row = W::widened(w_row);
        for r in 0..n {
            out[r * features + o] = dot(&x[r * in_f..(r + 1) * in_f], &w_row);
        }
    }
}

/// [`rows_times_weight`] for 1–3 rows: one fused dot product per pair.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn rows_dot_weight_fma<W: WeightElement>(
    x: &[f32],
    w: &[W],
    n: usize,
    in_f: usize,
    out: &mut [f32],
) {
    let features = out.len() / n;
    for (o, w_row) in w.chunks_exact(in_f).enumerate() {
        for r in 0..n {
            out[r * features + o] = dot_fma(&x[r * in_f..(r + 1) * in_f], w_row);
        }
    }
}

/// A dot product in two AVX2 vectors of fused multiply-adds (the compiler vectorises the lanes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_fma<W: WeightElement>(a: &[f32], b: &[W]) -> f32 {
    let mut acc = [0f32; 16];
    let (a_blocks, a_rest) = a.as_chunks::<16>();
    let (b_blocks, b_rest) = b.as_chunks::<16>();
    for (a, b) in a_blocks.iter().zip(b_blocks) {
        for l in 0..16 {
            acc[l] = a[l].mul_add(b[l].widen(), acc[l]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in a_rest.iter().zip(b_rest) {
        s = a.mul_add(b.widen(), s);
    }
    s
}

/// [`rows_times_weight`] in tiles of 2 weight rows × 4 input rows: each 8-lane slice of a weight
/// row is loaded once for 4 input rows and each input row's once for 2 weight rows, into 8
/// AVX2 accumulators; ragged edges repeat the last row and keep only what is theirs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn rows_times_weight_fma<W: WeightElement>(
    x: &[f32],
    w: &[W],
    n: usize,
    in_f: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let features = out.len() / n;
    assert!(x.len() >= n * in_f && w.len() >= features * in_f);
    let lanes = in_f / 8 * 8;
    for o in (0..features).step_by(2) {
        let w_at = |p: usize| (o + p).min(features - 1) * in_f;
        let w_rows = [w_at(0), w_at(1)];
        for r in (0..n).step_by(4) {
            let x_rows: [usize; 4] = std::array::from_fn(|q| (r + q).min(n - 1) * in_f);
            // SAFETY: every load reads 8 floats at `row + k` with `k + 8 ≤ lanes ≤ in_f`, inside
            // a row that lies in its slice (asserted above); the CPU has AVX2 and FMA (the
            // caller checked).
            let sums = unsafe {
                let mut acc = [_mm256_setzero_ps(); 8];
                for k in (0..lanes).step_by(8) {
                    let w0 = W::load8(w.as_ptr().add(w_rows[0] + k));
                    let w1 = W::load8(w.as_ptr().add(w_rows[1] + k));
                    for q in 0..4 {
                        let xv = _mm256_loadu_ps(x.as_ptr().add(x_rows[q] + k));
                        acc[q] = _mm256_fmadd_ps(xv, w0, acc[q]);
                        acc[4 + q] = _mm256_fmadd_ps(xv, w1, acc[4 + q]);
                    }
                }
                acc.map(|v| {
                    let mut lanes = [0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), v);
                    lanes.iter().sum::<f32>()
                })
            };
            for p in 0..2.min(features - o) {
                for q in 0..4.min(n - r) {
                    let (xr, wr) = (&x[x_rows[q]..][..in_f], &w[w_rows[p]..][..in_f]);
                    let tail = (lanes..in_f).fold(0f32, |s, k| xr[k].mul_add(wr[k].widen(), s));
                    out[(r + q) * features + o + p] = sums[4 * p + q] + tail;
                }
            }
        }
    }
}

/// Gradients of [`linear_forward`]: `dx = dy · W` and `dW = dyᵀ · x`, both written contiguous
/// in their parameter's own layout (so optimizers and clipping read them in one pass).
pub fn linear_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    n: usize,
    in_f: usize,
    out_f: usize,
) -> (Vec<f32>, Vec<f32>) {
    let dx = product_parallel(
        n,
        in_f,
        out_f,
        dy,
        View::rows(0, out_f),
        w,
        View::rows(0, in_f),
    );
    let dw = product_parallel(
        out_f,
        in_f,
        n,
        dy,
        View::rows(0, out_f).t(),
        x,
        View::rows(0, in_f),
    );
    (dx, dw)
}

impl LinearOps for Flex {
    fn fused_linear_forward(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        let (n, in_f, out_f) = (x.shape()[0], x.shape()[1], w.shape()[0]);
        let x = host(&x);
        let y = match w.as_slice::<bf16>() {
            // A bf16 weight, read as it is stored.
            Some(w) => linear_forward(&x, w, n, in_f, out_f),
            _ => linear_forward(&x, &host(&w), n, in_f, out_f),
        };
        flex(y, [n, out_f])
    }

    fn fused_linear_panels_forward(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        let (n, in_f, out_f) = (x.shape()[0], x.shape()[1], w.shape()[0]);
        let x = host(&x);
        let y = match w.as_slice::<bf16>() {
            Some(w) => panel_forward(&x, w, n, in_f, out_f),
            _ => panel_forward(&x, &host(&w), n, in_f, out_f),
        };
        flex(y, [n, out_f])
    }

    fn fused_linear_backward(
        x: FlexTensor,
        w: FlexTensor,
        dy: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let (n, in_f, out_f) = (x.shape()[0], x.shape()[1], w.shape()[0]);
        let (dx, dw) = linear_backward(&host(&x), &host(&w), &host(&dy), n, in_f, out_f);
        (flex(dx, [n, in_f]), flex(dw, [out_f, in_f]))
    }
}
