//! Greedy decoding: the reference generation path the rollout pool's sampler is checked against.

use burn::tensor::{Int, Tensor, TensorData};

use super::{CausalLm, KvCache, Layout};
use crate::error::{GrailError, Result};

/// Appends `max_new_tokens` greedy (arg-max) tokens to `prompt`, with the KV cache
/// (`use_cache`, one prefill then one-token steps) or by re-running the whole sequence each step.
/// No end-of-sequence stop: exactly `max_new_tokens` tokens come back. A prompt plus budget
/// beyond the model's `max_position_embeddings` is an error.
pub fn greedy(
    model: &CausalLm,
    prompt: &[u32],
    max_new_tokens: usize,
    use_cache: bool,
) -> Result<Vec<u32>> {
    let need = prompt.len() + max_new_tokens;
    if need > model.config.max_position_embeddings {
        return Err(GrailError::Input(format!(
            "greedy: {} prompt tokens + {max_new_tokens} new tokens = {need} positions, more than \
             the model's max_position_embeddings {}",
            prompt.len(),
            model.config.max_position_embeddings
        )));
    }
    let mut out = Vec::with_capacity(max_new_tokens);
    if use_cache {
        let mut cache = [KvCache::new(model.config.num_hidden_layers)];
        let mut next = prompt.to_vec();
        for _ in 0..max_new_tokens {
            let logits = model.forward_cached(&[&next], &mut cache)?;
            let token = argmax_rows(logits)[0];
            out.push(token);
            next = vec![token];
        }
    } else {
        let mut seq = prompt.to_vec();
        for _ in 0..max_new_tokens {
            let len = seq.len();
            let ids: Vec<i64> = seq.iter().map(|&t| t as i64).collect();
            let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, len]), &model.device());
            let hidden = model.forward_hidden(ids, &Layout::Padded { lengths: vec![len] })?;
            let last = hidden
                .narrow(1, len - 1, 1)
                .reshape([1, model.config.hidden_size]);
            let token = argmax_rows(model.logits(last))[0];
            out.push(token);
            seq.push(token);
        }
    }
    Ok(out)
}

/// The arg-max column of each row of `[rows, vocab]` logits.
pub fn argmax_rows(logits: Tensor<2>) -> Vec<u32> {
    let rows = logits.dims()[0];
    let idx = logits.argmax(1).reshape([rows]).into_data();
    idx.iter::<i64>().map(|t| t as u32).collect()
}
