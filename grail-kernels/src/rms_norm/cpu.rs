//! CPU RMSNorm kernels, row-parallel.

use burn::backend::Flex;
use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use rayon::prelude::*;

use super::RmsNormOps;
use crate::cpu_gemm::dot;
use crate::cpu_math::rows_per_task;
use crate::flex_io::{flex, host};

/// RMSNorm over the last axis of `x` `[rows, cols]`: `y = x · r · w` with
/// `r = 1 / sqrt(mean(x²) + eps)`. Returns `y` and `r` `[rows]` (all backward keeps).
pub fn rms_norm_forward(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let cols = w.len();
    let rows = x.len() / cols;
    let mut y = vec![0f32; x.len()];
    let mut r = vec![0f32; rows];
    let step = rows_per_task(cols);
    y.par_chunks_mut(step * cols)
        .zip(r.par_chunks_mut(step))
        .zip(x.par_chunks(step * cols))
        .for_each(|((y, r), x)| {
            for ((y, r), x) in y.chunks_mut(cols).zip(r.iter_mut()).zip(x.chunks(cols)) {
                let ms = dot(x, x) / cols as f32;
                *r = 1.0 / (ms + eps).sqrt();
                for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * *r * w;
                }
            }
        });
    (y, r)
}

/// Gradients `(dx, dw)` of [`rms_norm_forward`].
pub fn rms_norm_backward(x: &[f32], w: &[f32], r: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let cols = w.len();
    let step = rows_per_task(cols);
    let mut dx = vec![0f32; x.len()];
    let dw_parts: Vec<Vec<f32>> = dx
        .par_chunks_mut(step * cols)
        .zip(x.par_chunks(step * cols))
        .zip(dy.par_chunks(step * cols))
        .zip(r.par_chunks(step))
        .map(|(((dx, x), dy), r)| {
            let mut dw = vec![0f32; cols];
            for (((dx, x), dy), &r) in dx
                .chunks_mut(cols)
                .zip(x.chunks(cols))
                .zip(dy.chunks(cols))
                .zip(r)
            {
                // g = dy ⊙ w; dx = r (g − x r² mean(g ⊙ x)).
                let mut gx = 0f32;
                for c in 0..cols {
                    gx += dy[c] * w[c] * x[c];
                    dw[c] += dy[c] * x[c] * r;
                }
                let k = r * r * gx / cols as f32;
                for c in 0..cols {
                    dx[c] = r * (dy[c] * w[c] - x[c] * k);
                }
            }
            dw
        })
        .collect();
    let mut dw = vec![0f32; cols];
    for part in dw_parts {
        for (a, b) in dw.iter_mut().zip(part) {
            *a += b;
        }
    }
    (dx, dw)
}

impl RmsNormOps for Flex {
    fn fused_rms_norm_forward(x: FlexTensor, w: FlexTensor, eps: f32) -> (FlexTensor, FlexTensor) {
        let (y, r) = rms_norm_forward(&host(&x), &host(&w), eps);
        let rows = r.len();
        (flex(y, x.shape()), flex(r, [rows]))
    }

    fn fused_rms_norm_backward(
        x: FlexTensor,
        w: FlexTensor,
        r: FlexTensor,
        dy: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let (dx, dw) = rms_norm_backward(&host(&x), &host(&w), &host(&r), &host(&dy));
        (flex(dx, x.shape()), flex(dw, w.shape()))
    }
}
