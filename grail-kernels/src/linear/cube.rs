//! The linear product on the CubeCL backends, through the shared GEMM.

// Kernel code indexes buffers explicitly: iterators do not exist inside `#[cube]` functions.
#![allow(clippy::needless_range_loop)]

use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;

use super::LinearOps;
use crate::cube_gemm::product;

impl LinearOps for CubeBackend {
    fn fused_linear_forward(x: CubeTensor, w: CubeTensor) -> CubeTensor {
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
