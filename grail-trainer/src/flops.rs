//! FLOP accounting and model-FLOPs utilisation (MFU).
//!
//! Counted: the matmul FLOPs a training step needs (2 per multiply-add), from the config and the
//! real token counts. Per sequence of `L` tokens with `C` completion tokens, forward:
//! - projections and MLP: `2 · L · P_layers`, where `P_layers` counts the q/k/v/o and MLP weights;
//! - attention scores and values: `2 · 2 · heads · head_dim · L(L+1)/2` per layer (causal: only
//!   the lower triangle is needed; this is the Σ lenᵢ² term);
//! - lm_head: `2 · C · hidden · vocab` (only completion positions need logits).
//!
//! Backward costs twice the forward; the fused log-prob recomputation and anything the backend
//! does beyond that is overhead and not counted, as in the usual MFU definition.

use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use grail_core::model::ModelConfig;

/// Forward matmul FLOPs for sequences of total lengths `lens` with `completion` tokens each.
pub fn forward_flops(config: &ModelConfig, lens: &[usize], completion: &[usize]) -> f64 {
    let c = config;
    let q = (c.num_attention_heads * c.head_dim) as f64;
    let kv = (c.num_key_value_heads * c.head_dim) as f64;
    let h = c.hidden_size as f64;
    let per_token_layer =
        2.0 * (h * q + 2.0 * h * kv + q * h + 3.0 * h * c.intermediate_size as f64);
    let layers = c.num_hidden_layers as f64;
    let mut flops = 0.0;
    for &l in lens {
        let l = l as f64;
        flops += layers * (l * per_token_layer + 4.0 * q * l * (l + 1.0) / 2.0);
    }
    let completion: usize = completion.iter().sum();
    flops + 2.0 * completion as f64 * h * c.vocab_size as f64
}

/// Forward + backward FLOPs of one training pass.
pub fn train_flops(config: &ModelConfig, lens: &[usize], completion: &[usize]) -> f64 {
    3.0 * forward_flops(config, lens, completion)
}

/// Measures the device's dense f32 matmul throughput (FLOP/s): the best of several square
/// matmuls of sizes up to `max_n` (the largest rate wins; sizes 512, 1024, ... `max_n`), through
/// burn's matmul and, where the backend has it, the fused linear kernel the model trains with
/// (whichever is faster is the peak: MFU must never exceed 100%).
pub fn measure_peak_flops(device: &Device, max_n: usize) -> f64 {
    let kernel = grail_kernels::supported(device);
    let mut best_rate: f64 = 0.0;
    let mut n = 512.min(max_n);
    while n <= max_n {
        let a = Tensor::<2>::random([n, n], Distribution::Uniform(-1.0, 1.0), device);
        let b = Tensor::<2>::random([n, n], Distribution::Uniform(-1.0, 1.0), device);
        let products: [&dyn Fn() -> Tensor<2>; 2] = [&|| a.clone().matmul(b.clone()), &|| {
            grail_kernels::linear(a.clone(), b.clone())
        }];
        for product in products.iter().take(if kernel { 2 } else { 1 }) {
            let _ = product().sum().into_scalar::<f32>(); // warm-up
            for _ in 0..5 {
                let t = Instant::now();
                // Reading one element forces the computation without timing a reduction.
                let _ = product().slice([0..1, 0..1]).into_scalar::<f32>();
                best_rate = best_rate.max(2.0 * (n as f64).powi(3) / t.elapsed().as_secs_f64());
            }
        }
        n *= 2;
    }
    best_rate
}
