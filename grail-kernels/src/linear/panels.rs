//! The panel layout of a linear weight and its CPU kernel. A weight `W` `[out, in]` in panel
//! order holds, for each run of [`PANEL`] output features, the features' values of input 0, then
//! of input 1, …: element `(f, k)` sits at `(f / PANEL) · in · PANEL + k · PANEL + f % PANEL`.
//! The kernel then reads one contiguous 16-wide row of weights per input and multiplies it by
//! each input row's value broadcast, into accumulators that already hold whole output rows: no
//! horizontal sums, no per-call packing, each weight read once per call (rollout copies are
//! packed once when built; see grail-core's `CausalLm::with_panel_matrices`).

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use crate::cpu_math::has_avx2;

use super::cpu::WeightElement;

/// Output features per panel (two AVX2 vectors).
pub const PANEL: usize = 16;

/// Input rows a task keeps hot while it walks its panels (48 rows of 1,536 f32 = 288 KiB, in L2).
const ROW_BLOCK: usize = 48;

/// Weight values per rayon task (as the few-row linear: amortises the hand-off).
const WEIGHT_VALUES_PER_TASK: usize = 32_768;

/// The values of `w` `[out, in]` (row-major) in panel order, on the host: what
/// [`panel_order`](super::panel_order) computes, with one copy of the weight instead of a
/// device round trip. `out` must be a multiple of [`PANEL`].
pub fn to_panel_order<T: Copy>(w: &[T], out: usize, inp: usize) -> Vec<T> {
    assert!(
        out.is_multiple_of(PANEL) && w.len() == out * inp,
        "to_panel_order: {} values for [{out}, {inp}] (rows a multiple of {PANEL})",
        w.len()
    );
    if inp == 0 {
        return Vec::new();
    }
    let mut packed = Vec::with_capacity(w.len());
    for panel in w.chunks_exact(PANEL * inp) {
        for k in 0..inp {
            packed.extend((0..PANEL).map(|f| panel[f * inp + k]));
        }
    }
    packed
}

/// `y [n × out] = x [n × in] · Wᵀ` for `W` in panel order: tasks take runs of panels, and each
/// writes its panels' columns of `y` in place.
pub fn panel_forward<W: WeightElement>(
    x: &[f32],
    panels: &[W],
    n: usize,
    inp: usize,
    out: usize,
) -> Vec<f32> {
    assert!(
        out.is_multiple_of(PANEL) && x.len() >= n * inp && panels.len() >= out * inp,
        "linear (panels): operands do not match [{n}, {inp}] · [{out}, {inp}]ᵀ"
    );
    if n == 0 || out == 0 {
        return vec![0f32; n * out];
    }
    // Every element is written below (each panel's 16 columns of every row): no zeroing pass.
    let mut y: Vec<f32> = Vec::with_capacity(n * out);
    let count = out / PANEL;
    let per_task = (WEIGHT_VALUES_PER_TASK / (inp * PANEL).max(1)).max(1);
    let y_at = OutPtr(y.as_mut_ptr());
    (0..count.div_ceil(per_task))
        .into_par_iter()
        .for_each(|task| {
            let first = task * per_task;
            let panels_here = first..(first + per_task).min(count);
            // SAFETY: `y` has room for `n × out` values and outlives the parallel loop, and each
            // task writes only the columns of its own panels (disjoint across tasks) in rows
            // `0..n`.
            unsafe { panels_times(x, panels, n, inp, out, panels_here, y_at) };
        });
    // SAFETY: the tasks above wrote all `n × out` elements (see the comment at the allocation).
    unsafe { y.set_len(n * out) };
    y
}

/// The output's base pointer, shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the tasks holding it write disjoint elements (see `panel_forward`).
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// Rows `0..n` of `y` at the columns of panels `range`, blocks of [`ROW_BLOCK`] rows at a time.
///
/// # Safety
/// `y` points at `n × out` writable floats no other thread writes at these columns.
unsafe fn panels_times<W: WeightElement>(
    x: &[f32],
    panels: &[W],
    n: usize,
    inp: usize,
    out: usize,
    range: std::ops::Range<usize>,
    y: OutPtr,
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        for block in (0..n).step_by(ROW_BLOCK) {
            for p in range.clone() {
                let panel = &panels[p * inp * PANEL..(p + 1) * inp * PANEL];
                let mut r = block;
                while r < (block + ROW_BLOCK).min(n) {
                    let rows = ((block + ROW_BLOCK).min(n) - r).min(6);
                    let x = &x[r * inp..(r + rows) * inp];
                    // SAFETY: the caller's contract covers rows `r..r + rows` at these columns;
                    // the CPU has AVX2 and FMA.
                    unsafe {
                        let y = y.0.add(r * out + p * PANEL);
                        match rows {
                            6 => tile_fma::<W, 6>(x, inp, panel, y, out),
                            5 => tile_fma::<W, 5>(x, inp, panel, y, out),
                            4 => tile_fma::<W, 4>(x, inp, panel, y, out),
                            3 => tile_fma::<W, 3>(x, inp, panel, y, out),
                            2 => tile_fma::<W, 2>(x, inp, panel, y, out),
                            _ => tile_fma::<W, 1>(x, inp, panel, y, out),
                        }
                    }
                    r += rows;
                }
            }
        }
        return;
    }
    for r in 0..n {
        let x = &x[r * inp..(r + 1) * inp];
        for p in range.clone() {
            let panel = &panels[p * inp * PANEL..(p + 1) * inp * PANEL];
            let mut acc = [0f32; PANEL];
            for (k, &xk) in x.iter().enumerate() {
                for (a, w) in acc.iter_mut().zip(&panel[k * PANEL..(k + 1) * PANEL]) {
                    *a = xk.mul_add(w.widen(), *a);
                }
            }
            // SAFETY: the caller's contract.
            unsafe {
                std::ptr::copy_nonoverlapping(acc.as_ptr(), y.0.add(r * out + p * PANEL), PANEL)
            };
        }
    }
}

/// `R` rows of `x` (`[R, inp]`) times one panel: `R × 16` accumulators in AVX2 registers (12 at
/// most, with the panel row's two vectors and a broadcast: the 16 registers).
///
/// # Safety
/// `y` points at row 0, column 0 of the tile in a row-major output of `stride` columns, with `R`
/// rows of 16 writable floats; the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_fma<W: WeightElement, const R: usize>(
    x: &[f32],
    inp: usize,
    panel: &[W],
    y: *mut f32,
    stride: usize,
) {
    use std::arch::x86_64::*;
    assert!(x.len() >= R * inp && panel.len() >= inp * PANEL);
    // SAFETY: every read is inside `x` (`r · inp + k < R · inp`) or `panel` (`k · 16 + 16 ≤
    // inp · 16`), asserted above; the writes are the caller's contract.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let (xs, mut w) = (x.as_ptr(), panel.as_ptr());
        for k in 0..inp {
            let lo = W::load8(w);
            let hi = W::load8(w.add(8));
            for (r, acc) in acc.iter_mut().enumerate() {
                let xb = _mm256_broadcast_ss(&*xs.add(r * inp + k));
                acc[0] = _mm256_fmadd_ps(xb, lo, acc[0]);
                acc[1] = _mm256_fmadd_ps(xb, hi, acc[1]);
            }
            w = w.add(PANEL);
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(y.add(r * stride), acc[0]);
            _mm256_storeu_ps(y.add(r * stride + 8), acc[1]);
        }
    }
}
