//! Fused ops as a burn backend extension: varlen (packed) causal attention, RMSNorm, SwiGLU and
//! rotate-half RoPE, each one kernel forward and one backward, with a hand-written autodiff node.
//!
//! Routing: `#[backend_extension]` dispatches a call to the backend the tensors live on. Flex runs
//! the CPU kernels of [`super::cpu`], the CubeCL backends (`vulkan`/`cuda` features) the `#[cube]`
//! kernels of `super::cube`; `Autodiff<B>` records one backward node per op that calls the inner
//! backend's backward kernel. Other backends (none ship today) have no implementation: call
//! [`supported`] first (the model falls back to unfused tensor math where it is false).
//!
//! Every op keeps only what its backward needs: attention the per-row log-sum-exp (O(tokens),
//! never the `[len × len]` probabilities), RMSNorm the inverse RMS per row, SwiGLU its two inputs
//! (not the product), RoPE nothing but the cos/sin tables.

use std::borrow::Cow;

use burn::backend::AutodiffBackend;
use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Dispatch, DispatchDevice, Flex, TensorMetadata, backend_extension};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use super::cpu::{self, AttentionDims, LogprobDims};

/// One sequence of a cached-attention call ([`cached_attention`]): its new tokens are rows
/// `q_start..q_start + q_len` of the queries, its keys/values rows `k_start..k_start + k_len` of
/// the gathered caches with the new tokens' own keys last, so new token `j` sees keys
/// `k_start ..= k_start + k_len − q_len + j`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachedSpan {
    /// First query row of the sequence's new tokens.
    pub q_start: usize,
    /// Number of new tokens.
    pub q_len: usize,
    /// First key row of the sequence's cache.
    pub k_start: usize,
    /// Keys in the cache, the new tokens' included (`≥ q_len`).
    pub k_len: usize,
}

impl CachedSpan {
    /// Per query row (of `tokens`), the `[start, end)` of the key rows it sees; empty for rows
    /// no span covers.
    pub fn key_ranges(spans: &[CachedSpan], tokens: usize) -> (Vec<u32>, Vec<u32>) {
        let (mut start, mut end) = (vec![0u32; tokens], vec![0u32; tokens]);
        for s in spans {
            debug_assert!(s.k_len >= s.q_len, "{s:?}: fewer keys than new tokens");
            let seen_before = s.k_start + s.k_len - s.q_len;
            for j in 0..s.q_len.min(tokens.saturating_sub(s.q_start)) {
                start[s.q_start + j] = s.k_start as u32;
                end[s.q_start + j] = (seen_before + j + 1) as u32;
            }
        }
        (start, end)
    }
}

