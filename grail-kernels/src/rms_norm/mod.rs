//! RMSNorm over the last axis, `y = x · w / sqrt(mean(x²) + eps)`; the backward keeps only the
//! inverse RMS per row.

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

/// RMSNorm kernels; `fused_rms_norm` is differentiable.
#[backend_extension(Flex, Cube: cfg(any(feature = "vulkan", feature = "cuda")), Autodiff)]
pub trait RmsNormOps: Backend {
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
}

#[derive(Debug)]
struct RmsNormBackward;

impl<B: RmsNormOps> Backward<B, 2> for RmsNormBackward {
    type State = [FloatTensor<B>; 3];

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let [x, w, r] = ops.state;
        let (dx, dw) = B::fused_rms_norm_backward(x, w, r, dy);
        give!(B, grads, ops.parents, [dx, dw]);
    }
}

impl<B: RmsNormOps, C: CheckpointStrategy> RmsNormOps for Autodiff<B, C> {
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
}

/// RMSNorm of `x` `[N, C]` with weight `w` `[C]`.
pub fn rms_norm(x: Tensor<2>, w: Tensor<1>, eps: f32) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as RmsNormOps>::fused_rms_norm(
        x.into_dispatch(),
        w.into_dispatch(),
        eps,
    ))
}
