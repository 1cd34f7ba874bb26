//! The fused ops on the CubeCL backends (`vulkan`, `cuda` features): `#[cube]` kernels for
//! varlen attention (forward and backward), RMSNorm, SwiGLU, RoPE, AdamW and the row-wise parts
//! of the selective log-probs. The products (linear, the log-prob tiles' GEMMs) go through
//! [`super::cube_gemm::product`]: burn's autotuned CubeCL matmul on GPUs, grail's own GEMM kernel
//! on CPU adapters (lavapipe), where burn's matmul cannot be compiled.
//!
//! The kernels are written for clarity first: one GPU thread per output row (attention: per
//! query row × head for the forward and `dq`, per key row × kv head for `dk`/`dv`; RMSNorm: per
//! row), loops over the row in registers, no shared-memory tiling yet. They are exact (same
//! math as the CPU kernels of [`super::cpu`], f32 throughout) and keep the same memory contract:
//! attention saves only the per-row log-sum-exp, the log-probs never hold more than one
//! `[tile_tokens × vocab]` tile of logits. Tiled (flash-style) versions are the next step for
//! speed; `tests/fused_ops.rs` (run with `GRAIL_TEST_DEVICE`) pins their results. Note that
//! shared memory as CubeCL's SPIR-V declares it crashes lavapipe's compiler, so tiled kernels
//! can only be checked on a real GPU.
//!
//! All tensors are made contiguous f32 before a launch; segment bounds travel as `u32` buffers.

// Kernel code indexes buffers explicitly: iterators do not exist inside `#[cube]` functions.
#![allow(clippy::needless_range_loop)]

use burn::backend::TensorMetadata;
use burn::tensor::{DType, Shape, Slice};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::{CubeDim, calculate_cube_count_elemwise};

use burn::backend::ops::{FloatTensorOps, IntTensorOps};

use super::cube_gemm::product;
use super::logprob::ranges;
use super::ops::{CachedSpan, FusedOps};

type B = CubeBackend;

/// Rows per thread in the first stage of the RMSNorm weight gradient.
const ROW_BLOCK: usize = 256;
/// Vocabulary entries per thread in the first stage of the log-prob rows.
const VOCAB_BLOCK: usize = 512;

// ---------------------------------------------------------------------------------------------
// Kernels.

/// One thread per row: `y = x · w / rms(x)`, `r = 1 / rms(x)`.
#[cube(launch)]
fn rms_norm_forward_kernel(
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    r: &mut [f32],
    cols: u32,
    eps: f32,
) {
    let row = ABSOLUTE_POS;
    if row >= r.len() {
        terminate!();
    }
    let cols = cols as usize;
    let base = row * cols;
    let mut ss = f32::new(0.0);
    for c in 0..cols {
        let v = x[base + c];
        ss += v * v;
    }
    let inv = f32::new(1.0) / (ss / f32::cast_from(cols) + eps).sqrt();
    r[row] = inv;
    for c in 0..cols {
        y[base + c] = x[base + c] * inv * w[c];
    }
}

/// One thread per row: `dx = r·w·dy − x·r³·Σ(w·dy·x)/C`.
#[cube(launch)]
fn rms_norm_dx_kernel(x: &[f32], w: &[f32], r: &[f32], dy: &[f32], dx: &mut [f32], cols: u32) {
    let row = ABSOLUTE_POS;
    if row >= r.len() {
        terminate!();
    }
    let cols = cols as usize;
    let base = row * cols;
    let inv = r[row];
    let mut dot = f32::new(0.0);
    for c in 0..cols {
        dot += w[c] * dy[base + c] * x[base + c];
    }
    let k = inv * inv * inv * dot / f32::cast_from(cols);
    for c in 0..cols {
        dx[base + c] = inv * w[c] * dy[base + c] - x[base + c] * k;
    }
}

