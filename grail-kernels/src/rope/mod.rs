//! Rotate-half rotary position embedding with per-token cos/sin tables (Hugging Face layout);
//! the backward is the transposed rotation, so nothing is kept but the tables.

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

/// The RoPE kernel (forward or transposed); `fused_rope` is differentiable in `x`.
#[backend_extension(Flex, Cube: cfg(any(feature = "vulkan", feature = "cuda")), Autodiff)]
pub trait RopeOps: Backend {
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
}

#[derive(Debug)]
struct RopeBackward;

impl<B: RopeOps> Backward<B, 1> for RopeBackward {
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

impl<B: RopeOps, C: CheckpointStrategy> RopeOps for Autodiff<B, C> {
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
}

/// Rotate-half RoPE of `x` `[T, H, d]` with per-token tables `cos`/`sin` `[T, d]`.
pub fn rope(x: Tensor<3>, cos: Tensor<2>, sin: Tensor<2>) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as RopeOps>::fused_rope(
        x.into_dispatch(),
        cos.into_dispatch(),
        sin.into_dispatch(),
    ))
}
