//! Supervised warm-up: cross-entropy on completion tokens, through the same packing and fused
//! chunked log-probs as GRPO, so a model trained from scratch can learn the answer format before
//! RL (what researchers do before GRPO).

use std::time::Instant;

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Tensor, TensorData};
use grail_core::model::CausalLm;
use grail_kernels::{gradient_surrogate, selective_logprobs_backward, selective_logprobs_forward};

use crate::batch::{Batch, Sequence};
use crate::error::{Result, TrainerError};
use crate::trainer::GrpoTrainer;

/// One supervised example: prompt tokens and the completion to learn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftExample {
    /// Prompt token ids (not trained on).
    pub prompt: Vec<u32>,
    /// Completion token ids (the targets).
    pub completion: Vec<u32>,
}

/// What one supervised step measured.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct SftMetrics {
    /// Mean negative log-likelihood per completion token (before the update).
    pub loss: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Completion tokens.
    pub tokens: usize,
    /// Wall time.
    pub seconds: f64,
}

impl GrpoTrainer {
    /// One supervised optimizer step at learning rate `lr` (token-mean cross-entropy over every
    /// completion token of the batch, micro-batched within the token budget). Does not advance the
    /// GRPO step counter or the policy version.
    pub fn sft_step(&mut self, examples: &[SftExample], lr: f64) -> Result<SftMetrics> {
        let start = Instant::now();
        if examples.is_empty() {
            return Err(TrainerError::Input("no SFT examples".into()));
        }
        let model = self.model();
        let vocab = model.vocab_size();
        let sequences = examples
            .iter()
            .enumerate()
            .map(|(i, e)| {
                Sequence::new(&e.prompt, &e.completion, vocab, || {
                    format!("SFT example {i}")
                })
            })
            .collect::<Result<_>>()?;
        let batch = Batch::new(sequences, self.config())?;
        let total = batch.completion_tokens();
        let chunks = self.config().logprob_chunks;
        let mut accum = GradientsAccumulator::<CausalLm>::new();
        let mut nll = 0.0f64;
        for mb in batch.assemble(&model.device()) {
            let hidden = mb.prediction_hidden(model)?;
            let weight = model.lm_head_weight();
            let (h, w) = (
                hidden.clone().without_autodiff(),
                weight.clone().without_autodiff(),
            );
            let targets = mb.targets.clone().without_autodiff();
            let n = targets.dims()[0];
            let fwd = selective_logprobs_forward(&h, &w, &targets, 1.0, chunks, false);
            nll -= fwd.logp.clone().sum().into_scalar::<f64>();
            let grad = Tensor::<1>::from_data(
                TensorData::new(vec![-1.0f32 / total as f32; n], [n]),
                &h.device(),
            );
            let (gh, gw) =
                selective_logprobs_backward(&h, &w, &targets, &fwd.lse, &grad, 1.0, chunks);
            let grads = gradient_surrogate(hidden, weight, gh, gw).backward();
            accum.accumulate(model, GradientsParams::from_grads(grads, model));
        }
        let grad_norm = self.update(lr, accum.grads());
        Ok(SftMetrics {
            loss: nll / total as f64,
            grad_norm,
            tokens: total,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}
