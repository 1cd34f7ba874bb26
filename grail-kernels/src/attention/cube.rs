//! Attention on the CubeCL backends: one GPU thread per query row × head for the forward and `dq`,
//! per key row × kv head for `dk`/`dv`, loops over the row in registers. No shared memory on
//! purpose: as CubeCL's SPIR-V declares it, it crashes lavapipe's compiler, and these kernels are
//! checked in CI on lavapipe. Same math as the CPU kernels, f32 throughout.

// Kernel code indexes buffers explicitly: iterators do not exist inside `#[cube]` functions.
#![allow(clippy::needless_range_loop)]

use burn::backend::TensorMetadata;
use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::{AttentionOps, CachedSpan, PagedSpan};
use crate::cube_launch::{arg, dims3, empty_like, f32_contiguous, grid, u32_arg, u32_buffer};

/// Attention forward, one thread per (query token, head): an online softmax over the `key_len[t]`
/// keys token `t` sees, read from `k`/`v` through a block list: key `p` at row
/// `block_rows[first_block[t] + p / block_size] + p % block_size` (a paged cache; one block
/// per token when keys are a contiguous range: the packed row itself for varlen attention, the
/// gathered caches for generation). Saves the log-sum-exp. Tokens with no keys get zeros.
#[cube(launch)]
// `div_ceil` is spelled out: kernel code is CubeCL's expansion, which has no such method.
#[allow(clippy::too_many_arguments, clippy::manual_div_ceil)]
fn attention_forward_kernel(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    block_rows: &[u32],
    first_block: &[u32],
    key_len: &[u32],
    out: &mut [f32],
    lse: &mut [f32],
    heads: u32,
    kv_heads: u32,
    block_size: u32,
    scale: f32,
    #[comptime] head_dim: usize,
) {
    let row = ABSOLUTE_POS;
    if row >= lse.len() {
        terminate!();
    }
    let heads = heads as usize;
    let kv_heads = kv_heads as usize;
    let block_size = block_size as usize;
    let t = row / heads;
    let h = row % heads;
    let kvh = h / (heads / kv_heads);
    let q_base = row * head_dim;
    let first = first_block[t] as usize;
    let n = key_len[t] as usize;
    let blocks = (n + block_size - 1) / block_size;

    let mut acc = Array::new(head_dim);
    for dd in 0..head_dim {
        acc[dd] = f32::new(0.0);
    }
    let mut m = f32::new(-1.0e30);
    let mut l = f32::new(0.0);
    for b in 0..blocks {
        let row0 = block_rows[first + b] as usize;
        let mut take = n - b * block_size;
        if take > block_size {
            take = block_size;
        }
        for o in 0..take {
            let k_base = ((row0 + o) * kv_heads + kvh) * head_dim;
            let mut dot = f32::new(0.0);
            for dd in 0..head_dim {
                dot += q[q_base + dd] * k[k_base + dd];
            }
            let s = dot * scale;
            if s > m {
                let correction = (m - s).exp();
                l *= correction;
                for dd in 0..head_dim {
                    acc[dd] *= correction;
                }
                m = s;
            }
            let p = (s - m).exp();
            l += p;
            for dd in 0..head_dim {
                acc[dd] += p * v[k_base + dd];
            }
        }
    }
    if l > f32::new(0.0) {
        let inv = f32::new(1.0) / l;
        for dd in 0..head_dim {
            out[q_base + dd] = acc[dd] * inv;
        }
        lse[row] = m + l.ln();
    } else {
        for dd in 0..head_dim {
            out[q_base + dd] = f32::new(0.0);
        }
        lse[row] = f32::new(0.0);
    }
}

/// `D = Σ dout · out` per (token, head) row: the softmax-backward correction term.
#[cube(launch)]
fn attention_delta_kernel(
    out: &[f32],
    dout: &[f32],
    delta: &mut [f32],
    #[comptime] head_dim: usize,
) {
    let row = ABSOLUTE_POS;
    if row >= delta.len() {
        terminate!();
    }
    let mut acc = f32::new(0.0);
    for dd in 0..head_dim {
        acc += out[row * head_dim + dd] * dout[row * head_dim + dd];
    }
    delta[row] = acc;
}