/// The fused ops every supported backend implements. The `*_forward` / `*_backward` pairs are the
/// kernels; `fused_attention`, `fused_linear`, `fused_rms_norm`, `fused_swiglu`, `fused_rope` and
/// `fused_logprob` are the differentiable entry points: their default bodies run the forward
/// kernel, and `Autodiff<B>` overrides them to record the backward node.
#[backend_extension(Flex, Cube: cfg(any(feature = "vulkan", feature = "cuda")), Autodiff)]
pub trait FusedOps: Backend {
    /// Causal attention within each `(start, len)` segment of the token axis: `q` `[T, H, d]`,
    /// `k`/`v` `[T, KV, d]` → `[T, H, d]`.
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        segments: Vec<(usize, usize)>,
        scale: f32,
    ) -> FloatTensor<Self> {
        Self::fused_attention_forward(q, k, v, segments, scale).0
    }
    /// Kernel: attention output and per-row log-sum-exp `[T, H]`.
    fn fused_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        segments: Vec<(usize, usize)>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// Kernel: `(dq, dk, dv)` from the saved output and log-sum-exp.
    #[allow(clippy::too_many_arguments)]
    fn fused_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        segments: Vec<(usize, usize)>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// Attention of new tokens to their sequences' KV caches, for generation (no gradient):
    /// `q` `[T, H, d]`, `k`/`v` `[S, KV, d]` every sequence's cache gathered along the first axis
    /// (see [`CachedSpan`]) → `[T, H, d]`, zeros on rows no span covers.
    fn fused_cached_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        spans: Vec<CachedSpan>,
        scale: f32,
    ) -> FloatTensor<Self>;

    /// `x [N, in] · Wᵀ` for `W` `[out, in]`; its weight gradient comes out contiguous.
    fn fused_linear(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::fused_linear_forward(x, w)
    }
    /// Kernel: the product.
    fn fused_linear_forward(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Kernel: `(dx, dW)`.
    fn fused_linear_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// RMSNorm over the last axis of `x` `[N, C]` with weight `w` `[C]`.
    fn fused_rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        Self::fused_rms_norm_forward(x, w, eps).0
    }
    /// Kernel: output and inverse RMS `[N]`.
    fn fused_rms_norm_forward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// Kernel: `(dx, dw)`.
    fn fused_rms_norm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        r: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `silu(gate) · up`, element-wise (`[N, I]`).
    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::fused_swiglu_forward(gate, up)
    }
    /// Kernel: the forward.
    fn fused_swiglu_forward(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Kernel: `(dgate, dup)` recomputed from the inputs.
    fn fused_swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        dout: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Rotate-half RoPE of `x` `[T, H, d]` with tables `cos`/`sin` `[T, d]` (constants).
    fn fused_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::fused_rope_forward(x, cos, sin, false)
    }
    /// Kernel: the rotation, or its transpose (`inverse`), which is its backward.
    fn fused_rope_forward(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        inverse: bool,
    ) -> FloatTensor<Self>;

    /// Kernel: `Σ x²` over all elements, as a one-element tensor (accumulated in f64).
    fn fused_sum_squares(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Kernel: `x · factor`.
    fn fused_scale(x: FloatTensor<Self>, factor: f32) -> FloatTensor<Self>;

    /// Kernel: one AdamW update of a parameter of any shape: `(param, m, v)` after the step.
    #[allow(clippy::too_many_arguments)]
    fn fused_adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        lr: f32,
        beta1: f32,
        beta2: f32,
        epsilon: f32,
        weight_decay: f32,
        time: i32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// Selective log-probs as a differentiable op: `(logp, entropy)`, each `[tokens]`; only `logp`
    /// carries gradients (to `hidden` and `weight`, through a backward node that recomputes each
    /// tile from the saved log-sum-exp). Entropy is zeros unless asked for.
    #[allow(clippy::too_many_arguments)]
    fn fused_logprob(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        inv_t: f32,
        tile_tokens: usize,
        tile_vocab: usize,
        with_entropy: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (logp, _, entropy) = Self::fused_logprob_forward(
            hidden,
            weight,
            targets,
            inv_t,
            tile_tokens,
            tile_vocab,
            with_entropy,
        );
        (logp, entropy)
    }

    /// Kernel: selective log-probs of `targets` under `softmax(hidden · weightᵀ · inv_t)` in
    /// `[tile_tokens × tile_vocab]` tiles: `(logp, lse, entropy)`, each `[tokens]` (entropy zeros
    /// unless asked for). Not differentiable: see [`super::logprob`].
    #[allow(clippy::too_many_arguments)]
    fn fused_logprob_forward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        inv_t: f32,
        tile_tokens: usize,
        tile_vocab: usize,
        with_entropy: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// Kernel: `(dL/dhidden, dL/dweight)` from `dL/dlogp`, recomputing tiles from `lse`.
    #[allow(clippy::too_many_arguments)]
    fn fused_logprob_backward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        inv_t: f32,
        tile_tokens: usize,
        tile_vocab: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

// ---------------------------------------------------------------------------------------------
// Flex: the CPU kernels.

fn host(t: &FlexTensor) -> Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(
            t.clone()
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32 data"),
        ),
    }
}

fn flex(values: Vec<f32>, shape: impl Into<burn::tensor::Shape>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.into()))
}

fn host_ids(t: &FlexTensor) -> Vec<usize> {
    t.clone()
        .into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .expect("integer ids")
        .into_iter()
        .map(|i| i as usize)
        .collect()
}

