//! CPU attention kernels: per (segment, kv head) task, tiles of query rows against the keys up to
//! the tile's last row, a GEMM for the scores and one for the output; scratch is one tile of
//! scores per task.

use burn::backend::Flex;
use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use rayon::prelude::*;

use super::{AttentionOps, CachedSpan, PagedSpan};
use crate::cpu_gemm::{View, dot, matmul};
#[cfg(target_arch = "x86_64")]
use crate::cpu_math::has_avx2;
use crate::cpu_math::{exp_shifted, softmax_in_place};
use crate::flex_io::{flex, host};

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

/// Work items: one per (segment, kv head); each owns its queries' rows for the heads of its group.
fn tasks(segments: &[(usize, usize)], kv_heads: usize) -> Vec<(usize, usize, usize)> {
    segments
        .iter()
        .filter(|s| s.1 > 0)
        .flat_map(|&(start, len)| (0..kv_heads).map(move |g| (start, len, g)))
        .collect()
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
                        let (max, sum) = softmax_in_place(&mut row[..visible]);
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

/// Where one sequence's keys and values live for [`cached_attention`]: rows
/// `[positions, kv_heads, d]` of `keys`/`values`, position `p` at row
/// `blocks[p / block_size] · block_size + p % block_size` (a paged cache shared by many
/// sequences; a sequence's own contiguous cache is one block, [`HostKv::contiguous`]).
#[derive(Debug, Clone, Copy)]
pub struct HostKv<'a> {
    /// Keys, `[rows, kv_heads, d]`.
    pub keys: &'a [f32],
    /// Values, same layout.
    pub values: &'a [f32],
    /// The sequence's blocks in position order.
    pub blocks: &'a [u32],
    /// Positions per block.
    pub block_size: usize,
    /// Positions cached, the new tokens' included.
    pub len: usize,
}

impl<'a> HostKv<'a> {
    /// A sequence's own cache: `len` positions from row 0 of `keys`/`values` (each row
    /// `row_width` = `kv_heads × d` values).
    pub fn contiguous(keys: &'a [f32], values: &'a [f32], row_width: usize) -> Self {
        let len = keys.len() / row_width.max(1);
        Self {
            keys,
            values,
            blocks: &[0],
            block_size: len.max(1),
            len,
        }
    }

    /// The storage row of position `p`.
    fn row(&self, p: usize) -> usize {
        self.blocks[p / self.block_size] as usize * self.block_size + p % self.block_size
    }

    /// Whether positions `0..len` are consecutive rows (one block, or blocks in id order).
    fn consecutive(&self) -> bool {
        let used = self.len.div_ceil(self.block_size);
        self.blocks[..used].windows(2).all(|w| w[1] == w[0] + 1)
    }
}

