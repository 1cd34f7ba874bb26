//! The model shape the rollout tests share.

use grail_core::model::ModelConfig;

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
