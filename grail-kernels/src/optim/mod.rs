//! The optimizer's passes over parameters and gradients: one-pass AdamW (same arithmetic, in the
//! same order, as burn's `AdamW`), and the sum of squares and scaling of global-norm gradient
//! clipping. None of them is differentiated.

use burn::backend::AutodiffBackend;
use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::Tensor;

use crate::{supported, supported_dtype};

mod cpu;
#[cfg(any(feature = "vulkan", feature = "cuda"))]
mod cube;

/// AdamW hyper-parameters of one update (`time` counts updates, starting at 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Added to the root of the second moment.
    pub epsilon: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// Update count including this one (bias correction).
    pub time: i32,
}

/// Optimizer kernels (no autodiff).
#[backend_extension(Flex, Cube: cfg(any(feature = "vulkan", feature = "cuda")), Autodiff)]
pub trait OptimOps: Backend {
    /// Kernel: `Σ x²` over all elements, as a one-element tensor (accumulated in f64).
    fn fused_sum_squares(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Kernel: `x · factor`.
    fn fused_scale(x: FloatTensor<Self>, factor: f32) -> FloatTensor<Self>;
    /// Kernel: one AdamW update of a parameter of any shape: `(param, m, v)` after the step.
    fn fused_adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        step: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

impl<B: OptimOps, C: CheckpointStrategy> OptimOps for Autodiff<B, C> {
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
        step: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (p, m, v) = B::fused_adamw(
            param.into_primitive(),
            grad.into_primitive(),
            m.into_primitive(),
            v.into_primitive(),
            step,
        );
        (
            Self::from_inner(p),
            Self::from_inner(m),
            Self::from_inner(v),
        )
    }
}

/// One AdamW update (see [`AdamWStep`]): the new `(param, m, v)`.
pub fn adamw<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    m: Tensor<D>,
    v: Tensor<D>,
    step: AdamWStep,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let (p, m, v) = <Dispatch as OptimOps>::fused_adamw(
        param.into_dispatch(),
        grad.into_dispatch(),
        m.into_dispatch(),
        v.into_dispatch(),
        step,
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
    Tensor::<1>::from_dispatch(<Dispatch as OptimOps>::fused_sum_squares(x.into_dispatch()))
        .into_scalar::<f64>()
}

/// `x · factor` (one pass on the kernel path).
pub fn scale<const D: usize>(x: Tensor<D>, factor: f32) -> Tensor<D> {
    if !(supported(&x.device()) && supported_dtype(x.dtype())) {
        return x * factor as f64;
    }
    Tensor::from_dispatch(<Dispatch as OptimOps>::fused_scale(
        x.into_dispatch(),
        factor,
    ))
}