/// One thread per (block of `block` rows, column): that block's share of `dw = Σ_rows dy · x · r`,
/// written at `partial[block_index · cols + col]`. Splitting the rows keeps thousands of threads
/// busy where one per column would leave a GPU almost idle (a few hundred columns, many rows).
#[cube(launch)]
fn rms_norm_dw_partial_kernel(
    x: &[f32],
    r: &[f32],
    dy: &[f32],
    partial: &mut [f32],
    rows: u32,
    cols: u32,
    block: u32,
) {
    let i = ABSOLUTE_POS;
    if i >= partial.len() {
        terminate!();
    }
    let cols = cols as usize;
    let col = i % cols;
    let first = (i / cols) * block as usize;
    let mut last = first + block as usize;
    if last > rows as usize {
        last = rows as usize;
    }
    let mut acc = f32::new(0.0);
    for row in first..last {
        acc += dy[row * cols + col] * x[row * cols + col] * r[row];
    }
    partial[i] = acc;
}

/// One thread per column of a `[blocks, cols]` buffer: `out[col] = Σ_blocks partial[·, col]`.
#[cube(launch)]
fn column_sum_kernel(partial: &[f32], out: &mut [f32], blocks: u32) {
    let col = ABSOLUTE_POS;
    if col >= out.len() {
        terminate!();
    }
    let cols = out.len();
    let mut acc = f32::new(0.0);
    for b in 0..blocks as usize {
        acc += partial[b * cols + col];
    }
    out[col] = acc;
}

/// Element-wise `silu(gate) · up`.
#[cube(launch)]
fn swiglu_forward_kernel(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let g = gate[i];
    let s = f32::new(1.0) / (f32::new(1.0) + (-g).exp());
    out[i] = g * s * up[i];
}

/// Element-wise gradients of `silu(gate) · up`, recomputed from the inputs.
#[cube(launch)]
fn swiglu_backward_kernel(
    gate: &[f32],
    up: &[f32],
    dout: &[f32],
    dgate: &mut [f32],
    dup: &mut [f32],
) {
    let i = ABSOLUTE_POS;
    if i >= dgate.len() {
        terminate!();
    }
    let g = gate[i];
    let s = f32::new(1.0) / (f32::new(1.0) + (-g).exp());
    let d = dout[i];
    dgate[i] = d * up[i] * s * (f32::new(1.0) + g * (f32::new(1.0) - s));
    dup[i] = d * g * s;
}

/// Rotate-half RoPE of `x` `[T, H, d]` with `[T, d]` tables; `sign = −1` applies the transpose.
#[cube(launch)]
fn rope_kernel(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    out: &mut [f32],
    heads: u32,
    dim: u32,
    sign: f32,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let d = dim as usize;
    let half = d / 2;
    let t = i / (heads as usize * d);
    let c = i % d;
    let table = t * d + c;
    if c < half {
        out[i] = x[i] * cos[table] - sign * x[i + half] * sin[table];
    } else {
        out[i] = x[i] * cos[table] + sign * x[i - half] * sin[table];
    }
}

/// Attention forward, one thread per (query token, head): an online softmax over the keys
/// `key_start[t]..key_end[t]` of `k`/`v` (their own token axis: the packed row itself for varlen
/// attention, the gathered KV caches for generation); saves the log-sum-exp. Tokens with an
/// empty range get zeros.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn attention_forward_kernel(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_start: &[u32],
    key_end: &[u32],
    out: &mut [f32],
    lse: &mut [f32],
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
    let q_base = row * head_dim;
    let start = key_start[t] as usize;
    let end = key_end[t] as usize;

    let mut acc = Array::new(head_dim);
    for dd in 0..head_dim {
        acc[dd] = f32::new(0.0);
    }
    let mut m = f32::new(-1.0e30);
    let mut l = f32::new(0.0);
    for j in start..end {
        let k_base = (j * kv_heads + kvh) * head_dim;
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

/// Stage one of `Σ x²`: thread `i` of `parts` sums elements `i, i + parts, …` (coalesced).
#[cube(launch)]
fn sum_squares_partial_kernel(x: &[f32], partial: &mut [f32]) {
    let i = ABSOLUTE_POS;
    let parts = partial.len();
    if i >= parts {
        terminate!();
    }
    let mut acc = f32::new(0.0);
    let mut at = i;
    while at < x.len() {
        let v = x[at];
        acc += v * v;
        at += parts;
    }
    partial[i] = acc;
}

/// Stage two: one thread adds the partial sums.
#[cube(launch)]
fn sum_kernel(partial: &[f32], out: &mut [f32]) {
    if ABSOLUTE_POS == 0 {
        let mut acc = f32::new(0.0);
        for i in 0..partial.len() {
            acc += partial[i];
        }
        out[0] = acc;
    }
}

/// One AdamW update per element (burn's AdamW formula, as the CPU kernel).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn adamw_kernel(
    param: &[f32],
    grad: &[f32],
    m: &[f32],
    v: &[f32],
    p_out: &mut [f32],
    m_out: &mut [f32],
    v_out: &mut [f32],
    lr: f32,
    beta1: f32,
    beta2: f32,
    epsilon: f32,
    decay: f32,
    c1: f32,
    c2: f32,
) {
    let i = ABSOLUTE_POS;
    if i >= p_out.len() {
        terminate!();
    }
    let g = grad[i];
    let m_new = m[i] * beta1 + g * (f32::new(1.0) - beta1);
    let v_new = v[i] * beta2 + g * g * (f32::new(1.0) - beta2);
    m_out[i] = m_new;
    v_out[i] = v_new;
    let delta = (m_new / c1) / ((v_new / c2).sqrt() + epsilon);
    p_out[i] = param[i] * decay - delta * lr;
}

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