fn logprob_dims(hidden: &FlexTensor, weight: &FlexTensor) -> LogprobDims {
    let (hs, ws) = (hidden.shape(), weight.shape());
    LogprobDims {
        tokens: hs[0],
        width: hs[1],
        vocab: ws[0],
    }
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

impl FusedOps for Flex {
    fn fused_attention_forward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        segments: Vec<(usize, usize)>,
        scale: f32,
    ) -> (FlexTensor, FlexTensor) {
        let dims = attention_dims(&q, &k);
        let (out, lse) =
            cpu::varlen_attention_forward(&host(&q), &host(&k), &host(&v), dims, &segments, scale);
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
        let (dq, dk, dv) = cpu::varlen_attention_backward(
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
        let keys: Vec<(&[f32], &[f32])> = spans
            .iter()
            .map(|s| {
                let rows = s.k_start * row..(s.k_start + s.k_len) * row;
                (&k[rows.clone()], &v[rows])
            })
            .collect();
        let out = cpu::cached_attention(&host(&q), dims, &queries, &keys, scale);
        flex(out, q.shape())
    }

    fn fused_linear_forward(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        let (n, in_f, out_f) = (x.shape()[0], x.shape()[1], w.shape()[0]);
        flex(
            cpu::linear_forward(&host(&x), &host(&w), n, in_f, out_f),
            [n, out_f],
        )
    }

    fn fused_linear_backward(
        x: FlexTensor,
        w: FlexTensor,
        dy: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let (n, in_f, out_f) = (x.shape()[0], x.shape()[1], w.shape()[0]);
        let (dx, dw) = cpu::linear_backward(&host(&x), &host(&w), &host(&dy), n, in_f, out_f);
        (flex(dx, [n, in_f]), flex(dw, [out_f, in_f]))
    }

    fn fused_rms_norm_forward(x: FlexTensor, w: FlexTensor, eps: f32) -> (FlexTensor, FlexTensor) {
        let (y, r) = cpu::rms_norm_forward(&host(&x), &host(&w), eps);
        let rows = r.len();
        (flex(y, x.shape()), flex(r, [rows]))
    }

    fn fused_rms_norm_backward(
        x: FlexTensor,
        w: FlexTensor,
        r: FlexTensor,
        dy: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let (dx, dw) = cpu::rms_norm_backward(&host(&x), &host(&w), &host(&r), &host(&dy));
        (flex(dx, x.shape()), flex(dw, w.shape()))
    }

    fn fused_swiglu_forward(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
        flex(cpu::swiglu_forward(&host(&gate), &host(&up)), gate.shape())
    }

    fn fused_swiglu_backward(
        gate: FlexTensor,
        up: FlexTensor,
        dout: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let (dg, du) = cpu::swiglu_backward(&host(&gate), &host(&up), &host(&dout));
        (flex(dg, gate.shape()), flex(du, up.shape()))
    }

    fn fused_rope_forward(
        x: FlexTensor,
        cos: FlexTensor,
        sin: FlexTensor,
        inverse: bool,
    ) -> FlexTensor {
        let shape = x.shape();
        let out = cpu::rope(
            &host(&x),
            &host(&cos),
            &host(&sin),
            shape[1],
            shape[2],
            inverse,
        );
        flex(out, shape)
    }

    fn fused_sum_squares(x: FlexTensor) -> FlexTensor {
        flex(vec![cpu::sum_squares(&host(&x)) as f32], [1])
    }

    fn fused_scale(x: FlexTensor, factor: f32) -> FlexTensor {
        flex(cpu::scale(&host(&x), factor), x.shape())
    }

    fn fused_adamw(
        param: FlexTensor,
        grad: FlexTensor,
        m: FlexTensor,
        v: FlexTensor,
        lr: f32,
        beta1: f32,
        beta2: f32,
        epsilon: f32,
        weight_decay: f32,
        time: i32,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let step = cpu::AdamWStep {
            lr,
            beta1,
            beta2,
            epsilon,
            weight_decay,
            time,
        };
        let (p, m, v) = cpu::adamw(&host(&param), &host(&grad), &host(&m), &host(&v), step);
        let shape = param.shape();
        (
            flex(p, shape.clone()),
            flex(m, shape.clone()),
            flex(v, shape),
        )
    }

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
        let (logp, lse, ent) = cpu::selective_logprobs_forward(
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
        let (dh, dw) = cpu::selective_logprobs_backward(
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

// ---------------------------------------------------------------------------------------------
// Autodiff: one backward node per op, calling the inner backend's backward kernel.

/// Registers each gradient for its parent when that input is tracked.
macro_rules! give {
    ($b:ty, $grads:expr, $parents:expr, [$($grad:expr),+]) => {{
        let mut parents = $parents.into_iter();
        $(
            if let Some(p) = parents.next().flatten() {
                $grads.register::<$b>(p.id, $grad);
            }
        )+
    }};
}

#[derive(Debug)]
struct AttentionBackward;

impl<B: FusedOps> Backward<B, 3> for AttentionBackward {
    #[allow(clippy::type_complexity)]
    type State = ([FloatTensor<B>; 5], Vec<(usize, usize)>, f32);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dout = grads.consume::<B>(&ops.node);
        let ([q, k, v, out, lse], segments, scale) = ops.state;
        let (dq, dk, dv) = B::fused_attention_backward(q, k, v, out, lse, dout, segments, scale);
        give!(B, grads, ops.parents, [dq, dk, dv]);
    }
}

#[derive(Debug)]
struct LinearBackward;

impl<B: FusedOps> Backward<B, 2> for LinearBackward {
    type State = [FloatTensor<B>; 2];

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let [x, w] = ops.state;
        let (dx, dw) = B::fused_linear_backward(x, w, dy);
        give!(B, grads, ops.parents, [dx, dw]);
    }
}

#[derive(Debug)]
struct RmsNormBackward;

impl<B: FusedOps> Backward<B, 2> for RmsNormBackward {
    type State = [FloatTensor<B>; 3];

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let [x, w, r] = ops.state;
        let (dx, dw) = B::fused_rms_norm_backward(x, w, r, dy);
        give!(B, grads, ops.parents, [dx, dw]);
    }
}

#[derive(Debug)]
struct SwiGluBackward;

impl<B: FusedOps> Backward<B, 2> for SwiGluBackward {
    type State = [FloatTensor<B>; 2];

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dout = grads.consume::<B>(&ops.node);
        let [gate, up] = ops.state;
        let (dg, du) = B::fused_swiglu_backward(gate, up, dout);
        give!(B, grads, ops.parents, [dg, du]);
    }
}

