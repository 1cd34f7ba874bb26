//! Optimizer kernels on the CubeCL backends: AdamW one thread per element, the sum of squares in
//! two stages (per-block partials, then their sum).

// Kernel code indexes buffers explicitly: iterators do not exist inside `#[cube]` functions.
#![allow(clippy::needless_range_loop)]

use burn::backend::TensorMetadata;
use burn::backend::ops::FloatTensorOps;
use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::{AdamWStep, OptimOps};
use crate::cube_launch::{arg, empty_like, f32_contiguous, grid};

type B = CubeBackend;

/// Stage one of `Σ x²`: thread `i` of `parts` sums elements `i, i + parts, …` (coalesced).
#[cube(launch)]
fn sum_squares_partial_kernel(x: &[f32], partial: &mut [f32]) {
    let i = ABSOLUTE_POS;
    let parts = partial.len();
    if i >= parts {
        terminate!();
    }
    let mut acc = f32::new(0.0);
    let mut at = i;
    while at < x.len() {
        let v = x[at];
        acc += v * v;
        at += parts;
    }
    partial[i] = acc;
}

/// Stage two: one thread adds the partial sums.
#[cube(launch)]
fn sum_kernel(partial: &[f32], out: &mut [f32]) {
    if ABSOLUTE_POS == 0 {
        let mut acc = f32::new(0.0);
        for i in 0..partial.len() {
            acc += partial[i];
        }
        out[0] = acc;
    }
}

/// One AdamW update per element (burn's AdamW formula, as the CPU kernel).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn adamw_kernel(
    param: &[f32],
    grad: &[f32],
    m: &[f32],
    v: &[f32],
    p_out: &mut [f32],
    m_out: &mut [f32],
    v_out: &mut [f32],
    lr: f32,
    beta1: f32,
    beta2: f32,
    epsilon: f32,
    decay: f32,
    c1: f32,
    c2: f32,
) {
    let i = ABSOLUTE_POS;
    if i >= p_out.len() {
        terminate!();
    }
    let g = grad[i];
    let m_new = m[i] * beta1 + g * (f32::new(1.0) - beta1);
    let v_new = v[i] * beta2 + g * g * (f32::new(1.0) - beta2);
    m_out[i] = m_new;
    v_out[i] = v_new;
    let delta = (m_new / c1) / ((v_new / c2).sqrt() + epsilon);
    p_out[i] = param[i] * decay - delta * lr;
}

impl OptimOps for CubeBackend {
    fn fused_sum_squares(x: CubeTensor) -> CubeTensor {
        // Two small kernels rather than burn's reduction (whose shader lavapipe cannot compile).
        const PARTS: usize = 4096;
        let x = f32_contiguous(x);
        let parts = PARTS.min(x.shape().num_elements().max(1));
        let partial = empty_like(&x, [parts]);
        let (count, dim) = grid(&x, parts);
        sum_squares_partial_kernel::launch(&x.client, count, dim, arg(&x), arg(&partial));
        let out = empty_like(&x, [1]);
        let (count, dim) = grid(&x, 1);
        sum_kernel::launch(&x.client, count, dim, arg(&partial), arg(&out));
        out
    }

    fn fused_scale(x: CubeTensor, factor: f32) -> CubeTensor {
        B::float_mul_scalar(x, factor.into())
    }

    fn fused_adamw(
        param: CubeTensor,
        grad: CubeTensor,
        m: CubeTensor,
        v: CubeTensor,
        step: AdamWStep,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        let (param, grad, m, v) = (
            f32_contiguous(param),
            f32_contiguous(grad),
            f32_contiguous(m),
            f32_contiguous(v),
        );
        let shape = param.shape();
        let n = shape.num_elements();
        let (p_out, m_out, v_out) = (
            empty_like(&param, shape.clone()),
            empty_like(&param, shape.clone()),
            empty_like(&param, shape),
        );
        let (count, dim) = grid(&param, n);
        let AdamWStep {
            lr,
            beta1,
            beta2,
            epsilon,
            weight_decay,
            time,
        } = step;
        adamw_kernel::launch(
            &param.client,
            count,
            dim,
            arg(&param),
            arg(&grad),
            arg(&m),
            arg(&v),
            arg(&p_out),
            arg(&m_out),
            arg(&v_out),
            lr,
            beta1,
            beta2,
            epsilon,
            1.0 - lr * weight_decay,
            1.0 - beta1.powi(time),
            1.0 - beta2.powi(time),
        );
        (p_out, m_out, v_out)
    }
}
