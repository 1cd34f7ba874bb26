//! Batched generation with per-sequence KV caches and continuous batching: up to `max_batch`
//! sequences decode together; one that finishes (EOS, a stop sequence, or
//! `max_completion_length`) leaves its slot and the next request is prefilled into it in the same
//! forward call as everyone else's decode step, so the batch stays full.
//!
//! [`generate_in_flight`] may also switch weights between two decode steps (PipelineRL-style
//! in-flight updates): every active sequence's KV cache is dropped and re-prefilled (prompt +
//! tokens so far) with the new weights, and each token records the policy version that sampled it.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::error::RolloutError;
use grail_core::model::{CausalLm, KvCache};
use grail_protocol::PolicyVersion;
use rand::rngs::StdRng;

use crate::sampling::{SamplingConfig, sample_rng, sample_token};

/// One completion to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationRequest {
    /// The prompt this completes (seeds the sample's RNG with `sample_index`).
    pub prompt_id: u64,
    /// Which of the prompt's `num_generations` samples this is.
    pub sample_index: usize,
    /// Prompt token ids.
    pub prompt: Arc<Vec<u32>>,
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum FinishReason {
    /// An end-of-sequence token was sampled (it is part of the completion).
    Eos,
    /// A stop sequence was generated (it is part of the completion).
    Stop,
    /// `max_completion_length` tokens were generated.
    Length,
}

/// A finished completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The request it answers.
    pub request: GenerationRequest,
    /// Completion token ids.
    pub ids: Vec<u32>,
    /// Behaviour log-prob of each completion token.
    pub logps: Vec<f32>,
    /// Policy version that sampled each completion token.
    pub versions: Vec<PolicyVersion>,
    /// Why it ended.
    pub finish: FinishReason,
}

/// Generation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// How tokens are drawn.
    pub sampling: SamplingConfig,
    /// Completion budget in tokens.
    pub max_completion_length: usize,
    /// Sequences decoded together.
    pub max_batch: usize,
    /// Tokens that end a completion.
    pub eos_token_ids: Vec<u32>,
    /// Token sequences that end a completion.
    pub stop_sequences: Vec<Vec<u32>>,
    /// Strings that end a completion once its decoded text contains one (needs a decoder: see
    /// [`generate_with_decoder`]).
    pub stop_strings: Vec<String>,
    /// Run seed; each sample's RNG derives from it, its prompt id and its index.
    pub seed: u64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            sampling: SamplingConfig::default(),
            max_completion_length: 256,
            max_batch: 16,
            eos_token_ids: Vec::new(),
            stop_sequences: Vec::new(),
            stop_strings: Vec::new(),
            seed: 0,
        }
    }
}

/// Counters of one [`generate`] call.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenerationStats {
    /// Forward calls made.
    pub steps: usize,
    /// Prompt tokens prefilled.
    pub prefill_tokens: usize,
    /// Completion tokens sampled.
    pub generated_tokens: usize,
    /// Mean number of sequences per forward call (batch occupancy).
    pub mean_batch: f64,
    /// Weight switches in the middle of the generation (in-flight updates).
    pub weight_switches: usize,
    /// Tokens re-prefilled after those switches.
    pub reprefill_tokens: usize,
}

/// The weights a generation samples with, and their version.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The model (no autodiff).
    pub model: CausalLm,
    /// Its policy version.
    pub version: PolicyVersion,
}

struct Active {
    request: GenerationRequest,
    cache: KvCache,
    pending: Vec<u32>,
    ids: Vec<u32>,
    logps: Vec<f32>,
    versions: Vec<PolicyVersion>,
    rng: StdRng,
}

/// Generates every request, calling `on_done` as each completion finishes (in finishing order).
pub fn generate(
    model: &CausalLm,
    cfg: &GenerationConfig,
    requests: impl IntoIterator<Item = GenerationRequest>,
    on_done: impl FnMut(Generated),
) -> Result<GenerationStats, RolloutError> {
    generate_with_decoder(model, cfg, None, requests, on_done)
}

/// Turns completion tokens into text (for stop strings).
pub type Decoder<'a> = &'a (dyn Fn(&[u32]) -> String + Sync);

/// [`generate`] with a token decoder, which `stop_strings` need.
pub fn generate_with_decoder(
    model: &CausalLm,
    cfg: &GenerationConfig,
    decode: Option<Decoder<'_>>,
    requests: impl IntoIterator<Item = GenerationRequest>,
    on_done: impl FnMut(Generated),
) -> Result<GenerationStats, RolloutError> {
    let mut policy = Policy {
        model: model.clone(),
        version: 0,
    };
    generate_in_flight(&mut policy, cfg, decode, requests, |_| Ok(false), on_done)
}