#[derive(Debug)]
struct RopeBackward;

impl<B: FusedOps> Backward<B, 1> for RopeBackward {
    type State = [FloatTensor<B>; 2];

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dout = grads.consume::<B>(&ops.node);
        let [cos, sin] = ops.state;
        give!(
            B,
            grads,
            ops.parents,
            [B::fused_rope_forward(dout, cos, sin, true)]
        );
    }
}

#[derive(Debug)]
struct LogprobBackward;

impl<B: FusedOps> Backward<B, 2> for LogprobBackward {
    #[allow(clippy::type_complexity)]
    type State = ([FloatTensor<B>; 3], IntTensor<B>, f32, usize, usize);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let ([hidden, weight, lse], targets, inv_t, tile_tokens, tile_vocab) = ops.state;
        let (dh, dw) = B::fused_logprob_backward(
            hidden,
            weight,
            targets,
            lse,
            grad,
            inv_t,
            tile_tokens,
            tile_vocab,
        );
        give!(B, grads, ops.parents, [dh, dw]);
    }
}

type Ad<B, C> = Autodiff<B, C>;

impl<B: FusedOps, C: CheckpointStrategy> FusedOps for Ad<B, C> {
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        segments: Vec<(usize, usize)>,
        scale: f32,
    ) -> FloatTensor<Self> {
        let (qp, kp, vp) = (
            q.primitive().clone(),
            k.primitive().clone(),
            v.primitive().clone(),
        );
        match AttentionBackward
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (out, lse) = B::fused_attention_forward(
                    qp.clone(),
                    kp.clone(),
                    vp.clone(),
                    segments.clone(),
                    scale,
                );
                prep.finish(([qp, kp, vp, out.clone(), lse], segments, scale), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::fused_attention_forward(qp, kp, vp, segments, scale).0)
            }
        }
    }

    fn fused_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        segments: Vec<(usize, usize)>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (out, lse) = B::fused_attention_forward(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            segments,
            scale,
        );
        (Self::from_inner(out), Self::from_inner(lse))
    }

    fn fused_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        segments: Vec<(usize, usize)>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dq, dk, dv) = B::fused_attention_backward(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            out.into_primitive(),
            lse.into_primitive(),
            dout.into_primitive(),
            segments,
            scale,
        );
        (
            Self::from_inner(dq),
            Self::from_inner(dk),
            Self::from_inner(dv),
        )
    }

    fn fused_cached_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        spans: Vec<CachedSpan>,
        scale: f32,
    ) -> FloatTensor<Self> {
        // Generation: nothing to differentiate, the result is a constant of the graph.
        Self::from_inner(B::fused_cached_attention(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            spans,
            scale,
        ))
    }

    fn fused_linear(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let (xp, wp) = (x.primitive().clone(), w.primitive().clone());
        match LinearBackward
            .prepare::<C>([x.node(), w.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::fused_linear_forward(xp.clone(), wp.clone());
                prep.finish([xp, wp], y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_linear_forward(xp, wp)),
        }
    }

    fn fused_linear_forward(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::fused_linear_forward(
            x.into_primitive(),
            w.into_primitive(),
        ))
    }

    fn fused_linear_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, dw) =
            B::fused_linear_backward(x.into_primitive(), w.into_primitive(), dy.into_primitive());
        (Self::from_inner(dx), Self::from_inner(dw))
    }

    fn fused_rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        let (xp, wp) = (x.primitive().clone(), w.primitive().clone());
        match RmsNormBackward
            .prepare::<C>([x.node(), w.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (y, r) = B::fused_rms_norm_forward(xp.clone(), wp.clone(), eps);
                prep.finish([xp, wp, r], y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_rms_norm_forward(xp, wp, eps).0),
        }
    }

    fn fused_rms_norm_forward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (y, r) = B::fused_rms_norm_forward(x.into_primitive(), w.into_primitive(), eps);
        (Self::from_inner(y), Self::from_inner(r))
    }

    fn fused_rms_norm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        r: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, dw) = B::fused_rms_norm_backward(
            x.into_primitive(),
            w.into_primitive(),
            r.into_primitive(),
            dy.into_primitive(),
        );
        (Self::from_inner(dx), Self::from_inner(dw))
    }

    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let (gp, up_p) = (gate.primitive().clone(), up.primitive().clone());
        match SwiGluBackward
            .prepare::<C>([gate.node(), up.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::fused_swiglu_forward(gp.clone(), up_p.clone());
                prep.finish([gp, up_p], out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_swiglu_forward(gp, up_p)),
        }
    }

    fn fused_swiglu_forward(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::fused_swiglu_forward(
            gate.into_primitive(),
            up.into_primitive(),
        ))
    }

    fn fused_swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        dout: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (dg, du) = B::fused_swiglu_backward(
            gate.into_primitive(),
            up.into_primitive(),
            dout.into_primitive(),
        );
        (Self::from_inner(dg), Self::from_inner(du))
    }

    fn fused_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let xp = x.primitive().clone();
        let (cos, sin) = (cos.into_primitive(), sin.into_primitive());
        match RopeBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::fused_rope_forward(xp, cos.clone(), sin.clone(), false);
                prep.finish([cos, sin], out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_rope_forward(xp, cos, sin, false)),
        }
    }

    fn fused_rope_forward(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        inverse: bool,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::fused_rope_forward(
            x.into_primitive(),
            cos.into_primitive(),
            sin.into_primitive(),
            inverse,
        ))
    }

    fn fused_sum_squares(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::fused_sum_squares(x.into_primitive()))
    }

    fn fused_scale(x: FloatTensor<Self>, factor: f32) -> FloatTensor<Self> {
        Self::from_inner(B::fused_scale(x.into_primitive(), factor))
    }

    fn fused_adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        lr: f32,
        beta1: f32,
        beta2: f32,
        epsilon: f32,
        weight_decay: f32,
        time: i32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (p, m, v) = B::fused_adamw(
            param.into_primitive(),
            grad.into_primitive(),
            m.into_primitive(),
            v.into_primitive(),
            lr,
            beta1,
            beta2,
            epsilon,
            weight_decay,
            time,
        );
        (
            Self::from_inner(p),
            Self::from_inner(m),
            Self::from_inner(v),
        )
    }

    fn fused_logprob(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        inv_t: f32,
        tile_tokens: usize,
        tile_vocab: usize,
        with_entropy: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (hp, wp) = (hidden.primitive().clone(), weight.primitive().clone());
        let forward = |h, w, t| {
            B::fused_logprob_forward(h, w, t, inv_t, tile_tokens, tile_vocab, with_entropy)
        };
        match LogprobBackward
            .prepare::<C>([hidden.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (logp, lse, ent) = forward(hp.clone(), wp.clone(), targets.clone());
                let state = ([hp, wp, lse], targets, inv_t, tile_tokens, tile_vocab);
                (prep.finish(state, logp), Self::from_inner(ent))
            }
            OpsKind::UnTracked(prep) => {
                let (logp, _, ent) = forward(hp, wp, targets);
                (prep.finish(logp), Self::from_inner(ent))
            }
        }
    }

    fn fused_logprob_forward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        inv_t: f32,
        tile_tokens: usize,
        tile_vocab: usize,
        with_entropy: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (logp, lse, ent) = B::fused_logprob_forward(
            hidden.into_primitive(),
            weight.into_primitive(),
            targets,
            inv_t,
            tile_tokens,
            tile_vocab,
            with_entropy,
        );
        (
            Self::from_inner(logp),
            Self::from_inner(lse),
            Self::from_inner(ent),
        )
    }

    fn fused_logprob_backward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        inv_t: f32,
        tile_tokens: usize,
        tile_vocab: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (dh, dw) = B::fused_logprob_backward(
            hidden.into_primitive(),
            weight.into_primitive(),
            targets,
            lse.into_primitive(),
            grad.into_primitive(),
            inv_t,
            tile_tokens,
            tile_vocab,
        );
        (Self::from_inner(dh), Self::from_inner(dw))
    }
}

