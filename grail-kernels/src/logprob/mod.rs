//! Selective log-probs `log softmax(hidden · weightᵀ / T)[targets]` as a fused, differentiable op:
//! the `[tokens × vocab]` logits never exist, forward or backward; each tile is rebuilt from the
//! saved per-token log-sum-exp. [`selective_logprobs_forward`] and
//! [`selective_logprobs_backward`] have the same computation on plain tensors (for callers that
//! apply their own gradient), [`naive_selective_logprobs`] the unfused reference.

use burn::backend::AutodiffBackend;
use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{Int, Tensor};

use crate::autodiff::give;

mod chunked;
mod cpu;
#[cfg(any(feature = "vulkan", feature = "cuda"))]
mod cube;

pub use chunked::{
    ChunkSizes, SelectiveLogProbs, gradient_surrogate, naive_selective_logprobs,
    selective_logprobs_backward, selective_logprobs_forward,
};

/// Selective log-prob kernels; `fused_logprob` is differentiable in `hidden` and `weight`.
#[backend_extension(Flex, Cube: cfg(any(feature = "vulkan", feature = "cuda")), Autodiff)]
pub trait LogprobOps: Backend {
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
    /// unless asked for). Not differentiable: see [`selective_logprobs_forward`].
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

#[derive(Debug)]
struct LogprobBackward;

impl<B: LogprobOps> Backward<B, 2> for LogprobBackward {
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

impl<B: LogprobOps, C: CheckpointStrategy> LogprobOps for Autodiff<B, C> {
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

/// The selective log-prob kernel (see [`chunked`]): `(logp, lse, entropy)`.
pub(crate) fn logprob_forward(
    hidden: &Tensor<2>,
    weight: &Tensor<2>,
    targets: &Tensor<1, Int>,
    inv_t: f32,
    chunks: ChunkSizes,
    with_entropy: bool,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let (logp, lse, ent) = <Dispatch as LogprobOps>::fused_logprob_forward(
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
    chunks: ChunkSizes,
) -> (Tensor<2>, Tensor<2>) {
    let (dh, dw) = <Dispatch as LogprobOps>::fused_logprob_backward(
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

/// Differentiable selective log-probs `log softmax(hidden · weightᵀ / temperature)[targets]` and
/// (when asked, without gradient) the entropies, `[tokens]` each, through the fused kernels: the
/// `[tokens × vocab]` logits never exist, forward or backward. Needs [`supported`](crate::supported).
pub fn selective_logprobs(
    hidden: Tensor<2>,
    weight: Tensor<2>,
    targets: Tensor<1, Int>,
    temperature: f64,
    chunks: ChunkSizes,
    with_entropy: bool,
) -> (Tensor<1>, Tensor<1>) {
    let (logp, ent) = <Dispatch as LogprobOps>::fused_logprob(
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
