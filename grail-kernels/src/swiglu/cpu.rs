//! CPU SwiGLU kernels, chunk-parallel, with an AVX2 build of the inner loop where the CPU has it.

use burn::backend::Flex;
use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use rayon::prelude::*;

use super::SwiGluOps;
use crate::cpu_math::{exp_approx, has_avx2};
use crate::flex_io::{flex, host};

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_approx(-x))
}

#[inline(always)]
fn swiglu_forward_chunk(o: &mut [f32], g: &[f32], u: &[f32]) {
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = g * sigmoid(g) * u;
    }
}

#[inline(always)]
fn swiglu_backward_chunk(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], d: &[f32]) {
    for i in 0..g
        .len()
        .min(dg.len())
        .min(du.len())
        .min(u.len())
        .min(d.len())
    {
        let s = sigmoid(g[i]);
        du[i] = d[i] * g[i] * s;
        dg[i] = d[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn swiglu_forward_avx2(o: &mut [f32], g: &[f32], u: &[f32]) {
    swiglu_forward_chunk(o, g, u)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn swiglu_backward_avx2(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], d: &[f32]) {
    swiglu_backward_chunk(dg, du, g, u, d)
}

/// SwiGLU: `silu(gate) · up`, element-wise.
pub fn swiglu_forward(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; gate.len()];
    let avx2 = has_avx2();
    out.par_chunks_mut(16_384)
        .zip(gate.par_chunks(16_384))
        .zip(up.par_chunks(16_384))
        .for_each(|((o, g), u)| {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU has the features the function was compiled for.
                unsafe { swiglu_forward_avx2(o, g, u) };
                return;
            }
            let _ = avx2;
            swiglu_forward_chunk(o, g, u)
        });
    out
}

/// Gradients `(dgate, dup)` of [`swiglu_forward`], recomputed from the inputs (the product is not
/// stored).
pub fn swiglu_backward(gate: &[f32], up: &[f32], dout: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = vec![0f32; gate.len()];
    let mut du = vec![0f32; gate.len()];
    let avx2 = has_avx2();
    dg.par_chunks_mut(16_384)
        .zip(du.par_chunks_mut(16_384))
        .zip(gate.par_chunks(16_384))
        .zip(up.par_chunks(16_384).zip(dout.par_chunks(16_384)))
        .for_each(|(((dg, du), g), (u, d))| {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: as above.
                unsafe { swiglu_backward_avx2(dg, du, g, u, d) };
                return;
            }
            let _ = avx2;
            swiglu_backward_chunk(dg, du, g, u, d)
        });
    (dg, du)
}

impl SwiGluOps for Flex {
    fn fused_swiglu_forward(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
        flex(swiglu_forward(&host(&gate), &host(&up)), gate.shape())
    }

    fn fused_swiglu_backward(
        gate: FlexTensor,
        up: FlexTensor,
        dout: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let (dg, du) = swiglu_backward(&host(&gate), &host(&up), &host(&dout));
        (flex(dg, gate.shape()), flex(du, up.shape()))
    }
}