// ---------------------------------------------------------------------------------------------
// The tensor-level API.

/// Whether the fused ops run on `device`: Flex (the CPU kernels) and, with the `vulkan`/`cuda`
/// features, the CubeCL backends (`fused::cube`); with or without autodiff.
pub fn supported(device: &Device) -> bool {
    match device.clone().inner().as_dispatch() {
        DispatchDevice::Flex(_) => true,
        #[cfg(any(feature = "vulkan", feature = "cuda"))]
        DispatchDevice::Cube(_) => true,
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

/// Whether the device's tensors live in host memory, where the CPU-only paths (the host KV cache
/// and its cached-attention kernel used by generation) can read them directly.
pub fn host_kernels(device: &Device) -> bool {
    matches!(
        device.clone().inner().as_dispatch(),
        DispatchDevice::Flex(_)
    )
}

/// Whether the fused ops can take tensors of this dtype (the kernels are f32).
pub fn supported_dtype(dtype: DType) -> bool {
    dtype == DType::F32
}

/// Causal attention within each `(start, len)` segment of the token axis; `q` `[T, H, d]`,
/// `k`/`v` `[T, KV, d]` (GQA: KV divides H). Tokens outside every segment get zeros.
pub fn varlen_attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    segments: &[(usize, usize)],
    scale: f32,
) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        segments.to_vec(),
        scale,
    ))
}

