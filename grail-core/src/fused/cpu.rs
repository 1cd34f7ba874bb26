//! CPU kernels of the fused ops, on plain `f32` slices (row-major), parallel with rayon. The Flex
//! backend runs them; tests check them against the unfused tensor math.
//!
//! Layouts: packed tokens first. Attention tensors are `[tokens, heads, head_dim]` (what the
//! projections give before any transpose); `segments` are `(start, len)` ranges of the token axis
//! that attend causally within themselves. Tokens outside every segment (row padding) get zero
//! outputs and zero gradients.

use rayon::prelude::*;

/// Sizes of one varlen attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionDims {
    /// Tokens on the packed axis.
    pub tokens: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
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

/// Work items: one per (segment, kv head); each owns its queries' rows for the heads of its group.
fn tasks(segments: &[(usize, usize)], kv_heads: usize) -> Vec<(usize, usize, usize)> {
    segments
        .iter()
        .filter(|s| s.1 > 0)
        .flat_map(|&(start, len)| (0..kv_heads).map(move |g| (start, len, g)))
        .collect()
}

/// A strided view of a row-major matrix inside a slice: element (r, c) is at
/// `offset + r·row_stride + c·col_stride`.
#[derive(Clone, Copy)]
struct View {
    offset: usize,
    row_stride: usize,
    col_stride: usize,
}

impl View {
    fn rows(offset: usize, row_stride: usize) -> Self {
        Self {
            offset,
            row_stride,
            col_stride: 1,
        }
    }