/// `dq`, one thread per (query token, head), recomputing each probability from the saved LSE.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn attention_dq_kernel(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    lse: &[f32],
    delta: &[f32],
    seg_start: &[u32],
    dq: &mut [f32],
    heads: u32,
    kv_heads: u32,
    scale: f32,
    #[comptime] head_dim: usize,
) {
    let row = ABSOLUTE_POS;
    if row >= lse.len() {
        terminate!();
    }
    let heads = heads as usize;
    let kv_heads = kv_heads as usize;
    let t = row / heads;
    let h = row % heads;
    let kvh = h / (heads / kv_heads);
    let base = row * head_dim;
    let start = seg_start[t] as usize;
    let l = lse[row];
    let d_i = delta[row];

    let mut acc = Array::new(head_dim);
    for dd in 0..head_dim {
        acc[dd] = f32::new(0.0);
    }
    for j in start..t + 1 {
        let k_base = (j * kv_heads + kvh) * head_dim;
        let mut s = f32::new(0.0);
        let mut dp = f32::new(0.0);
        for dd in 0..head_dim {
            s += q[base + dd] * k[k_base + dd];
            dp += dout[base + dd] * v[k_base + dd];
        }
        let p = (s * scale - l).exp();
        let ds = p * (dp - d_i) * scale;
        for dd in 0..head_dim {
            acc[dd] += ds * k[k_base + dd];
        }
    }
    for dd in 0..head_dim {
        dq[base + dd] = acc[dd];
    }
}

/// `dk`, `dv`, one thread per (key token, kv head): the queries `j..end` of the key's segment,
/// over every query head that shares this kv head.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn attention_dkdv_kernel(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    lse: &[f32],
    delta: &[f32],
    seg_end: &[u32],
    dk: &mut [f32],
    dv: &mut [f32],
    heads: u32,
    kv_heads: u32,
    scale: f32,
    #[comptime] head_dim: usize,
) {
    let row = ABSOLUTE_POS;
    if row * head_dim >= dk.len() {
        terminate!();
    }
    let heads = heads as usize;
    let kv_heads = kv_heads as usize;
    let group = heads / kv_heads;
    let j = row / kv_heads;
    let kvh = row % kv_heads;
    let k_base = row * head_dim;
    let end = seg_end[j] as usize;

    let mut acc_k = Array::new(head_dim);
    let mut acc_v = Array::new(head_dim);
    for dd in 0..head_dim {
        acc_k[dd] = f32::new(0.0);
        acc_v[dd] = f32::new(0.0);
    }
    for g in 0..group {
        let h = kvh * group + g;
        for i in j..end {
            let q_row = i * heads + h;
            let q_base = q_row * head_dim;
            let mut s = f32::new(0.0);
            let mut dp = f32::new(0.0);
            for dd in 0..head_dim {
                s += q[q_base + dd] * k[k_base + dd];
                dp += dout[q_base + dd] * v[k_base + dd];
            }
            let p = (s * scale - lse[q_row]).exp();
            let ds = p * (dp - delta[q_row]) * scale;
            for dd in 0..head_dim {
                acc_v[dd] += p * dout[q_base + dd];
                acc_k[dd] += ds * q[q_base + dd];
            }
        }
    }
    for dd in 0..head_dim {
        dk[k_base + dd] = acc_k[dd];
        dv[k_base + dd] = acc_v[dd];
    }
}

/// Per token: the first key of its segment (`t + 1` outside every segment, an empty range) and
/// the end of its segment (`t`, empty, outside).
fn segment_bounds(tokens: usize, segments: &[(usize, usize)]) -> (Vec<u32>, Vec<u32>) {
    let mut start: Vec<u32> = (0..tokens).map(|t| t as u32 + 1).collect();
    let mut end: Vec<u32> = (0..tokens).map(|t| t as u32).collect();
    for &(s, len) in segments {
        for t in s..(s + len).min(tokens) {
            start[t] = s as u32;
            end[t] = (s + len) as u32;
        }
    }
    (start, end)
}

/// Which keys each query token of an [`attention_forward_kernel`] call sees: the kernel's
/// `block_rows`, `first_block`, `key_len` and `block_size`.
struct KeyBlocks {
    block_rows: Vec<u32>,
    first_block: Vec<u32>,
    key_len: Vec<u32>,
    block_size: usize,
}

impl KeyBlocks {
    /// Contiguous key ranges: each query row attends the rows its [`CachedSpan`] gives, one
    /// block per token (none: no keys).
    fn ranges(spans: &[CachedSpan], tokens: usize) -> Self {
        let (start, end) = CachedSpan::key_ranges(spans, tokens);
        let key_len: Vec<u32> = start.iter().zip(&end).map(|(s, e)| e - s).collect();
        let longest = key_len.iter().copied().max().unwrap_or(0);
        Self {
            block_rows: start,
            first_block: (0..tokens as u32).collect(),
            key_len,
            block_size: (longest as usize).max(1),
        }
    }

    /// Keys in a block pool: each [`PagedSpan`]'s new tokens attend its cached positions through
    /// its block list, causally.
    fn paged(spans: &[PagedSpan], tokens: usize, block_size: usize) -> Self {
        let mut blocks = Self {
            block_rows: Vec::new(),
            first_block: vec![0; tokens],
            key_len: vec![0; tokens],
            block_size,
        };
        for s in spans {
            let first = blocks.block_rows.len() as u32;
            let used = s.k_len.div_ceil(block_size);
            blocks
                .block_rows
                .extend(s.blocks[..used].iter().map(|&b| b * block_size as u32));
            let seen_before = s.k_len - s.q_len;
            for j in 0..s.q_len {
                blocks.first_block[s.q_start + j] = first;
                blocks.key_len[s.q_start + j] = (seen_before + j + 1) as u32;
            }
        }
        if blocks.block_rows.is_empty() {
            // A buffer cannot be empty; no token reads it.
            blocks.block_rows.push(0);
        }
        blocks
    }
}