// ---------------------------------------------------------------------------------------------
// Launch helpers.

pub(super) fn f32_contiguous(t: CubeTensor) -> CubeTensor {
    let t = if t.dtype == DType::F32 {
        t
    } else {
        B::float_cast(t, burn::tensor::FloatDType::F32)
    };
    into_contiguous(t)
}

pub(super) fn empty_like(like: &CubeTensor, shape: impl Into<Shape>) -> CubeTensor {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        shape.into(),
        DType::F32,
    )
}

fn arg(t: &CubeTensor) -> BufferArg {
    t.clone().into_buffer_arg()
}

/// A `u32` buffer on the tensor's device.
fn u32_buffer(like: &CubeTensor, values: &[u32]) -> (cubecl::server::Handle, usize) {
    (
        like.client.create_from_slice(u32::as_bytes(values)),
        values.len(),
    )
}

fn u32_arg(buffer: &(cubecl::server::Handle, usize)) -> BufferArg {
    unsafe { BufferArg::from_raw_parts(buffer.0.clone(), buffer.1) }
}

/// Launch geometry for `n` independent work items.
fn grid(like: &CubeTensor, n: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(&like.client, n.max(1));
    (
        calculate_cube_count_elemwise(&like.client, n.max(1), dim),
        dim,
    )
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

fn dims3(t: &CubeTensor) -> [usize; 3] {
    let s = t.shape();
    [s[0], s[1], s[2]]
}

/// [`attention_forward_kernel`] over every row of `q` `[T, H, d]`: each query row attends the key
/// range its [`CachedSpan`] gives (none: zeros). Returns the output and the log-sum-exp `[T, H]`.
fn ranged_attention(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    spans: &[CachedSpan],
    scale: f32,
) -> (CubeTensor, CubeTensor) {
    let (q, k, v) = (f32_contiguous(q), f32_contiguous(k), f32_contiguous(v));
    let [tokens, heads, d] = dims3(&q);
    let kv_heads = k.shape()[1];
    let out = empty_like(&q, [tokens, heads, d]);
    let lse = empty_like(&q, [tokens, heads]);
    let (start, end) = CachedSpan::key_ranges(spans, tokens);
    let (start, end) = (u32_buffer(&q, &start), u32_buffer(&q, &end));
    let (count, dim) = grid(&q, tokens * heads);
    attention_forward_kernel::launch(
        &q.client,
        count,
        dim,
        arg(&q),
        arg(&k),
        arg(&v),
        u32_arg(&start),
        u32_arg(&end),
        arg(&out),
        arg(&lse),
        heads as u32,
        kv_heads as u32,
        scale,
        d,
    );
    (out, lse)
}

// ---------------------------------------------------------------------------------------------
// The backend extension.

impl FusedOps for CubeBackend {
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
        ranged_attention(q, k, v, &spans, scale)
    }

    fn fused_cached_attention(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        spans: Vec<CachedSpan>,
        scale: f32,
    ) -> CubeTensor {
        ranged_attention(q, k, v, &spans, scale).0
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

    fn fused_linear_forward(x: CubeTensor, w: CubeTensor) -> CubeTensor {
        product(x, false, w, true)
    }

    fn fused_linear_backward(
        x: CubeTensor,
        w: CubeTensor,
        dy: CubeTensor,
    ) -> (CubeTensor, CubeTensor) {
        let dx = product(dy.clone(), false, w, false);
        // `dyᵀ · x` is the weight gradient in the weight's own `[out, in]` layout.
        let dw = product(dy, true, x, false);
        (dx, dw)
    }

    fn fused_rms_norm_forward(x: CubeTensor, w: CubeTensor, eps: f32) -> (CubeTensor, CubeTensor) {
        let (x, w) = (f32_contiguous(x), f32_contiguous(w));
        let shape = x.shape();
        let cols = shape[shape.num_dims() - 1];
        let rows = shape.num_elements() / cols.max(1);
        let y = empty_like(&x, shape.clone());
        let r = empty_like(&x, [rows]);
        let (count, dim) = grid(&x, rows);
        rms_norm_forward_kernel::launch(
            &x.client,
            count,
            dim,
            arg(&x),
            arg(&w),
            arg(&y),
            arg(&r),
            cols as u32,
            eps,
        );
        (y, r)
    }

    fn fused_rms_norm_backward(
        x: CubeTensor,
        w: CubeTensor,
        r: CubeTensor,
        dy: CubeTensor,
    ) -> (CubeTensor, CubeTensor) {
        let (x, w, r, dy) = (
            f32_contiguous(x),
            f32_contiguous(w),
            f32_contiguous(r),
            f32_contiguous(dy),
        );
        let shape = x.shape();
        let cols = shape[shape.num_dims() - 1];
        let rows = shape.num_elements() / cols.max(1);
        let dx = empty_like(&x, shape.clone());
        let dw = empty_like(&x, w.shape());
        let (count, dim) = grid(&x, rows);
        rms_norm_dx_kernel::launch(
            &x.client,
            count,
            dim,
            arg(&x),
            arg(&w),
            arg(&r),
            arg(&dy),
            arg(&dx),
            cols as u32,
        );
        let blocks = rows.div_ceil(ROW_BLOCK).max(1);
        let partial = empty_like(&x, [blocks, cols]);
        let (count, dim) = grid(&x, blocks * cols);
        rms_norm_dw_partial_kernel::launch(
            &x.client,
            count,
            dim,
            arg(&x),
            arg(&r),
            arg(&dy),
            arg(&partial),
            rows as u32,
            cols as u32,
            ROW_BLOCK as u32,
        );
        let (count, dim) = grid(&x, cols);
        column_sum_kernel::launch(
            &x.client,
            count,
            dim,
            arg(&partial),
            arg(&dw),
            blocks as u32,
        );
        (dx, dw)
    }

    fn fused_swiglu_forward(gate: CubeTensor, up: CubeTensor) -> CubeTensor {
        let (gate, up) = (f32_contiguous(gate), f32_contiguous(up));
        let shape = gate.shape();
        let n = shape.num_elements();
        let out = empty_like(&gate, shape);
        let (count, dim) = grid(&gate, n);
        swiglu_forward_kernel::launch(&gate.client, count, dim, arg(&gate), arg(&up), arg(&out));
        out
    }

    fn fused_swiglu_backward(
        gate: CubeTensor,
        up: CubeTensor,
        dout: CubeTensor,
    ) -> (CubeTensor, CubeTensor) {
        let (gate, up, dout) = (
            f32_contiguous(gate),
            f32_contiguous(up),
            f32_contiguous(dout),
        );
        let shape = gate.shape();
        let n = shape.num_elements();
        let dgate = empty_like(&gate, shape.clone());
        let dup = empty_like(&gate, shape);
        let (count, dim) = grid(&gate, n);
        swiglu_backward_kernel::launch(
            &gate.client,
            count,
            dim,
            arg(&gate),
            arg(&up),
            arg(&dout),
            arg(&dgate),
            arg(&dup),
        );
        (dgate, dup)
    }

    fn fused_rope_forward(
        x: CubeTensor,
        cos: CubeTensor,
        sin: CubeTensor,
        inverse: bool,
    ) -> CubeTensor {
        let (x, cos, sin) = (f32_contiguous(x), f32_contiguous(cos), f32_contiguous(sin));
        let [_, heads, d] = dims3(&x);
        let shape = x.shape();
        let n = shape.num_elements();
        let out = empty_like(&x, shape);
        let (count, dim) = grid(&x, n);
        rope_kernel::launch(
            &x.client,
            count,
            dim,
            arg(&x),
            arg(&cos),
            arg(&sin),
            arg(&out),
            heads as u32,
            d as u32,
            if inverse { -1.0 } else { 1.0 },
        );
        out
    }

    fn fused_sum_squares(x: CubeTensor) -> CubeTensor {
        // Two small kernels rather than burn's reduction (whose shader lavapipe cannot compile).
        const PARTS: usize = 4096;
        let x = f32_contiguous(x);
        let parts = PARTS.min(x.shape().num_elements().max(1));
        let partial = empty_like(&x, [parts]);
        let (count, dim) = grid(&x, parts);
        sum_squares_partial_kernel::launch(&x.client, count, dim, arg(&x), arg(&partial));
        let out = empty_like(&x, [1]);
        let (count, dim) = grid(&x, 1);
        sum_kernel::launch(&x.client, count, dim, arg(&partial), arg(&out));
        out
    }

    fn fused_scale(x: CubeTensor, factor: f32) -> CubeTensor {
        B::float_mul_scalar(x, factor.into())
    }

    fn fused_adamw(
        param: CubeTensor,
        grad: CubeTensor,
        m: CubeTensor,
        v: CubeTensor,
        lr: f32,
        beta1: f32,
        beta2: f32,
        epsilon: f32,
        weight_decay: f32,
        time: i32,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        let (param, grad, m, v) = (
            f32_contiguous(param),
            f32_contiguous(grad),
            f32_contiguous(m),
            f32_contiguous(v),
        );
        let shape = param.shape();
        let n = shape.num_elements();
        let (p_out, m_out, v_out) = (
            empty_like(&param, shape.clone()),
            empty_like(&param, shape.clone()),
            empty_like(&param, shape),
        );
        let (count, dim) = grid(&param, n);
        adamw_kernel::launch(
            &param.client,
            count,
            dim,
            arg(&param),
            arg(&grad),
            arg(&m),
            arg(&v),
            arg(&p_out),
            arg(&m_out),
            arg(&v_out),
            lr,
            beta1,
            beta2,
            epsilon,
            1.0 - lr * weight_decay,
            1.0 - beta1.powi(time),
            1.0 - beta2.powi(time),
        );
        (p_out, m_out, v_out)
    }

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

#[cfg(test)]
pub(super) mod tests {
    //! The log-prob row kernels on their own, fed logits directly: the full op also needs burn's
    //! matmul, which lavapipe cannot run, so this is what CI can check of them on CPU Vulkan.
    use super::*;
    use burn::backend::DispatchDevice;
    use burn::tensor::TensorData;

    pub(crate) fn device() -> burn_cubecl::CubeDevice {
        let name = std::env::var("GRAIL_TEST_DEVICE").unwrap_or_else(|_| "vulkan:cpu".into());
        let device = crate::device::parse_device(&name).expect("a Vulkan device");
        match device.inner().as_dispatch().clone() {
            DispatchDevice::Cube(d) => d,
            _ => panic!("{name} is not a CubeCL device"),
        }
    }

    pub(crate) fn upload(values: Vec<f32>, shape: impl Into<Shape>) -> CubeTensor {
        B::float_from_data(TensorData::new(values, shape.into()), &device())
    }

    pub(crate) fn read(t: CubeTensor) -> Vec<f32> {
        cubecl::future::block_on(B::float_into_data(t))
            .expect("readback")
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap()
    }

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