    fn t(self) -> Self {
        Self {
            offset: self.offset,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// The largest index touched by an `rows × cols` block (for the bounds check).
    fn end(self, rows: usize, cols: usize) -> usize {
        self.offset + (rows.max(1) - 1) * self.row_stride + (cols.max(1) - 1) * self.col_stride + 1
    }
}

/// `dst[m × n] (row-major, row stride n) = (accumulate ? dst : 0) + alpha · a[m × k] · b[k × n]`,
/// on the calling thread (callers parallelise over tiles).
#[allow(clippy::too_many_arguments)]
fn matmul(
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
fn product_parallel(
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
fn matmul_with(
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

/// A linear layer without bias, `y [n × out] = x [n × in] · Wᵀ` with `W` `[out × in]` (Hugging
/// Face layout), read in place: no transposed copy of the weight.
pub fn linear_forward(x: &[f32], w: &[f32], n: usize, in_f: usize, out_f: usize) -> Vec<f32> {
    product_parallel(
        n,
        out_f,
        in_f,
        x,
        View::rows(0, in_f),
        w,
        View::rows(0, in_f).t(),
    )
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

/// Query rows per tile: scores live in a `[TILE × keys]` scratch, never `[len × len]`.
const TILE: usize = 64;

/// Causal attention within each segment: returns `out` `[tokens, heads, d]` and the per-row
/// log-sum-exp `[tokens, heads]` of the scaled scores (all backward needs besides the inputs).
///
/// Each (segment, kv head) task runs tiles of query rows: `S = Q Kᵀ · scale` over the keys up to
/// the tile's last row (a GEMM), a masked row softmax, `O = P V` (a GEMM). Scratch is one tile of
/// scores per task.
pub fn varlen_attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: AttentionDims,
    segments: &[(usize, usize)],
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let AttentionDims {
        tokens,
        heads,
        kv_heads,
        head_dim: d,
    } = dims;
    let group = heads / kv_heads;
    let work = tasks(segments, kv_heads);
    let parts: Vec<(Vec<f32>, Vec<f32>)> = work
        .par_iter()
        .map(|&(start, len, g)| {
            let mut out = vec![0f32; group * len * d]; // [h][i][d]
            let mut lse = vec![0f32; group * len]; // [h][i]
            let mut scores = vec![0f32; TILE.min(len) * len];
            let kv_view = View::rows((start * kv_heads + g) * d, kv_heads * d);
            for h in 0..group {
                let q_view =
                    |i0: usize| View::rows(((start + i0) * heads + g * group + h) * d, heads * d);
                for i0 in (0..len).step_by(TILE) {
                    let rows = TILE.min(len - i0);
                    let keys = i0 + rows;
                    let s = &mut scores[..rows * keys];
                    matmul(
                        s,
                        rows,
                        keys,
                        d,
                        q,
                        q_view(i0),
                        k,
                        kv_view.t(),
                        scale,
                        false,
                    );
                    for (r, row) in s.chunks_mut(keys).enumerate() {
                        let visible = i0 + r + 1;
                        let max = max_of(&row[..visible]);
                        exp_shifted(&mut row[..visible], max);
                        let sum: f32 = row[..visible].iter().sum();
                        let inv = 1.0 / sum;
                        row[..visible].iter_mut().for_each(|x| *x *= inv);
                        row[visible..].iter_mut().for_each(|x| *x = 0.0);
                        lse[h * len + i0 + r] = max + sum.ln();
                    }
                    let o = &mut out[(h * len + i0) * d..(h * len + i0 + rows) * d];
                    matmul(
                        o,
                        rows,
                        d,
                        keys,
                        s,
                        View::rows(0, keys),
                        v,
                        kv_view,
                        1.0,
                        false,
                    );
                }
            }
            (out, lse)
        })
        .collect();
    let mut out = vec![0f32; tokens * heads * d];
    let mut lse = vec![0f32; tokens * heads];
    for (&(start, len, g), (o, l)) in work.iter().zip(parts) {
        for h in 0..group {
            for i in 0..len {
                let row = (start + i) * heads + g * group + h;
                out[row * d..(row + 1) * d].copy_from_slice(&o[(h * len + i) * d..][..d]);
                lse[row] = l[h * len + i];
            }
        }
    }
    (out, lse)
}

/// Attention of new tokens against a KV cache (decode and prefill for generation, no backward):
/// sequence `i`'s queries are the `queries[i] = (start, len)` rows of `q` `[tokens, heads, d]`,
/// its keys/values `keys[i]` `[kv_len, kv_heads, d]` already include those `len` new tokens at the
/// end, so query `j` sees keys `0 ..= kv_len − len + j`. Parallel over (sequence, kv head).
#[allow(clippy::type_complexity)]
pub fn cached_attention(
    q: &[f32],
    dims: AttentionDims,
    queries: &[(usize, usize)],
    keys: &[(&[f32], &[f32])],
    scale: f32,
) -> Vec<f32> {
    let AttentionDims {
        tokens,
        heads,
        kv_heads,
        head_dim: d,
    } = dims;
    let group = heads / kv_heads;
    let work: Vec<(usize, usize)> = (0..queries.len())
        .filter(|&i| queries[i].1 > 0)
        .flat_map(|i| (0..kv_heads).map(move |g| (i, g)))
        .collect();
    let parts: Vec<Vec<f32>> = work
        .par_iter()
        .map(|&(i, g)| {
            let (start, len) = queries[i];
            let (k, v) = keys[i];
            let kv_len = k.len() / (kv_heads * d);
            let pos0 = kv_len - len;
            let mut out = vec![0f32; group * len * d]; // [h][j][d]
            let mut scores = vec![0f32; TILE.min(len) * kv_len];
            let kv_view = View::rows(g * d, kv_heads * d);
            for h in 0..group {
                let q_view =
                    |j0: usize| View::rows(((start + j0) * heads + g * group + h) * d, heads * d);
                for j0 in (0..len).step_by(TILE) {
                    let rows = TILE.min(len - j0);
                    let keys_seen = pos0 + j0 + rows;
                    let s = &mut scores[..rows * keys_seen];
                    if rows <= SMALL_ROWS {
                        // Decode steps: a GEMM call costs more than these few dot products.
                        let o = &mut out[(h * len + j0) * d..(h * len + j0 + rows) * d];
                        let first = pos0 + j0;
                        let view = q_view(j0);
                        decode_rows(q, view, k, v, kv_view, first, d, scale, s, o);
                        continue;
                    }
                    matmul(
                        s,
                        rows,
                        keys_seen,
                        d,
                        q,
                        q_view(j0),
                        k,
                        kv_view.t(),
                        scale,
                        false,
                    );
                    for (r, row) in s.chunks_mut(keys_seen).enumerate() {
                        let visible = pos0 + j0 + r + 1;
                        let max = max_of(&row[..visible]);
                        exp_shifted(&mut row[..visible], max);
                        let inv = 1.0 / row[..visible].iter().sum::<f32>();
                        row[..visible].iter_mut().for_each(|x| *x *= inv);
                        row[visible..].iter_mut().for_each(|x| *x = 0.0);
                    }
                    let o = &mut out[(h * len + j0) * d..(h * len + j0 + rows) * d];
                    matmul(
                        o,
                        rows,
                        d,
                        keys_seen,
                        s,
                        View::rows(0, keys_seen),
                        v,
                        kv_view,
                        1.0,
                        false,
                    );
                }
            }
            out
        })
        .collect();
    let mut out = vec![0f32; tokens * heads * d];
    for (&(i, g), part) in work.iter().zip(parts) {
        let (start, len) = queries[i];
        for h in 0..group {
            for j in 0..len {
                let row = (start + j) * heads + g * group + h;
                out[row * d..(row + 1) * d].copy_from_slice(&part[(h * len + j) * d..][..d]);
            }
        }
    }
    out
}

/// Query rows below which [`cached_attention`] uses dot products instead of GEMM calls.
const SMALL_ROWS: usize = 4;

/// Attention of a few query rows (decode steps): scores by dot products, output by `axpy`. Row
/// `r` of `out` (`[rows, d]`) sees keys `0 ..= first + r`; `scores` holds `rows × (first + rows)`.
#[allow(clippy::too_many_arguments)]
fn decode_rows(
    q: &[f32],
    qv: View,
    k: &[f32],
    v: &[f32],
    kv: View,
    first: usize,
    d: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let rows = out.len() / d;
    let keys = first + rows;
    for r in 0..rows {
        let qi = &q[qv.offset + r * qv.row_stride..][..d];
        let visible = first + r + 1;
        let row = &mut scores[r * keys..r * keys + visible];
        for (j, s) in row.iter_mut().enumerate() {
            *s = dot(qi, &k[kv.offset + j * kv.row_stride..][..d]) * scale;
        }
        let max = max_of(row);
        exp_shifted(row, max);
        let inv = 1.0 / row.iter().sum::<f32>();
        let o = &mut out[r * d..(r + 1) * d];
        o.iter_mut().for_each(|x| *x = 0.0);
        for (j, &p) in row.iter().enumerate() {
            let vj = &v[kv.offset + j * kv.row_stride..][..d];
            o.iter_mut().zip(vj).for_each(|(o, &x)| *o += p * inv * x);
        }
    }
}

/// Gradients `(dq, dk, dv)` of [`varlen_attention_forward`] given `dout`, recomputing the
/// probabilities tile by tile from the saved log-sum-exp (FlashAttention-2's backward, with
/// GEMMs on the CPU).
#[allow(clippy::too_many_arguments)]
pub fn varlen_attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dims: AttentionDims,
    segments: &[(usize, usize)],
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttentionDims {
        tokens,
        heads,
        kv_heads,
        head_dim: d,
    } = dims;
    let group = heads / kv_heads;
    let work = tasks(segments, kv_heads);
    type Part = (Vec<f32>, Vec<f32>, Vec<f32>);
    let parts: Vec<Part> = work
        .par_iter()
        .map(|&(start, len, g)| {
            let mut dq = vec![0f32; group * len * d]; // [h][i][d]
            let mut dk = vec![0f32; len * d];
            let mut dv = vec![0f32; len * d];
            let tile = TILE.min(len);
            let (mut p, mut dp) = (vec![0f32; tile * len], vec![0f32; tile * len]);
            let kv_view = View::rows((start * kv_heads + g) * d, kv_heads * d);
            for h in 0..group {
                let head_row = |i: usize| (start + i) * heads + g * group + h;
                let row_view = |i0: usize| View::rows(head_row(i0) * d, heads * d);
                for i0 in (0..len).step_by(TILE) {
                    let rows = TILE.min(len - i0);
                    let keys = i0 + rows;
                    let (p, dp) = (&mut p[..rows * keys], &mut dp[..rows * keys]);
                    // P = exp(Q Kᵀ · scale − lse), causal.
                    matmul(
                        p,
                        rows,
                        keys,
                        d,
                        q,
                        row_view(i0),
                        k,
                        kv_view.t(),
                        scale,
                        false,
                    );
                    for (r, row) in p.chunks_mut(keys).enumerate() {
                        let l = lse[head_row(i0 + r)];
                        let visible = i0 + r + 1;
                        exp_shifted(&mut row[..visible], l);
                        row[visible..].iter_mut().for_each(|x| *x = 0.0);
                    }
                    // dV += Pᵀ dO.
                    matmul(
                        &mut dv[..keys * d],
                        keys,
                        d,
                        rows,
                        p,
                        View::rows(0, keys).t(),
                        dout,
                        row_view(i0),
                        1.0,
                        true,
                    );
                    // dP = dO Vᵀ; dS = P ⊙ (dP − rowsum(dO ⊙ O)) · scale (kept in dp).
                    matmul(
                        dp,
                        rows,
                        keys,
                        d,
                        dout,
                        row_view(i0),
                        v,
                        kv_view.t(),
                        1.0,
                        false,
                    );
                    for r in 0..rows {
                        let at = head_row(i0 + r) * d;
                        let delta = dot(&dout[at..at + d], &out[at..at + d]);
                        let (pr, dpr) = (
                            &p[r * keys..(r + 1) * keys],
                            &mut dp[r * keys..(r + 1) * keys],
                        );
                        for (x, &pv) in dpr.iter_mut().zip(pr) {
                            *x = pv * (*x - delta) * scale;
                        }
                    }
                    // dQ = dS K;  dK += dSᵀ Q.
                    let dq_tile = &mut dq[(h * len + i0) * d..(h * len + i0 + rows) * d];
                    matmul(
                        dq_tile,
                        rows,
                        d,
                        keys,
                        dp,
                        View::rows(0, keys),
                        k,
                        kv_view,
                        1.0,
                        false,
                    );
                    matmul(
                        &mut dk[..keys * d],
                        keys,
                        d,
                        rows,
                        dp,
                        View::rows(0, keys).t(),
                        q,
                        row_view(i0),
                        1.0,
                        true,
                    );
                }
            }
            (dq, dk, dv)
        })
        .collect();
    let mut dq = vec![0f32; tokens * heads * d];
    let mut dk = vec![0f32; tokens * kv_heads * d];
    let mut dv = vec![0f32; tokens * kv_heads * d];
    for (&(start, len, g), (q_part, k_part, v_part)) in work.iter().zip(parts) {
        for i in 0..len {
            for h in 0..group {
                let row = (start + i) * heads + g * group + h;
                dq[row * d..(row + 1) * d].copy_from_slice(&q_part[(h * len + i) * d..][..d]);
            }
            let kv = ((start + i) * kv_heads + g) * d;
            dk[kv..kv + d].copy_from_slice(&k_part[i * d..(i + 1) * d]);
            dv[kv..kv + d].copy_from_slice(&v_part[i * d..(i + 1) * d]);
        }
    }
    (dq, dk, dv)
}

/// Rows per rayon task for the element-wise kernels (keeps tasks big enough to amortise).
fn rows_per_task(cols: usize) -> usize {
    (16_384 / cols.max(1)).max(1)
}

/// RMSNorm over the last axis of `x` `[rows, cols]`: `y = x · r · w` with
/// `r = 1 / sqrt(mean(x²) + eps)`. Returns `y` and `r` `[rows]` (all backward keeps).
pub fn rms_norm_forward(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let cols = w.len();
    let rows = x.len() / cols;
    let mut y = vec![0f32; x.len()];
    let mut r = vec![0f32; rows];
    let step = rows_per_task(cols);
    y.par_chunks_mut(step * cols)
        .zip(r.par_chunks_mut(step))
        .zip(x.par_chunks(step * cols))
        .for_each(|((y, r), x)| {
            for ((y, r), x) in y.chunks_mut(cols).zip(r.iter_mut()).zip(x.chunks(cols)) {
                let ms = dot(x, x) / cols as f32;
                *r = 1.0 / (ms + eps).sqrt();
                for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * *r * w;
                }
            }
        });
    (y, r)
}

/// Gradients `(dx, dw)` of [`rms_norm_forward`].
pub fn rms_norm_backward(x: &[f32], w: &[f32], r: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let cols = w.len();
    let step = rows_per_task(cols);
    let mut dx = vec![0f32; x.len()];
    let dw_parts: Vec<Vec<f32>> = dx
        .par_chunks_mut(step * cols)
        .zip(x.par_chunks(step * cols))
        .zip(dy.par_chunks(step * cols))
        .zip(r.par_chunks(step))
        .map(|(((dx, x), dy), r)| {
            let mut dw = vec![0f32; cols];
            for (((dx, x), dy), &r) in dx
                .chunks_mut(cols)
                .zip(x.chunks(cols))
                .zip(dy.chunks(cols))
                .zip(r)
            {
                // g = dy ⊙ w; dx = r (g − x r² mean(g ⊙ x)).
                let mut gx = 0f32;
                for c in 0..cols {
                    gx += dy[c] * w[c] * x[c];
                    dw[c] += dy[c] * x[c] * r;
                }
                let k = r * r * gx / cols as f32;
                for c in 0..cols {
                    dx[c] = r * (dy[c] * w[c] - x[c] * k);
                }
            }
            dw
        })
        .collect();
    let mut dw = vec![0f32; cols];
    for part in dw_parts {
        for (a, b) in dw.iter_mut().zip(part) {
            *a += b;
        }
    }
    (dx, dw)
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_approx(-x))
}

#[inline(always)]
fn swiglu_forward_chunk(o: &mut [f32], g: &[f32], u: &[f32]) {
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = g * sigmoid(g) * u;
    }
}

#[inline(always)]
fn swiglu_backward_chunk(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], d: &[f32]) {
    for i in 0..g
        .len()
        .min(dg.len())
        .min(du.len())
        .min(u.len())
        .min(d.len())
    {
        let s = sigmoid(g[i]);
        du[i] = d[i] * g[i] * s;
        dg[i] = d[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn swiglu_forward_avx2(o: &mut [f32], g: &[f32], u: &[f32]) {
    swiglu_forward_chunk(o, g, u)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn swiglu_backward_avx2(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], d: &[f32]) {
    swiglu_backward_chunk(dg, du, g, u, d)
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// SwiGLU: `silu(gate) · up`, element-wise.
pub fn swiglu_forward(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; gate.len()];
    let avx2 = has_avx2();
    out.par_chunks_mut(16_384)
        .zip(gate.par_chunks(16_384))
        .zip(up.par_chunks(16_384))
        .for_each(|((o, g), u)| {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU has the features the function was compiled for.
                unsafe { swiglu_forward_avx2(o, g, u) };
                return;
            }
            let _ = avx2;
            swiglu_forward_chunk(o, g, u)
        });
    out
}

/// Gradients `(dgate, dup)` of [`swiglu_forward`], recomputed from the inputs (the product is not
/// stored).
pub fn swiglu_backward(gate: &[f32], up: &[f32], dout: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = vec![0f32; gate.len()];
    let mut du = vec![0f32; gate.len()];
    let avx2 = has_avx2();
    dg.par_chunks_mut(16_384)
        .zip(du.par_chunks_mut(16_384))
        .zip(gate.par_chunks(16_384))
        .zip(up.par_chunks(16_384).zip(dout.par_chunks(16_384)))
        .for_each(|(((dg, du), g), (u, d))| {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: as above.
                unsafe { swiglu_backward_avx2(dg, du, g, u, d) };
                return;
            }
            let _ = avx2;
            swiglu_backward_chunk(dg, du, g, u, d)
        });
    (dg, du)
}

/// Rotate-half RoPE of `x` `[tokens, heads, d]` with per-token tables `cos`/`sin` `[tokens, d]`
/// (Hugging Face layout: both halves of a table row hold the same frequencies). With
/// `inverse = true` it applies the transposed rotation, which is the backward of the forward.
pub fn rope(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    heads: usize,
    d: usize,
    inverse: bool,
) -> Vec<f32> {
    let half = d / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(heads * d)
        .zip(x.par_chunks(heads * d))
        .zip(cos.par_chunks(d).zip(sin.par_chunks(d)))
        .for_each(|((o, x), (c, s))| {
            for h in 0..heads {
                let (x, o) = (&x[h * d..(h + 1) * d], &mut o[h * d..(h + 1) * d]);
                for i in 0..half {
                    let (x1, x2) = (x[i], x[i + half]);
                    o[i] = x1 * c[i] - sign * x2 * s[i];
                    o[i + half] = x2 * c[i + half] + sign * x1 * s[i + half];
                }
            }
        });
    out
}

/// `exp` for f32 accurate to ~1 ulp (Cephes' minimax polynomial on `[−ln2/2, ln2/2]` times 2ⁿ),
/// written branch-free so loops over it vectorise. Inputs are clamped to `[−87, 88]` (the softmax
/// callers only pass values ≤ 0; `exp(−87)` ≈ 1.6e−38 stands in for 0).
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
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
fn exp_slice_generic(xs: &mut [f32], shift: f32) {
    for x in xs {
        *x = exp_approx(*x - shift);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_slice_avx2(xs: &mut [f32], shift: f32) {
    exp_slice_generic(xs, shift)
}

/// `x ← exp(x − shift)` over a slice, with AVX2 when the CPU has it.
pub fn exp_shifted(xs: &mut [f32], shift: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports the features the function was compiled for.
        unsafe { exp_slice_avx2(xs, shift) };
        return;
    }
    exp_slice_generic(xs, shift)
}

fn max_of(xs: &[f32]) -> f32 {
    xs.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

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

/// `Σ x²` in f64 (the global gradient norm's building block), one parallel pass.
pub fn sum_squares(x: &[f32]) -> f64 {
    x.par_chunks(16_384)
        .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
        .sum()
}

/// `x · factor`, one parallel pass.
pub fn scale(x: &[f32], factor: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(16_384)
        .zip(x.par_chunks(16_384))
        .for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, x)| *o = x * factor));
    out
}

