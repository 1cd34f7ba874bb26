//! The matrix products the CPU kernels share (linear, attention tiles, log-prob tiles): the
//! `gemm` crate over strided views of row-major slices, so no operand is ever transposed in
//! memory.

#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Four independent accumulators let the compiler vectorise without reassociating one sum.
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// A strided view of a row-major matrix inside a slice: element (r, c) is at
/// `offset + r·row_stride + c·col_stride`.
#[derive(Clone, Copy)]
pub(crate) struct View {
    pub(crate) offset: usize,
    pub(crate) row_stride: usize,
    pub(crate) col_stride: usize,
}

impl View {
    pub(crate) fn rows(offset: usize, row_stride: usize) -> Self {
        Self {
            offset,
            row_stride,
            col_stride: 1,
        }
    }

    pub(crate) fn t(self) -> Self {
        Self {
            offset: self.offset,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// The largest index touched by an `rows × cols` block (for the bounds check).
    pub(crate) fn end(self, rows: usize, cols: usize) -> usize {
        self.offset + (rows.max(1) - 1) * self.row_stride + (cols.max(1) - 1) * self.col_stride + 1
    }
}

/// `dst[m × n] (row-major, row stride n) = (accumulate ? dst : 0) + alpha · a[m × k] · b[k × n]`,
/// on the calling thread (callers parallelise over tiles).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    av: View,
    b: &[f32],
    bv: View,
    alpha: f32,
    accumulate: bool,
) {
    matmul_with(
        dst,
        m,
        n,
        k,
        a,
        av,
        b,
        bv,
        alpha,
        accumulate,
        gemm::Parallelism::None,
    )
}

/// A new `m × n` product `a · b` spread over rayon's threads (for one large product). The output
/// is written by the GEMM directly, without zero-filling it first.
pub(crate) fn product_parallel(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    av: View,
    b: &[f32],
    bv: View,
) -> Vec<f32> {
    if m == 0 || n == 0 || k == 0 {
        return vec![0f32; m * n];
    }
    assert!(
        a.len() >= av.end(m, k) && b.len() >= bv.end(k, n),
        "product: view out of bounds"
    );
    // Small products (decode steps) lose more to thread hand-offs than they gain.
    let parallelism = if m * n * k < 1 << 20 {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    };
    let mut out = Vec::<f32>::with_capacity(m * n);
    // SAFETY: the views lie inside `a` and `b` (checked above); with `read_dst = false` the GEMM
    // writes all m·n destination elements without reading them, so the buffer is initialised
    // before `set_len`, and no reference to uninitialised memory is ever made.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr().add(av.offset),
            av.col_stride as isize,
            av.row_stride as isize,
            b.as_ptr().add(bv.offset),
            bv.col_stride as isize,
            bv.row_stride as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
        out.set_len(m * n);
    }
    out
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_with(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    av: View,
    b: &[f32],
    bv: View,
    alpha: f32,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= m * n, "matmul: destination too small");
    assert!(
        a.len() >= av.end(m, k) && b.len() >= bv.end(k, n),
        "matmul: view out of bounds"
    );
    // SAFETY: every index the kernel touches lies inside the slices (checked above); `dst` is
    // exclusively borrowed and does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr().add(av.offset),
            av.col_stride as isize,
            av.row_stride as isize,
            b.as_ptr().add(bv.offset),
            bv.col_stride as isize,
            bv.row_stride as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}
