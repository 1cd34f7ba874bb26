//! Causal attention over packed sequences: each `(start, len)` segment of the token axis attends
//! causally within itself, tokens outside every segment (row padding) get zero outputs and
//! gradients. Also the attention of new tokens to their sequences' KV caches, for generation.
//! The backward keeps only the per-row log-sum-exp, never the `[len × len]` probabilities.
//!
//! Layouts: packed tokens first, `[tokens, heads, head_dim]` (what the projections give before
//! any transpose); grouped-query attention when the key/value heads divide the query heads.

use burn::backend::AutodiffBackend;
use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::Tensor;

use crate::autodiff::give;

mod cpu;
#[cfg(any(feature = "vulkan", feature = "cuda"))]
mod cube;

pub use cpu::{AttentionDims, HostKv, cached_attention as cached_attention_on_host};

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

/// One sequence of a paged-attention call ([`paged_attention`]): its new tokens are rows
/// `q_start..q_start + q_len` of the queries; its `k_len` cached positions, the new tokens' own
/// last, live in the pool's `blocks` in position order, position `p` at row
/// `blocks[p / block_size] · block_size + p % block_size`. New token `j` sees positions
/// `0 ..= k_len − q_len + j`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PagedSpan {
    /// First query row of the sequence's new tokens.
    pub q_start: usize,
    /// Number of new tokens.
    pub q_len: usize,
    /// Positions cached, the new tokens' included (`≥ q_len`).
    pub k_len: usize,
    /// The sequence's blocks in position order (at least `k_len / block_size` rounded up).
    pub blocks: Vec<u32>,
}

/// Attention kernels: forward, backward, cached and paged attention; the `fused_*` entry points are
/// differentiable (`Autodiff<B>` records one backward node).
#[backend_extension(Flex, Cube: cfg(any(feature = "vulkan", feature = "cuda")), Autodiff)]
pub trait AttentionOps: Backend {
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
    /// Attention of new tokens to their sequences' cached positions in a block pool, for
    /// generation (no gradient): `q` `[T, H, d]`, `k`/`v` `[blocks × block_size, KV, d]` (see
    /// [`PagedSpan`]) → `[T, H, d]`, zeros on rows no span covers.
    fn fused_paged_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        spans: Vec<PagedSpan>,
        block_size: usize,
        scale: f32,
    ) -> FloatTensor<Self>;
}

#[derive(Debug)]
struct AttentionBackward;

impl<B: AttentionOps> Backward<B, 3> for AttentionBackward {
    #[allow(clippy::type_complexity)]
    type State = ([FloatTensor<B>; 5], Vec<(usize, usize)>, f32);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dout = grads.consume::<B>(&ops.node);
        let ([q, k, v, out, lse], segments, scale) = ops.state;
        let (dq, dk, dv) = B::fused_attention_backward(q, k, v, out, lse, dout, segments, scale);
        give!(B, grads, ops.parents, [dq, dk, dv]);
    }
}

impl<B: AttentionOps, C: CheckpointStrategy> AttentionOps for Autodiff<B, C> {
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

    fn fused_paged_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        spans: Vec<PagedSpan>,
        block_size: usize,
        scale: f32,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::fused_paged_attention(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            spans,
            block_size,
            scale,
        ))
    }
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
    Tensor::from_dispatch(<Dispatch as AttentionOps>::fused_attention(
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
    Tensor::from_dispatch(<Dispatch as AttentionOps>::fused_cached_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        spans.to_vec(),
        scale,
    ))
}

/// Attention of new tokens to their sequences' cached positions in a block pool (generation, no
/// gradient): `q` `[T, H, d]`, `k`/`v` `[blocks × block_size, KV, d]`; see [`PagedSpan`]. Rows
/// of `q` no span covers get zeros.
pub fn paged_attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    spans: &[PagedSpan],
    block_size: usize,
    scale: f32,
) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as AttentionOps>::fused_paged_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        spans.to_vec(),
        block_size,
        scale,
    ))
}
