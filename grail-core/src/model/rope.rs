//! Rotary position embedding (rotate-half, Hugging Face's variant) and the frequency scaling
//! Llama 3 checkpoints ship with.

use burn::tensor::{Device, Tensor};

/// How the RoPE frequencies are adjusted for contexts longer than the pretraining one
/// (`rope_parameters.rope_type` in `config.json`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// `"default"`: inverse frequency `theta^(-2i/d)` as is.
    None,
    /// `"llama3"` (Llama 3.1 and later): wavelengths longer than
    /// `original_max_position_embeddings / low_freq_factor` are stretched by `factor`, those
    /// shorter than `original_max_position_embeddings / high_freq_factor` are kept, and the band
    /// between is interpolated smoothly.
    Llama3 {
        /// How much the long wavelengths are stretched.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are fully scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are not scaled.
        high_freq_factor: f64,
        /// The context length the model was pretrained with.
        original_max_position_embeddings: usize,
    },
}

impl RopeScaling {
    /// The `rope_type` string of `config.json`.
    pub fn rope_type(&self) -> &'static str {
        match self {
            RopeScaling::None => "default",
            RopeScaling::Llama3 { .. } => "llama3",
        }
    }

    /// Rescales inverse frequencies in place. The arithmetic is f32, as transformers'
    /// `_compute_llama3_parameters` does it on its f32 `inv_freq`, so the angles agree to the bit
    /// pattern rather than to a rounding.
    fn apply(&self, inv_freq: &mut [f32]) {
        let RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } = *self
        else {
            return;
        };
        let (factor, low, high) = (
            factor as f32,
            low_freq_factor as f32,
            high_freq_factor as f32,
        );
        let original = original_max_position_embeddings as f32;
        let (low_freq_wavelen, high_freq_wavelen) = (original / low, original / high);
        for f in inv_freq {
            let wavelen = 2.0 * std::f32::consts::PI / *f;
            if wavelen > low_freq_wavelen {
                *f /= factor;
            } else if wavelen >= high_freq_wavelen {
                let smooth = (original / wavelen - low) / (high - low);
                *f = (1.0 - smooth) * *f / factor + smooth * *f;
            }
        }
    }
}

/// Rotate-half rotary position embedding, Hugging Face's variant: channel `i` of the first half
/// pairs with channel `i + d/2`, with inverse frequency `theta^(-2i/d)` (rescaled by the
/// checkpoint's [`RopeScaling`]).
///
/// The inverse frequencies and the cos/sin values are computed on the host in f32 from
/// `rope_theta`, for the exact positions of a call, whatever dtype the checkpoint stores its
/// weights in: transformers' `from_pretrained` keeps its `inv_freq` buffer in f32 for f32, bf16
/// and f16 loads alike, and rounding the frequencies to bf16 shifts the angles by up to ~3e-3
/// relative, an error that grows with position. The CPU and Cube kernels and generation all take
/// these tables, so this is the one place frequencies are made.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    /// f32 frequencies for heads of width `head_dim` (even) with base `theta`, rescaled by
    /// `scaling`.
    pub fn new(head_dim: usize, theta: f64, scaling: RopeScaling) -> Self {
        let theta = theta as f32;
        let mut inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        scaling.apply(&mut inv_freq);
        Self { inv_freq }
    }

    /// The inverse frequency of each channel pair, `[head_dim / 2]`.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// `(cos, sin)`, each `[rows, 1, cols, head_dim]`, for positions `[rows][cols]` (row-major).
    pub fn tables(
        &self,
        positions: &[usize],
        rows: usize,
        device: &Device,
    ) -> (Tensor<4>, Tensor<4>) {
        let half = self.inv_freq.len();
        let dim = 2 * half;
        let cols = positions.len() / rows.max(1);
        let mut cos = Vec::with_capacity(positions.len() * dim);
        let mut sin = Vec::with_capacity(positions.len() * dim);
        for &p in positions {
            let start = cos.len();
            for &f in &self.inv_freq {
                let angle = f * p as f32;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
            // Both halves of a head use the same angles.
            cos.extend_from_within(start..start + half);
            sin.extend_from_within(start..start + half);
        }
        let make = |v: Vec<f32>| {
            Tensor::<4>::from_data(
                burn::tensor::TensorData::new(v, [rows, 1, cols, dim]),
                device,
            )
        };
        (make(cos), make(sin))
    }

    /// Applies the rotation to `x` `[rows, heads, cols, head_dim]`.
    pub fn apply(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
        let [_, _, _, dim] = x.dims();
        let half = dim / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos.clone() + rotated * sin.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama 3.1's published scaling (factor 8, 1/4, original 8192) on a 128-wide head: the
    /// highest frequencies are kept, the lowest divided by 8, the band between interpolated.
    #[test]
    fn llama3_scaling_keeps_high_stretches_low_and_blends_between() {
        let plain = Rope::new(128, 500_000.0, RopeScaling::None);
        let scaled = Rope::new(
            128,
            500_000.0,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
        );
        let (mut kept, mut stretched, mut blended) = (0, 0, 0);
        for (&p, &s) in plain.inv_freq().iter().zip(scaled.inv_freq()) {
            let wavelen = 2.0 * std::f32::consts::PI / p;
            if wavelen < 8192.0 / 4.0 {
                assert_eq!(s, p);
                kept += 1;
            } else if wavelen > 8192.0 {
                assert_eq!(s, p / 8.0);
                stretched += 1;
            } else {
                assert!(s < p && s > p / 8.0, "{p} -> {s}");
                blended += 1;
            }
        }
        assert!(kept > 0 && stretched > 0 && blended > 0);
    }
}
