//! The CPU RoPE kernel, token-parallel.

use burn::backend::Flex;
use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use rayon::prelude::*;

use super::RopeOps;
use crate::flex_io::{flex, host};

/// Rotate-half RoPE of `x` `[tokens, heads, d]` with per-token tables `cos`/`sin` `[tokens, d]`
/// (Hugging Face layout: both halves of a table row hold the same frequencies). With
/// `inverse = true` it applies the transposed rotation, which is the backward of the forward.
pub fn rope(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    heads: usize,
    d: usize,
    inverse: bool,
) -> Vec<f32> {
    let half = d / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(heads * d)
        .zip(x.par_chunks(heads * d))
        .zip(cos.par_chunks(d).zip(sin.par_chunks(d)))
        .for_each(|((o, x), (c, s))| {
            for h in 0..heads {
                let (x, o) = (&x[h * d..(h + 1) * d], &mut o[h * d..(h + 1) * d]);
                for i in 0..half {
                    let (x1, x2) = (x[i], x[i + half]);
                    o[i] = x1 * c[i] - sign * x2 * s[i];
                    o[i + half] = x2 * c[i + half] + sign * x1 * s[i + half];
                }
            }
        });
    out
}

impl RopeOps for Flex {
    fn fused_rope_forward(
        x: FlexTensor,
        cos: FlexTensor,
        sin: FlexTensor,
        inverse: bool,
    ) -> FlexTensor {
        let shape = x.shape();
        let out = rope(
            &host(&x),
            &host(&cos),
            &host(&sin),
            shape[1],
            shape[2],
            inverse,
        );
        flex(out, shape)
    }
}