/// Attention of new tokens against a KV cache (decode and prefill for generation, no backward):
/// sequence `i`'s queries are the `queries[i] = (start, len)` rows of `q` `[tokens, heads, d]`,
/// its keys/values `kv[i]` hold `kv[i].len` positions, those `len` new tokens last, so query `j`
/// sees positions `0 ..= kv_len − len + j`. Parallel over (sequence, kv head).
pub fn cached_attention(
    q: &[f32],
    dims: AttentionDims,
    queries: &[(usize, usize)],
    kv: &[HostKv<'_>],
    scale: f32,
) -> Vec<f32> {
    let AttentionDims {
        tokens,
        heads,
        kv_heads,
        head_dim: d,
    } = dims;
    let group = heads / kv_heads;
    let row_width = kv_heads * d;
    let work: Vec<(usize, usize)> = (0..queries.len())
        .filter(|&i| queries[i].1 > 0)
        .flat_map(|i| (0..kv_heads).map(move |g| (i, g)))
        .collect();
    let parts: Vec<Vec<f32>> = work
        .par_iter()
        .map(|&(i, g)| {
            let (start, len) = queries[i];
            let cache = &kv[i];
            let kv_len = cache.len;
            let pos0 = kv_len - len;
            let mut out = vec![0f32; group * len * d]; // [h][j][d]
            let mut scores = vec![0f32; TILE.min(len) * kv_len];
            let key_at = |p: usize| cache.row(p) * row_width + g * d;
            let q_view = |h: usize, j0: usize| {
                View::rows(((start + j0) * heads + g * group + h) * d, heads * d)
            };
            if len <= SMALL_ROWS {
                // Decode steps: a GEMM call costs more than these few dot products.
                for h in 0..group {
                    let o = &mut out[h * len * d..(h + 1) * len * d];
                    let rows = (q, q_view(h, 0));
                    decode_rows(rows, cache, &key_at, pos0, d, scale, &mut scores, o);
                }
                return out;
            }
            // The GEMMs read this head's keys as one strided matrix: in place when the positions
            // are consecutive rows, else from a copy gathered block by block.
            let gathered = (!cache.consecutive()).then(|| {
                let gather = |src: &[f32]| -> Vec<f32> {
                    (0..kv_len)
                        .flat_map(|p| &src[key_at(p)..key_at(p) + d])
                        .copied()
                        .collect()
                };
                (gather(cache.keys), gather(cache.values))
            });
            let (k, v, kv_view) = match &gathered {
                Some((k, v)) => (k.as_slice(), v.as_slice(), View::rows(0, d)),
                None => (cache.keys, cache.values, View::rows(key_at(0), row_width)),
            };
            for h in 0..group {
                for j0 in (0..len).step_by(TILE) {
                    let rows = TILE.min(len - j0);
                    let keys_seen = pos0 + j0 + rows;
                    let s = &mut scores[..rows * keys_seen];
                    matmul(
                        s,
                        rows,
                        keys_seen,
                        d,
                        q,
                        q_view(h, j0),
                        k,
                        kv_view.t(),
                        scale,
                        false,
                    );
                    for (r, row) in s.chunks_mut(keys_seen).enumerate() {
                        let visible = pos0 + j0 + r + 1;
                        softmax_in_place(&mut row[..visible]);
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

/// Query rows up to which [`cached_attention`] uses dot products instead of GEMM calls.
const SMALL_ROWS: usize = 4;

/// Attention of a few query rows (decode steps): scores by dot products, output by `axpy`. Row
/// `r` of `out` (`[rows, d]`) sees positions `0 ..= first + r`, position `p`'s key and value at
/// offset `key_at(p)` of the cache; `scores` holds `rows × (first + rows)`.
#[allow(clippy::too_many_arguments)]
fn decode_rows(
    (q, qv): (&[f32], View),
    cache: &HostKv<'_>,
    key_at: &impl Fn(usize) -> usize,
    first: usize,
    d: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(8) && has_avx2() {
        // SAFETY: the CPU supports the features the function was compiled for.
        unsafe { decode_rows_fma((q, qv), cache, key_at, first, d, scale, scores, out) };
        return;
    }
    let rows = out.len() / d;
    let keys = first + rows;
    for r in 0..rows {
        let qi = &q[qv.offset + r * qv.row_stride..][..d];
        let visible = first + r + 1;
        let row = &mut scores[r * keys..r * keys + visible];
        for (p, s) in row.iter_mut().enumerate() {
            *s = dot(qi, &cache.keys[key_at(p)..][..d]) * scale;
        }
        softmax_in_place(row);
        let o = &mut out[r * d..(r + 1) * d];
        o.iter_mut().for_each(|x| *x = 0.0);
        for (p, &w) in row.iter().enumerate() {
            let vp = &cache.values[key_at(p)..][..d];
            o.iter_mut().zip(vp).for_each(|(o, &x)| *o += w * x);
        }
    }
}

/// [`decode_rows`] in AVX2 FMA for head widths of whole 8-lane vectors: the scores of four keys
/// at a time, their four sums reduced together (a dot product's own reduction cost as much as
/// its products at these widths); the output summed in registers, 64 lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn decode_rows_fma(
    (q, qv): (&[f32], View),
    cache: &HostKv<'_>,
    key_at: &impl Fn(usize) -> usize,
    first: usize,
    d: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let rows = out.len() / d;
    let keys = first + rows;
    for r in 0..rows {
        let qi = &q[qv.offset + r * qv.row_stride..][..d];
        let visible = first + r + 1;
        let row = &mut scores[r * keys..r * keys + visible];
        let quads = visible / 4 * 4;
        for p in (0..quads).step_by(4) {
            let k: [&[f32]; 4] = std::array::from_fn(|j| &cache.keys[key_at(p + j)..][..d]);
            // SAFETY: each load reads 8 floats at `c` with `c + 8 ≤ d` of a slice of `d` floats
            // (`d` a multiple of 8), the store 4 floats at `p + 4 ≤ quads ≤ row.len()`.
            unsafe {
                let mut acc = [_mm256_setzero_ps(); 4];
                for c in (0..d).step_by(8) {
                    let qc = _mm256_loadu_ps(qi.as_ptr().add(c));
                    for j in 0..4 {
                        let kc = _mm256_loadu_ps(k[j].as_ptr().add(c));
                        acc[j] = _mm256_fmadd_ps(qc, kc, acc[j]);
                    }
                }
                // Pairwise sums leave, in each 128-bit half, that half's sums of keys 0–3.
                let pairs = _mm256_hadd_ps(
                    _mm256_hadd_ps(acc[0], acc[1]),
                    _mm256_hadd_ps(acc[2], acc[3]),
                );
                let sums = _mm_add_ps(
                    _mm256_castps256_ps128(pairs),
                    _mm256_extractf128_ps::<1>(pairs),
                );
                _mm_storeu_ps(
                    row.as_mut_ptr().add(p),
                    _mm_mul_ps(sums, _mm_set1_ps(scale)),
                );
            }
        }
        for (p, s) in row.iter_mut().enumerate().skip(quads) {
            *s = dot(qi, &cache.keys[key_at(p)..][..d]) * scale;
        }
        softmax_in_place(row);
        let o = &mut out[r * d..(r + 1) * d];
        for c0 in (0..d).step_by(64) {
            let lanes = (d - c0).min(64) / 8;
            // SAFETY: each load reads 8 floats at `c0 + 8·l + 8 ≤ d` of position `p`'s value row
            // (`d` floats from `key_at(p)`), each store 8 floats inside `o` (`d` floats).
            unsafe {
                let mut acc = [_mm256_setzero_ps(); 8];
                for (p, &w) in row.iter().enumerate() {
                    let wv = _mm256_set1_ps(w);
                    let v = cache.values[key_at(p)..][..d].as_ptr().add(c0);
                    for (l, a) in acc.iter_mut().enumerate().take(lanes) {
                        *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(v.add(8 * l)), *a);
                    }
                }
                for (l, a) in acc.iter().enumerate().take(lanes) {
                    _mm256_storeu_ps(o.as_mut_ptr().add(c0 + 8 * l), *a);
                }
            }
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

fn attention_dims(q: &FlexTensor, k: &FlexTensor) -> AttentionDims {
    let (qs, ks) = (q.shape(), k.shape());
    AttentionDims {
        tokens: qs[0],
        heads: qs[1],
        kv_heads: ks[1],
        head_dim: qs[2],
    }
}

impl AttentionOps for Flex {
    fn fused_attention_forward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        segments: Vec<(usize, usize)>,
        scale: f32,
    ) -> (FlexTensor, FlexTensor) {
        let dims = attention_dims(&q, &k);
        let (out, lse) =
            varlen_attention_forward(&host(&q), &host(&k), &host(&v), dims, &segments, scale);
        (
            flex(out, [dims.tokens, dims.heads, dims.head_dim]),
            flex(lse, [dims.tokens, dims.heads]),
        )
    }

    fn fused_attention_backward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        out: FlexTensor,
        lse: FlexTensor,
        dout: FlexTensor,
        segments: Vec<(usize, usize)>,
        scale: f32,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let dims = attention_dims(&q, &k);
        let (dq, dk, dv) = varlen_attention_backward(
            &host(&q),
            &host(&k),
            &host(&v),
            &host(&out),
            &host(&lse),
            &host(&dout),
            dims,
            &segments,
            scale,
        );
        let kv_shape = [dims.tokens, dims.kv_heads, dims.head_dim];
        (flex(dq, q.shape()), flex(dk, kv_shape), flex(dv, kv_shape))
    }

    fn fused_cached_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        spans: Vec<CachedSpan>,
        scale: f32,
    ) -> FlexTensor {
        let dims = attention_dims(&q, &k);
        let (k, v) = (host(&k), host(&v));
        let row = dims.kv_heads * dims.head_dim;
        let queries: Vec<(usize, usize)> = spans.iter().map(|s| (s.q_start, s.q_len)).collect();
        let kv: Vec<HostKv<'_>> = spans
            .iter()
            .map(|s| {
                let rows = s.k_start * row..(s.k_start + s.k_len) * row;
                HostKv::contiguous(&k[rows.clone()], &v[rows], row)
            })
            .collect();
        let out = cached_attention(&host(&q), dims, &queries, &kv, scale);
        flex(out, q.shape())
    }

    fn fused_paged_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        spans: Vec<PagedSpan>,
        block_size: usize,
        scale: f32,
    ) -> FlexTensor {
        let dims = attention_dims(&q, &k);
        let (k, v) = (host(&k), host(&v));
        let queries: Vec<(usize, usize)> = spans.iter().map(|s| (s.q_start, s.q_len)).collect();
        let kv: Vec<HostKv<'_>> = spans
            .iter()
            .map(|s| HostKv {
                keys: &k,
                values: &v,
                blocks: &s.blocks,
                block_size,
                len: s.k_len,
            })
            .collect();
        let out = cached_attention(&host(&q), dims, &queries, &kv, scale);
        flex(out, q.shape())
    }
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

    #[test]
    fn a_paged_cache_gives_the_contiguous_cache_bit_for_bit() {
        for d in [6, 16] {
            paged_equals_contiguous(d);
        }
    }

    fn paged_equals_contiguous(d: usize) {
        let (kv_heads, block_size) = (2, 3);
        let dims = AttentionDims {
            tokens: 1 + 3 + 70,
            heads: 4,
            kv_heads,
            head_dim: d,
        };
        let row = kv_heads * d;
        // Three sequences: a decode row, a few rows, a prefill over two query tiles; their
        // positions already cached before the new ones.
        let (queries, lens) = ([(0, 1), (1, 3), (4, 70)], [9, 14, 75]);
        let q = lcg(dims.tokens * dims.heads * d, 8);
        let own: Vec<(Vec<f32>, Vec<f32>)> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| (lcg(n * row, 10 + i as u64), lcg(n * row, 20 + i as u64)))
            .collect();
        let contiguous: Vec<HostKv<'_>> = own
            .iter()
            .map(|(k, v)| HostKv::contiguous(k, v, row))
            .collect();
        // The same positions scattered over a shared pool: blocks handed out in a shuffled order.
        let needed: Vec<usize> = lens.iter().map(|n| n.div_ceil(block_size)).collect();
        let total: usize = needed.iter().sum();
        let mut order: Vec<u32> = (0..total as u32).collect();
        order.reverse();
        order.swap(2, 7);
        let (mut keys, mut values) = (
            vec![0f32; total * block_size * row],
            vec![0f32; total * block_size * row],
        );
        let mut tables = Vec::new();
        let mut next = 0;
        for (i, (k, v)) in own.iter().enumerate() {
            let blocks = order[next..next + needed[i]].to_vec();
            next += needed[i];
            for p in 0..lens[i] {
                let at = (blocks[p / block_size] as usize * block_size + p % block_size) * row;
                keys[at..at + row].copy_from_slice(&k[p * row..(p + 1) * row]);
                values[at..at + row].copy_from_slice(&v[p * row..(p + 1) * row]);
            }
            tables.push(blocks);
        }
        let paged: Vec<HostKv<'_>> = tables
            .iter()
            .zip(lens)
            .map(|(blocks, len)| HostKv {
                keys: &keys,
                values: &values,
                blocks,
                block_size,
                len,
            })
            .collect();
        let want = cached_attention(&q, dims, &queries, &contiguous, 0.3);
        let got = cached_attention(&q, dims, &queries, &paged, 0.3);
        assert!(
            want.iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        assert!(want.iter().any(|&x| x != 0.0));
    }
}