/// Attention of new tokens to their sequences' KV caches (generation, no gradient): `q`
/// `[T, H, d]`, `k`/`v` `[S, KV, d]` all caches gathered; see [`CachedSpan`]. Rows of `q` no span
/// covers get zeros.
pub fn cached_attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    spans: &[CachedSpan],
    scale: f32,
) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_cached_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        spans.to_vec(),
        scale,
    ))
}

/// `x [N, in] · Wᵀ` for a weight `W` `[out, in]` in Hugging Face layout.
pub fn linear(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_linear(
        x.into_dispatch(),
        w.into_dispatch(),
    ))
}

/// RMSNorm of `x` `[N, C]` with weight `w` `[C]`.
pub fn rms_norm(x: Tensor<2>, w: Tensor<1>, eps: f32) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_rms_norm(
        x.into_dispatch(),
        w.into_dispatch(),
        eps,
    ))
}

/// `silu(gate) · up`.
pub fn swiglu(gate: Tensor<2>, up: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_swiglu(
        gate.into_dispatch(),
        up.into_dispatch(),
    ))
}

/// Rotate-half RoPE of `x` `[T, H, d]` with per-token tables `cos`/`sin` `[T, d]`.
pub fn rope(x: Tensor<3>, cos: Tensor<2>, sin: Tensor<2>) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_rope(
        x.into_dispatch(),
        cos.into_dispatch(),
        sin.into_dispatch(),
    ))
}

