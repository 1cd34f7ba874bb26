//! RoPE on the CubeCL backends: one thread per element pair.

// Kernel code indexes buffers explicitly: iterators do not exist inside `#[cube]` functions.
#![allow(clippy::needless_range_loop)]

use burn::backend::TensorMetadata;
use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::RopeOps;
use crate::cube_launch::{arg, dims3, empty_like, f32_contiguous, grid};

/// Rotate-half RoPE of `x` `[T, H, d]` with `[T, d]` tables; `sign = −1` applies the transpose.
#[cube(launch)]
fn rope_kernel(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    out: &mut [f32],
    heads: u32,
    dim: u32,
    sign: f32,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let d = dim as usize;
    let half = d / 2;
    let t = i / (heads as usize * d);
    let c = i % d;
    let table = t * d + c;
    if c < half {
        out[i] = x[i] * cos[table] - sign * x[i + half] * sin[table];
    } else {
        out[i] = x[i] * cos[table] + sign * x[i - half] * sin[table];
    }
}

impl RopeOps for CubeBackend {
    fn fused_rope_forward(
        x: CubeTensor,
        cos: CubeTensor,
        sin: CubeTensor,
        inverse: bool,
    ) -> CubeTensor {
        let (x, cos, sin) = (f32_contiguous(x), f32_contiguous(cos), f32_contiguous(sin));
        let [_, heads, d] = dims3(&x);
        let shape = x.shape();
        let n = shape.num_elements();
        let out = empty_like(&x, shape);
        let (count, dim) = grid(&x, n);
        rope_kernel::launch(
            &x.client,
            count,
            dim,
            arg(&x),
            arg(&cos),
            arg(&sin),
            arg(&out),
            heads as u32,
            d as u32,
            if inverse { -1.0 } else { 1.0 },
        );
        out
    }
}
