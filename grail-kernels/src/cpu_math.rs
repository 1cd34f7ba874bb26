//! Element-wise helpers the CPU kernels share: a vectorisable `exp`, AVX2 dispatch, row maxima
//! and the rows each rayon task takes.

/// Rows per rayon task for the element-wise kernels (keeps tasks big enough to amortise).
pub(crate) fn rows_per_task(cols: usize) -> usize {
    (16_384 / cols.max(1)).max(1)
}

pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `exp` for f32 accurate to ~1 ulp (Cephes' minimax polynomial on `[−ln2/2, ln2/2]` times 2ⁿ),
/// written branch-free so loops over it vectorise. Inputs are clamped to `[−87, 88]` (the softmax
/// callers only pass values ≤ 0; `exp(−87)` ≈ 1.6e−38 stands in for 0).
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding it rounds to the nearest integer, which lands in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    let n = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    e * f32::from_bits(((n + 127) as u32) << 23)
}

#[inline(always)]
pub(crate) fn exp_slice_generic(xs: &mut [f32], shift: f32) {
    for x in xs {
        *x = exp_approx(*x - shift);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn exp_slice_avx2(xs: &mut [f32], shift: f32) {
    exp_slice_generic(xs, shift)
}

/// `x ← exp(x − shift)` over a slice, with AVX2 when the CPU has it.
pub(crate) fn exp_shifted(xs: &mut [f32], shift: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports the features the function was compiled for.
        unsafe { exp_slice_avx2(xs, shift) };
        return;
    }
    exp_slice_generic(xs, shift)
}

pub(crate) fn max_of(xs: &[f32]) -> f32 {
    xs.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// Softmax of `row` in place, shifted by its maximum for range; returns that maximum and the sum
/// of the shifted exponentials (the row's log-sum-exp is `max + sum.ln()`).
pub(crate) fn softmax_in_place(row: &mut [f32]) -> (f32, f32) {
    let max = max_of(row);
    exp_shifted(row, max);
    let sum: f32 = row.iter().sum();
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
    (max, sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_approx_is_accurate() {
        let mut xs: Vec<f32> = (0..20_001).map(|i| -87.0 + i as f32 * 0.0087).collect();
        let want: Vec<f32> = xs.iter().map(|x| x.exp()).collect();
        exp_shifted(&mut xs, 0.0);
        for (a, b) in xs.iter().zip(&want) {
            assert!(((a - b) / b).abs() < 4e-7, "{a} vs {b}");
        }
    }
}
