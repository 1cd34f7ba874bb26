//! SwiGLU on the CubeCL backends: one thread per element.

// Kernel code indexes buffers explicitly: iterators do not exist inside `#[cube]` functions.
#![allow(clippy::needless_range_loop)]

use burn::backend::TensorMetadata;
use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::SwiGluOps;
use crate::cube_launch::{arg, empty_like, f32_contiguous, grid};

/// Element-wise `silu(gate) · up`.
#[cube(launch)]
fn swiglu_forward_kernel(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let g = gate[i];
    let s = f32::new(1.0) / (f32::new(1.0) + (-g).exp());
    out[i] = g * s * up[i];
}

/// Element-wise gradients of `silu(gate) · up`, recomputed from the inputs.
#[cube(launch)]
fn swiglu_backward_kernel(
    gate: &[f32],
    up: &[f32],
    dout: &[f32],
    dgate: &mut [f32],
    dup: &mut [f32],
) {
    let i = ABSOLUTE_POS;
    if i >= dgate.len() {
        terminate!();
    }
    let g = gate[i];
    let s = f32::new(1.0) / (f32::new(1.0) + (-g).exp());
    let d = dout[i];
    dgate[i] = d * up[i] * s * (f32::new(1.0) + g * (f32::new(1.0) - s));
    dup[i] = d * g * s;
}

impl SwiGluOps for CubeBackend {
    fn fused_swiglu_forward(gate: CubeTensor, up: CubeTensor) -> CubeTensor {
        let (gate, up) = (f32_contiguous(gate), f32_contiguous(up));
        let shape = gate.shape();
        let n = shape.num_elements();
        let out = empty_like(&gate, shape);
        let (count, dim) = grid(&gate, n);
        swiglu_forward_kernel::launch(&gate.client, count, dim, arg(&gate), arg(&up), arg(&out));
        out
    }

    fn fused_swiglu_backward(
        gate: CubeTensor,
        up: CubeTensor,
        dout: CubeTensor,
    ) -> (CubeTensor, CubeTensor) {
        let (gate, up, dout) = (
            f32_contiguous(gate),
            f32_contiguous(up),
            f32_contiguous(dout),
        );
        let shape = gate.shape();
        let n = shape.num_elements();
        let dgate = empty_like(&gate, shape.clone());
        let dup = empty_like(&gate, shape);
        let (count, dim) = grid(&gate, n);
        swiglu_backward_kernel::launch(
            &gate.client,
            count,
            dim,
            arg(&gate),
            arg(&up),
            arg(&dout),
            arg(&dgate),
            arg(&dup),
        );
        (dgate, dup)
    }
}
