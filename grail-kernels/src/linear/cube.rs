//! The linear product on the CubeCL backends, through the shared GEMM.

// Kernel code indexes buffers explicitly: iterators do not exist inside `#[cube]` functions.
#![allow(clippy::needless_range_loop)]

use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;

use burn::backend::TensorMetadata;
use burn::backend::ops::FloatTensorOps;
use burn::tensor::Shape;

use super::LinearOps;
use super::panels::PANEL;
use crate::cube_gemm::product;

impl LinearOps for CubeBackend {
    fn fused_linear_forward(x: CubeTensor, w: CubeTensor) -> CubeTensor {
        product(x, false, w, true)
    }

    fn fused_linear_panels_forward(x: CubeTensor, w: CubeTensor) -> CubeTensor {
        // Back to row-major (panels are packed for the CPU kernel; a copy moved here still
        // multiplies correctly).
        let [out, inp] = [w.shape()[0], w.shape()[1]];
        let w = CubeBackend::float_reshape(w, Shape::new([out / PANEL, inp, PANEL]));
        let w = CubeBackend::float_swap_dims(w, 1, 2);
        let w = CubeBackend::float_reshape(w, Shape::new([out, inp]));
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
}
