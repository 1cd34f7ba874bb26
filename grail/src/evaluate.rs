//! Held-out accuracy, and the prompt limits and generation settings it shares with the pool.

use anyhow::{Context, Result, bail};
use burn::module::Module;
use grail_core::model::CausalLm;
use grail_rollout::generate::{FinishReason, GenerationConfig, GenerationRequest, generate};
use grail_rollout::sampling::SamplingConfig;
use grail_rollout::{Completion, Environment, Prompt, PromptLimits};

use crate::config::GrpoConfig;

/// The prompt limits of a run on `model`.
pub(crate) fn prompt_limits(cfg: &GrpoConfig, model: &CausalLm) -> PromptLimits {
    PromptLimits {
        max_prompt_length: Some(cfg.grpo.max_prompt_length),
        truncation: cfg.grpo.prompt_truncation,
        max_completion_length: cfg.grpo.max_completion_length,
        max_positions: model.config.max_position_embeddings,
    }
}

/// Prompt `index` of `env` within `limits`; `None` past the end; an error naming the prompt.
pub(crate) fn prompt_at(
    env: &dyn Environment,
    index: u64,
    limits: &PromptLimits,
) -> Result<Option<Prompt>> {
    let prompt = env
        .prompt(index)
        .with_context(|| format!("the environment failed on prompt {index}"))?;
    Ok(match prompt {
        Some(p) => Some(limits.apply(p)?.0),
        None => None,
    })
}

/// Generation settings of the run (the pool's sampling; evaluation makes them greedy).
pub(crate) fn generation_config(cfg: &GrpoConfig, eos: &[u32]) -> GenerationConfig {
    GenerationConfig {
        sampling: SamplingConfig {
            temperature: cfg.grpo.temperature,
            top_p: cfg.grpo.top_p,
            top_k: cfg.grpo.top_k,
            min_p: cfg.grpo.min_p,
            repetition_penalty: 1.0,
        },
        max_completion_length: cfg.grpo.max_completion_length,
        max_batch: 64,
        eos_token_ids: eos.to_vec(),
        stop_sequences: Vec::new(),
        stop_strings: Vec::new(),
        seed: cfg.seed,
        kv_cache_bytes: cfg.grpo.kv_cache_bytes,
        ..GenerationConfig::default()
    }
}

/// Held-out accuracy: greedy completions of the first `n` held-out prompts (within `limits`),
/// scored by the environment's `correct` reward (or its last reward).
pub fn evaluate(
    model: &CausalLm,
    env: &dyn Environment,
    n: usize,
    generation: &GenerationConfig,
    limits: &PromptLimits,
) -> Result<f64> {
    let mut prompts = Vec::with_capacity(n);
    for i in 0..n as u64 {
        match prompt_at(env, i, limits)? {
            Some(p) => prompts.push(p),
            None => break,
        }
    }
    if prompts.is_empty() {
        bail!("the held-out split has no prompts");
    }
    let correct_idx = env
        .rewards()
        .iter()
        .position(|r| r.name == "correct")
        .unwrap_or(env.rewards().len() - 1);
    let cfg = GenerationConfig {
        sampling: SamplingConfig {
            temperature: 0.0,
            ..SamplingConfig::default()
        },
        ..generation.clone()
    };
    let requests = prompts.iter().map(|p| GenerationRequest {
        prompt_id: p.id,
        sample_index: 0,
        prompt: p.ids.clone(),
    });
    let mut score = 0.0;
    generate(model, &cfg, requests, |g| {
        let p = &prompts[g.request.prompt_id as usize];
        let c = Completion {
            text: env.decode(&g.ids),
            finished: g.finish != FinishReason::Length,
            ids: g.ids,
        };
        score += (env.rewards()[correct_idx].func)(p, &c) as f64;
    })?;
    Ok(score / prompts.len() as f64)
}

/// The held-out evaluation of a run: its environment, how many prompts, how to generate.
pub(crate) struct HeldOut<'a> {
    pub env: &'a dyn Environment,
    pub prompts: usize,
    pub generation: &'a GenerationConfig,
}

impl HeldOut<'_> {
    /// Held-out accuracy of `model` (evaluated without autodiff).
    pub fn accuracy(&self, model: &CausalLm, limits: &PromptLimits) -> Result<f64> {
        evaluate(
            &model.valid(),
            self.env,
            self.prompts,
            self.generation,
            limits,
        )
    }
}
