//! SwiGLU's gate, `silu(gate) · up`, element-wise; the backward recomputes from the two inputs
//! (the product is never kept).

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

/// SwiGLU kernels; `fused_swiglu` is differentiable.
#[backend_extension(Flex, Cube: cfg(any(feature = "vulkan", feature = "cuda")), Autodiff)]
pub trait SwiGluOps: Backend {
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
}

#[derive(Debug)]
struct SwiGluBackward;

impl<B: SwiGluOps> Backward<B, 2> for SwiGluBackward {
    type State = [FloatTensor<B>; 2];

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dout = grads.consume::<B>(&ops.node);
        let [gate, up] = ops.state;
        let (dg, du) = B::fused_swiglu_backward(gate, up, dout);
        give!(B, grads, ops.parents, [dg, du]);
    }
}

impl<B: SwiGluOps, C: CheckpointStrategy> SwiGluOps for Autodiff<B, C> {
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
}

/// `silu(gate) · up`.
pub fn swiglu(gate: Tensor<2>, up: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as SwiGluOps>::fused_swiglu(
        gate.into_dispatch(),
        up.into_dispatch(),
    ))
}