/// The selective log-prob kernel (see [`super::logprob`]): `(logp, lse, entropy)`.
pub(crate) fn logprob_forward(
    hidden: &Tensor<2>,
    weight: &Tensor<2>,
    targets: &Tensor<1, Int>,
    inv_t: f32,
    chunks: super::ChunkSizes,
    with_entropy: bool,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let (logp, lse, ent) = <Dispatch as FusedOps>::fused_logprob_forward(
        hidden.clone().into_dispatch(),
        weight.clone().into_dispatch(),
        targets.clone().into_dispatch(),
        inv_t,
        chunks.tokens,
        chunks.vocab,
        with_entropy,
    );
    (
        Tensor::from_dispatch(logp),
        Tensor::from_dispatch(lse),
        Tensor::from_dispatch(ent),
    )
}

/// The selective log-prob backward kernel: `(dL/dhidden, dL/dweight)`.
pub(crate) fn logprob_backward(
    hidden: &Tensor<2>,
    weight: &Tensor<2>,
    targets: &Tensor<1, Int>,
    lse: &Tensor<1>,
    grad: &Tensor<1>,
    inv_t: f32,
    chunks: super::ChunkSizes,
) -> (Tensor<2>, Tensor<2>) {
    let (dh, dw) = <Dispatch as FusedOps>::fused_logprob_backward(
        hidden.clone().into_dispatch(),
        weight.clone().into_dispatch(),
        targets.clone().into_dispatch(),
        lse.clone().into_dispatch(),
        grad.clone().into_dispatch(),
        inv_t,
        chunks.tokens,
        chunks.vocab,
    );
    (Tensor::from_dispatch(dh), Tensor::from_dispatch(dw))
}

/// One AdamW update (see [`cpu::adamw`]): the new `(param, m, v)`.
pub fn adamw<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    m: Tensor<D>,
    v: Tensor<D>,
    step: cpu::AdamWStep,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let (p, m, v) = <Dispatch as FusedOps>::fused_adamw(
        param.into_dispatch(),
        grad.into_dispatch(),
        m.into_dispatch(),
        v.into_dispatch(),
        step.lr,
        step.beta1,
        step.beta2,
        step.epsilon,
        step.weight_decay,
        step.time,
    );
    (
        Tensor::from_dispatch(p),
        Tensor::from_dispatch(m),
        Tensor::from_dispatch(v),
    )
}

/// `Σ x²` of a tensor (f64 accumulation on the kernel path).
pub fn sum_squares<const D: usize>(x: Tensor<D>) -> f64 {
    if !(supported(&x.device()) && supported_dtype(x.dtype())) {
        return x.square().sum().into_scalar::<f64>();
    }
    Tensor::<1>::from_dispatch(<Dispatch as FusedOps>::fused_sum_squares(x.into_dispatch()))
        .into_scalar::<f64>()
}

/// `x · factor` (one pass on the kernel path).
pub fn scale<const D: usize>(x: Tensor<D>, factor: f32) -> Tensor<D> {
    if !(supported(&x.device()) && supported_dtype(x.dtype())) {
        return x * factor as f64;
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_scale(
        x.into_dispatch(),
        factor,
    ))
}

/// Differentiable selective log-probs `log softmax(hidden · weightᵀ / temperature)[targets]` and
/// (when asked, without gradient) the entropies, `[tokens]` each, through the fused kernels: the
/// `[tokens × vocab]` logits never exist, forward or backward. Needs [`supported`].
pub fn selective_logprobs(
    hidden: Tensor<2>,
    weight: Tensor<2>,
    targets: Tensor<1, Int>,
    temperature: f64,
    chunks: super::ChunkSizes,
    with_entropy: bool,
) -> (Tensor<1>, Tensor<1>) {
    let (logp, ent) = <Dispatch as FusedOps>::fused_logprob(
        hidden.into_dispatch(),
        weight.into_dispatch(),
        targets.into_dispatch(),
        (1.0 / temperature) as f32,
        chunks.tokens,
        chunks.vocab,
        with_entropy,
    );
    (Tensor::from_dispatch(logp), Tensor::from_dispatch(ent))
}