/// AdamW hyper-parameters of one update (`time` counts updates, starting at 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Added to the root of the second moment.
    pub epsilon: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// Update count including this one (bias correction).
    pub time: i32,
}

/// One AdamW update in a single pass over `(param, grad, m, v)`; returns the new `(param, m, v)`.
/// Same arithmetic, in the same order, as burn's `AdamW`.
pub fn adamw(
    param: &[f32],
    grad: &[f32],
    m: &[f32],
    v: &[f32],
    s: AdamWStep,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = param.len();
    let (mut p_out, mut m_out, mut v_out) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    let c1 = 1.0 - s.beta1.powi(s.time);
    let c2 = 1.0 - s.beta2.powi(s.time);
    let decay = 1.0 - s.lr * s.weight_decay;
    const CHUNK: usize = 16_384;
    p_out
        .par_chunks_mut(CHUNK)
        .zip(m_out.par_chunks_mut(CHUNK))
        .zip(v_out.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(c, ((po, mo), vo))| {
            let at = c * CHUNK;
            for i in 0..po.len() {
                let (g, j) = (grad[at + i], at + i);
                mo[i] = m[j] * s.beta1 + g * (1.0 - s.beta1);
                vo[i] = v[j] * s.beta2 + g * g * (1.0 - s.beta2);
                let delta = (mo[i] / c1) / ((vo[i] / c2).sqrt() + s.epsilon);
                po[i] = param[j] * decay - delta * s.lr;
            }
        });
    (p_out, m_out, v_out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Plain O(n²)-memory attention of one segment/head in f64: the reference.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dims: AttentionDims,
        segments: &[(usize, usize)],
        scale: f32,
    ) -> Vec<f32> {
        let AttentionDims {
            tokens,
            heads,
            kv_heads,
            head_dim: d,
        } = dims;
        let group = heads / kv_heads;
        let mut out = vec![0f32; tokens * heads * d];
        for &(start, len) in segments {
            for h in 0..heads {
                let g = h / group;
                for i in 0..len {
                    let qi = &q[((start + i) * heads + h) * d..][..d];
                    let s: Vec<f64> = (0..=i)
                        .map(|j| {
                            let kj = &k[((start + j) * kv_heads + g) * d..][..d];
                            qi.iter().zip(kj).map(|(a, b)| (a * b) as f64).sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    for c in 0..d {
                        let o: f64 = (0..=i)
                            .map(|j| {
                                (s[j] - m).exp() / z
                                    * v[((start + j) * kv_heads + g) * d + c] as f64
                            })
                            .sum();
                        out[((start + i) * heads + h) * d + c] = o as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn exp_approx_is_accurate() {
        let mut xs: Vec<f32> = (0..20_001).map(|i| -87.0 + i as f32 * 0.0087).collect();
        let want: Vec<f32> = xs.iter().map(|x| x.exp()).collect();
        exp_shifted(&mut xs, 0.0);
        for (a, b) in xs.iter().zip(&want) {
            assert!(((a - b) / b).abs() < 4e-7, "{a} vs {b}");
        }
    }

    #[test]
    fn forward_matches_the_reference_with_gqa_and_odd_segments() {
        for (heads, kv) in [(2, 2), (4, 2), (4, 1)] {
            let dims = AttentionDims {
                tokens: 161,
                heads,
                kv_heads: kv,
                head_dim: 6,
            };
            // A length-1 segment, odd lengths, one over two query tiles, two padding tokens.
            let segs = [(0, 1), (1, 7), (8, 11), (19, 140)];
            let q = lcg(161 * heads * 6, 1);
            let k = lcg(161 * kv * 6, 2);
            let v = lcg(161 * kv * 6, 3);
            let (out, _) = varlen_attention_forward(&q, &k, &v, dims, &segs, 0.4);
            let want = reference(&q, &k, &v, dims, &segs, 0.4);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
            assert!(out[159 * heads * 6..].iter().all(|&x| x == 0.0), "padding");
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let dims = AttentionDims {
            tokens: 9,
            heads: 4,
            kv_heads: 2,
            head_dim: 4,
        };
        let segs = [(0, 5), (5, 1), (6, 3)];
        let (q, k, v) = (lcg(9 * 16, 4), lcg(9 * 8, 5), lcg(9 * 8, 6));
        let w = lcg(9 * 16, 7); // loss = Σ w ⊙ out
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            let o = reference(q, k, v, dims, &segs, 0.5);
            o.iter().zip(&w).map(|(a, b)| (a * b) as f64).sum()
        };
        let (out, lse) = varlen_attention_forward(&q, &k, &v, dims, &segs, 0.5);
        let (dq, dk, dv) = varlen_attention_backward(&q, &k, &v, &out, &lse, &w, dims, &segs, 0.5);
        let eps = 1e-3;
        for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
            for i in (0..grad.len()).step_by(5) {
                let mut inputs = [q.clone(), k.clone(), v.clone()];
                inputs[which][i] += eps;
                let up = loss(&inputs[0], &inputs[1], &inputs[2]);
                inputs[which][i] -= 2.0 * eps;
                let down = loss(&inputs[0], &inputs[1], &inputs[2]);
                let fd = (up - down) / (2.0 * eps as f64);
                assert!(
                    (fd - grad[i] as f64).abs() < 2e-3,
                    "input {which} [{i}]: fd {fd} vs {}",
                    grad[i]
                );
            }
        }
    }
}
