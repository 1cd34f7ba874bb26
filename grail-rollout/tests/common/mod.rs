//! What the rollout tests share: the model shape and a generation with an in-flight update.
// Each test binary uses part of it.
#![allow(dead_code)]

use grail_core::model::{CausalLm, ModelConfig};
use grail_rollout::generate::{
    Generated, GenerationConfig, GenerationRequest, GenerationStats, Policy, generate_in_flight,
};

/// A two-layer model with a 64-token vocabulary (grouped-query attention, tied embeddings) that
/// accepts `max_positions` positions.
pub fn tiny_config(max_positions: usize) -> ModelConfig {
    ModelConfig::builder()
        .vocab_size(64)
        .hidden_size(32)
        .intermediate_size(64)
        .num_hidden_layers(2)
        .num_attention_heads(4)
        .num_key_value_heads(2)
        .max_position_embeddings(max_positions)
        .tie_word_embeddings(true)
        .build()
        .unwrap()
}

/// Generates `requests` with `old` as version 0 until `new` arrives as version 1, just before
/// forward call `switch_after + 1`; the completions in finishing order.
pub fn generate_switching(
    old: &CausalLm,
    new: &CausalLm,
    cfg: &GenerationConfig,
    requests: impl IntoIterator<Item = GenerationRequest>,
    switch_after: usize,
) -> (Vec<Generated>, GenerationStats) {
    let mut policy = Policy {
        model: old.clone(),
        version: 0,
    };
    let mut calls = 0;
    let mut out = Vec::new();
    let stats = generate_in_flight(
        &mut policy,
        cfg,
        None,
        requests,
        |p| {
            calls += 1;
            if calls == switch_after + 1 {
                *p = Policy {
                    model: new.clone(),
                    version: 1,
                };
                return Ok(true);
            }
            Ok(false)
        },
        |g| out.push(g),
    )
    .unwrap();
    (out, stats)
}
