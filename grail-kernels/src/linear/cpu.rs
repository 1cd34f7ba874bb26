//! The CPU linear kernels: the shared GEMM over the weight read in place.

use burn::backend::Flex;
use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;

use super::LinearOps;
use crate::cpu_gemm::{View, product_parallel};
use crate::flex_io::{flex, host};

/// A linear layer without bias, `y [n × out] = x [n × in] · Wᵀ` with `W` `[out × in]` (Hugging
/// Face layout), read in place: no transposed copy of the weight.
pub fn linear_forward(x: &[f32], w: &[f32], n: usize, in_f: usize, out_f: usize) -> Vec<f32> {
    product_parallel(
        n,
        out_f,
        in_f,
        x,
        View::rows(0, in_f),
        w,
        View::rows(0, in_f).t(),
    )
}

/// Gradients of [`linear_forward`]: `dx = dy · W` and `dW = dyᵀ · x`, both written contiguous
/// in their parameter's own layout (so optimizers and clipping read them in one pass).
pub fn linear_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    n: usize,
    in_f: usize,
    out_f: usize,
) -> (Vec<f32>, Vec<f32>) {
    let dx = product_parallel(
        n,
        in_f,
        out_f,
        dy,
        View::rows(0, out_f),
        w,
        View::rows(0, in_f),
    );
    let dw = product_parallel(
        out_f,
        in_f,
        n,
        dy,
        View::rows(0, out_f).t(),
        x,
        View::rows(0, in_f),
    );
    (dx, dw)
}

impl LinearOps for Flex {
    fn fused_linear_forward(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        let (n, in_f, out_f) = (x.shape()[0], x.shape()[1], w.shape()[0]);
        flex(
            linear_forward(&host(&x), &host(&w), n, in_f, out_f),
            [n, out_f],
        )
    }

    fn fused_linear_backward(
        x: FlexTensor,
        w: FlexTensor,
        dy: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let (n, in_f, out_f) = (x.shape()[0], x.shape()[1], w.shape()[0]);
        let (dx, dw) = linear_backward(&host(&x), &host(&w), &host(&dy), n, in_f, out_f);
        (flex(dx, [n, in_f]), flex(dw, [out_f, in_f]))
    }
}