/// [`attention_forward_kernel`] over every row of `q` `[T, H, d]`, reading keys/values of `k`/`v`
/// `[rows, KV, d]` as `keys` says. Returns the output and the log-sum-exp `[T, H]`.
fn blocked_attention(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    keys: &KeyBlocks,
    scale: f32,
) -> (CubeTensor, CubeTensor) {
    let (q, k, v) = (f32_contiguous(q), f32_contiguous(k), f32_contiguous(v));
    let [tokens, heads, d] = dims3(&q);
    let kv_heads = k.shape()[1];
    let out = empty_like(&q, [tokens, heads, d]);
    let lse = empty_like(&q, [tokens, heads]);
    let block_rows = u32_buffer(&q, &keys.block_rows);
    let first_block = u32_buffer(&q, &keys.first_block);
    let key_len = u32_buffer(&q, &keys.key_len);
    let (count, dim) = grid(&q, tokens * heads);
    attention_forward_kernel::launch(
        &q.client,
        count,
        dim,
        arg(&q),
        arg(&k),
        arg(&v),
        u32_arg(&block_rows),
        u32_arg(&first_block),
        u32_arg(&key_len),
        arg(&out),
        arg(&lse),
        heads as u32,
        kv_heads as u32,
        keys.block_size as u32,
        scale,
        d,
    );
    (out, lse)
}

impl AttentionOps for CubeBackend {
    fn fused_attention_forward(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        segments: Vec<(usize, usize)>,
        scale: f32,
    ) -> (CubeTensor, CubeTensor) {
        // A segment is a sequence with an empty cache: its keys are its own tokens, so token t of
        // a segment starting at s sees keys s..=t.
        let spans: Vec<CachedSpan> = segments
            .iter()
            .map(|&(start, len)| CachedSpan {
                q_start: start,
                q_len: len,
                k_start: start,
                k_len: len,
            })
            .collect();
        let tokens = q.shape()[0];
        blocked_attention(q, k, v, &KeyBlocks::ranges(&spans, tokens), scale)
    }

    fn fused_cached_attention(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        spans: Vec<CachedSpan>,
        scale: f32,
    ) -> CubeTensor {
        let tokens = q.shape()[0];
        blocked_attention(q, k, v, &KeyBlocks::ranges(&spans, tokens), scale).0
    }

    fn fused_paged_attention(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        spans: Vec<PagedSpan>,
        block_size: usize,
        scale: f32,
    ) -> CubeTensor {
        let tokens = q.shape()[0];
        let keys = KeyBlocks::paged(&spans, tokens, block_size);
        blocked_attention(q, k, v, &keys, scale).0
    }

    fn fused_attention_backward(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        out: CubeTensor,
        lse: CubeTensor,
        dout: CubeTensor,
        segments: Vec<(usize, usize)>,
        scale: f32,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        let (q, k, v) = (f32_contiguous(q), f32_contiguous(k), f32_contiguous(v));
        let (out, lse, dout) = (
            f32_contiguous(out),
            f32_contiguous(lse),
            f32_contiguous(dout),
        );
        let [tokens, heads, d] = dims3(&q);
        let kv_heads = k.shape()[1];
        let (start, end) = segment_bounds(tokens, &segments);
        let (start, end) = (u32_buffer(&q, &start), u32_buffer(&q, &end));

        let delta = empty_like(&q, [tokens, heads]);
        let (count, dim) = grid(&q, tokens * heads);
        attention_delta_kernel::launch(
            &q.client,
            count.clone(),
            dim,
            arg(&out),
            arg(&dout),
            arg(&delta),
            d,
        );

        let dq = empty_like(&q, [tokens, heads, d]);
        attention_dq_kernel::launch(
            &q.client,
            count,
            dim,
            arg(&q),
            arg(&k),
            arg(&v),
            arg(&dout),
            arg(&lse),
            arg(&delta),
            u32_arg(&start),
            arg(&dq),
            heads as u32,
            kv_heads as u32,
            scale,
            d,
        );

        let dk = empty_like(&q, [tokens, kv_heads, d]);
        let dv = empty_like(&q, [tokens, kv_heads, d]);
        let (count, dim) = grid(&q, tokens * kv_heads);
        attention_dkdv_kernel::launch(
            &q.client,
            count,
            dim,
            arg(&q),
            arg(&k),
            arg(&v),
            arg(&dout),
            arg(&lse),
            arg(&delta),
            u32_arg(&end),
            arg(&dk),
            arg(&dv),
            heads as u32,
            kv_heads as u32,
            scale,
            d,
        );
        (dq, dk, dv)
    }
}