/// Generation that may switch weights mid-completion. Before every forward call `refresh` may
/// replace `policy` (returning `true`); then every active sequence's KV cache is recomputed with
/// the new weights before it samples its next token, so a continuation equals a fresh prefill of
/// prompt + tokens so far under the new weights. Tokens record the version that sampled them.
pub fn generate_in_flight(
    policy: &mut Policy,
    cfg: &GenerationConfig,
    decode: Option<Decoder<'_>>,
    requests: impl IntoIterator<Item = GenerationRequest>,
    mut refresh: impl FnMut(&mut Policy) -> Result<bool, RolloutError>,
    mut on_done: impl FnMut(Generated),
) -> Result<GenerationStats, RolloutError> {
    if !cfg.stop_strings.is_empty() && decode.is_none() {
        return Err(RolloutError::config(
            "stop_strings",
            format!("{:?}", cfg.stop_strings),
            "stop strings need a decoder (generate_with_decoder)",
        ));
    }
    let stopped_by_string = |ids: &[u32]| match decode {
        Some(decode) if !cfg.stop_strings.is_empty() => {
            let text = decode(ids);
            cfg.stop_strings
                .iter()
                .any(|s| !s.is_empty() && text.contains(s.as_str()))
        }
        _ => false,
    };
    cfg.sampling
        .validate()
        .map_err(|m| RolloutError::config("sampling", m, "invalid sampling parameter"))?;
    if cfg.max_batch == 0 || cfg.max_completion_length == 0 {
        return Err(RolloutError::config(
            "max_batch / max_completion_length",
            format!("{} / {}", cfg.max_batch, cfg.max_completion_length),
            "must be positive",
        ));
    }
    let layers = policy.model.config.num_hidden_layers;
    let mut queue: VecDeque<GenerationRequest> = requests.into_iter().collect();
    let mut slots: Vec<Option<Active>> = (0..cfg.max_batch).map(|_| None).collect();
    let mut stats = GenerationStats::default();
    let mut occupancy = 0usize;
    loop {
        for slot in slots.iter_mut().filter(|s| s.is_none()) {
            let Some(request) = queue.pop_front() else {
                break;
            };
            if request.prompt.is_empty() {
                return Err(RolloutError::prompt(request.prompt_id, "empty"));
            }
            stats.prefill_tokens += request.prompt.len();
            *slot = Some(Active {
                rng: sample_rng(cfg.seed, request.prompt_id, request.sample_index),
                pending: request.prompt.to_vec(),
                cache: KvCache::new(layers),
                ids: Vec::new(),
                logps: Vec::new(),
                versions: Vec::new(),
                request,
            });
        }
        let active: Vec<usize> = (0..slots.len()).filter(|&i| slots[i].is_some()).collect();
        if active.is_empty() {
            break;
        }
        if refresh(policy)? {
            stats.weight_switches += 1;
            for &i in &active {
                let a = slots[i].as_mut().expect("active");
                if a.ids.is_empty() {
                    continue; // not prefilled yet: its pending prompt goes in as is
                }
                a.cache = KvCache::new(layers);
                a.pending = a.request.prompt.iter().chain(&a.ids).copied().collect();
                stats.reprefill_tokens += a.pending.len();
            }
        }
        let mut caches: Vec<KvCache> = active
            .iter()
            .map(|&i| std::mem::take(&mut slots[i].as_mut().expect("active").cache))
            .collect();
        let inputs: Vec<Vec<u32>> = active
            .iter()
            .map(|&i| std::mem::take(&mut slots[i].as_mut().expect("active").pending))
            .collect();
        let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
        let logits = policy.model.forward_cached(&refs, &mut caches)?;
        let vocab = logits.dims()[1];
        let logits: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .expect("f32 logits");
        stats.steps += 1;
        occupancy += active.len();
        for (k, (&i, cache)) in active.iter().zip(caches).enumerate() {
            let a = slots[i].as_mut().expect("active");
            a.cache = cache;
            let row = &logits[k * vocab..(k + 1) * vocab];
            let (token, logp) = sample_token(row, &a.ids, &cfg.sampling, &mut a.rng);
            a.ids.push(token);
            a.logps.push(logp);
            a.versions.push(policy.version);
            stats.generated_tokens += 1;
            let finish = if cfg.eos_token_ids.contains(&token) {
                Some(FinishReason::Eos)
            } else if cfg
                .stop_sequences
                .iter()
                .any(|s| !s.is_empty() && a.ids.ends_with(s))
                || stopped_by_string(&a.ids)
            {
                Some(FinishReason::Stop)
            } else if a.ids.len() >= cfg.max_completion_length {
                Some(FinishReason::Length)
            } else {
                None
            };
            match finish {
                Some(finish) => {
                    let a = slots[i].take().expect("active");
                    on_done(Generated {
                        request: a.request,
                        ids: a.ids,
                        logps: a.logps,
                        versions: a.versions,
                        finish,
                    });
                }
                None => a.pending = vec![token],
            }
        }
    }
    stats.mean_batch = occupancy as f64 / stats.steps.max(1) as f64;
    Ok(stats)
}
