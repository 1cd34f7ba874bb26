//! CPU optimizer kernels, chunk-parallel.

use burn::backend::Flex;
use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use rayon::prelude::*;

use super::{AdamWStep, OptimOps};
use crate::flex_io::{flex, host};

/// `Σ x²` in f64 (the global gradient norm's building block), one parallel pass.
pub fn sum_squares(x: &[f32]) -> f64 {
    x.par_chunks(16_384)
        .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
        .sum()
}

/// `x · factor`, one parallel pass.
pub fn scale(x: &[f32], factor: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(16_384)
        .zip(x.par_chunks(16_384))
        .for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, x)| *o = x * factor));
    out
}

/// One AdamW update in a single pass over `(param, grad, m, v)`; returns the new `(param, m, v)`.
/// Same arithmetic, in the same order, as burn's `AdamW`.
pub fn adamw(
    param: &[f32],
    grad: &[f32],
    m: &[f32],
    v: &[f32],
    s: AdamWStep,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = param.len();
    let (mut p_out, mut m_out, mut v_out) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    let c1 = 1.0 - s.beta1.powi(s.time);
    let c2 = 1.0 - s.beta2.powi(s.time);
    let decay = 1.0 - s.lr * s.weight_decay;
    const CHUNK: usize = 16_384;
    p_out
        .par_chunks_mut(CHUNK)
        .zip(m_out.par_chunks_mut(CHUNK))
        .zip(v_out.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(c, ((po, mo), vo))| {
            let at = c * CHUNK;
            for i in 0..po.len() {
                let (g, j) = (grad[at + i], at + i);
                mo[i] = m[j] * s.beta1 + g * (1.0 - s.beta1);
                vo[i] = v[j] * s.beta2 + g * g * (1.0 - s.beta2);
                let delta = (mo[i] / c1) / ((vo[i] / c2).sqrt() + s.epsilon);
                po[i] = param[j] * decay - delta * s.lr;
            }
        });
    (p_out, m_out, v_out)
}

impl OptimOps for Flex {
    fn fused_sum_squares(x: FlexTensor) -> FlexTensor {
        flex(vec![sum_squares(&host(&x)) as f32], [1])
    }

    fn fused_scale(x: FlexTensor, factor: f32) -> FlexTensor {
        flex(scale(&host(&x), factor), x.shape())
    }

    fn fused_adamw(
        param: FlexTensor,
        grad: FlexTensor,
        m: FlexTensor,
        v: FlexTensor,
        step: AdamWStep,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (p, m, v) = adamw(&host(&param), &host(&grad), &host(&m), &host(&v), step);
        let shape = param.shape();
        (
            flex(p, shape.clone()),
            flex(m, shape.clone()),
            flex(v, shape),
        )
    }
}
