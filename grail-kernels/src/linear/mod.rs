//! A linear layer without bias, `x · Wᵀ` with `W` `[out, in]` in Hugging Face layout, whose
//! weight gradient comes out contiguous in the weight's own layout.

use burn::backend::AutodiffBackend;
use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{FloatDType, Tensor};

use crate::autodiff::give;

mod cpu;
#[cfg(any(feature = "vulkan", feature = "cuda"))]
mod cube;
mod panels;

pub use panels::{PANEL, to_panel_order};

/// The linear product and its backward; `fused_linear` is differentiable.
#[backend_extension(Flex, Cube: cfg(any(feature = "vulkan", feature = "cuda")), Autodiff)]
pub trait LinearOps: Backend {
    /// `x [N, in] · Wᵀ` for `W` `[out, in]`; its weight gradient comes out contiguous.
    fn fused_linear(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::fused_linear_forward(x, w)
    }
    /// Kernel: the product.
    fn fused_linear_forward(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Kernel: `x [N, in] · Wᵀ` for `W` `[out, in]` in panel order (see [`linear_panels`]); no
    /// gradient.
    fn fused_linear_panels_forward(x: FloatTensor<Self>, w: FloatTensor<Self>)
    -> FloatTensor<Self>;
    /// Kernel: `(dx, dW)`.
    fn fused_linear_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

#[derive(Debug)]
struct LinearBackward;

impl<B: LinearOps> Backward<B, 2> for LinearBackward {
    type State = [FloatTensor<B>; 2];

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<B>(&ops.node);
        let [x, w] = ops.state;
        let (dx, dw) = B::fused_linear_backward(x, w, dy);
        give!(B, grads, ops.parents, [dx, dw]);
    }
}

impl<B: LinearOps, C: CheckpointStrategy> LinearOps for Autodiff<B, C> {
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

    fn fused_linear_panels_forward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::fused_linear_panels_forward(
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
}

/// `x [N, in] · Wᵀ` for a weight `W` `[out, in]` in Hugging Face layout. A weight whose dtype
/// the device's kernel does not read as it is (bf16 off the CPU) is widened to f32 first.
pub fn linear(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as LinearOps>::fused_linear(
        x.into_dispatch(),
        readable(w).into_dispatch(),
    ))
}

/// `w` in a dtype the device's kernel reads as it is (bf16 off the CPU widened to f32).
fn readable(w: Tensor<2>) -> Tensor<2> {
    if crate::supported_weight(&w.device(), w.dtype()) {
        w
    } else {
        w.cast(FloatDType::F32)
    }
}

/// [`linear`] for a weight `W` `[out, in]` held in panel order ([`panel_order`]; `out` a
/// multiple of [`PANEL`]): on the CPU one kernel reads each 16-feature panel once per call and
/// keeps whole output rows in registers (rollout copies are packed once, when built). Another
/// device gets the row-major weight back first. No gradient flows through it.
pub fn linear_panels(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    let ([_, inp], [out, w_inp]) = (x.dims(), w.dims());
    assert!(
        inp == w_inp && out.is_multiple_of(PANEL),
        "linear_panels: inputs of {inp} features against a [{out}, {w_inp}] weight (rows a \
         multiple of {PANEL})"
    );
    Tensor::from_dispatch(<Dispatch as LinearOps>::fused_linear_panels_forward(
        x.into_dispatch(),
        readable(w).into_dispatch(),
    ))
}

/// `w` `[out, in]` (row-major) reordered into panel order, on its device; see
/// [`linear_panels`]. `out` must be a multiple of [`PANEL`].
pub fn panel_order(w: Tensor<2>) -> Tensor<2> {
    let [out, inp] = w.dims();
    assert!(
        out.is_multiple_of(PANEL),
        "panel_order: {out} rows is not a multiple of {PANEL}"
    );
    w.reshape([out / PANEL, PANEL, inp])
        .swap_dims(1, 2)
        .reshape([out, inp])
}

/// The row-major `[out, in]` weight of `w`, a weight in panel order ([`panel_order`]).
pub fn row_order(w: Tensor<2>) -> Tensor<2> {
    let [out, inp] = w.dims();
    assert!(
        out.is_multiple_of(PANEL),
        "row_order: {out} rows is not a multiple of {PANEL}"
    );
    w.reshape([out / PANEL, inp, PANEL])
        .swap_dims(1, 2)
        .reshape([out, inp])
}
