//! Batched generation with continuous batching: up to `max_batch` sequences decode together;
//! one that finishes (EOS, a stop sequence, or `max_completion_length`) leaves its slot and the
//! next request takes it, prefilled in the same forward call as everyone else's decode step, so
//! the batch stays full. A prompt's samples share one prefill of it; on the fused CPU path every
//! sequence's keys and values live in one paged KV cache within a byte budget.
//!
//! [`generate_in_flight`] may also switch weights between two decode steps (PipelineRL-style
//! in-flight updates): every active sequence's KV cache is dropped and re-prefilled (prompt +
//! tokens so far) with the new weights, and each token records the policy version that sampled it.

use std::sync::Arc;

use crate::error::RolloutError;
use crate::sampling::SamplingConfig;
use crate::scheduler::Scheduler;
use grail_core::model::CausalLm;
use grail_protocol::PolicyVersion;

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

/// Why generation stops after `ids` (the completion so far), or `None` when it goes on: the one
/// rule the scheduler applies after each token and the trainer checks a worker's completions
/// against (an honest completion stops at its last token and not before).
pub fn finish_reason(
    ids: &[u32],
    cfg: &GenerationConfig,
    decode: Option<Decoder<'_>>,
) -> Option<FinishReason> {
    let last = *ids.last()?;
    if cfg.eos_token_ids.contains(&last) {
        Some(FinishReason::Eos)
    } else if cfg
        .stop_sequences
        .iter()
        .any(|s| !s.is_empty() && ids.ends_with(s))
        || stopped_by_string(ids, cfg, decode)
    {
        Some(FinishReason::Stop)
    } else if ids.len() >= cfg.max_completion_length {
        Some(FinishReason::Length)
    } else {
        None
    }
}

fn stopped_by_string(ids: &[u32], cfg: &GenerationConfig, decode: Option<Decoder<'_>>) -> bool {
    match decode {
        Some(decode) if !cfg.stop_strings.is_empty() => {
            let text = decode(ids);
            cfg.stop_strings
                .iter()
                .any(|s| !s.is_empty() && text.contains(s.as_str()))
        }
        _ => false,
    }
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
    /// The GRAIL proof's commitment to each completion token: the sketch of the last hidden
    /// state its logits came from (that of the token before it), with the coefficients of the
    /// version that sampled it. Empty unless [`GenerationConfig::sketch_seed`] is set.
    pub sketches: Vec<u32>,
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
    /// Memory for keys and values (vLLM's KV-cache budget), where the model runs the fused
    /// kernels (host memory on Flex, device memory on the GPU backends). Sequences wait for room
    /// rather than overcommit, and one that cannot grow is preempted and re-prefilled later.
    /// `None`: room for `max_batch` sequences of the longest prompt plus
    /// `max_completion_length`, so nothing waits.
    pub kv_cache_bytes: Option<usize>,
    /// Positions per KV-cache block.
    pub kv_block_size: usize,
    /// Share whole KV blocks between prompts that begin alike (vLLM's `enable_prefix_caching`:
    /// a system prompt or few-shot preamble is computed once while a sequence holds it). The
    /// samples of one prompt always share its prefill.
    pub enable_prefix_caching: bool,
    /// The seed a verifying trainer published: commit to every completion token
    /// ([`Generated::sketches`]) with the coefficients of this seed and the version that samples
    /// the token ([`SketchCoefficients::for_version`]); `None`: no sketches.
    ///
    /// [`SketchCoefficients::for_version`]: grail_protocol::proof::SketchCoefficients::for_version
    pub sketch_seed: Option<[u8; 32]>,
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
            kv_cache_bytes: None,
            kv_block_size: 16,
            enable_prefix_caching: true,
            sketch_seed: None,
        }
    }
}

/// Counters of one [`generate`] call.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenerationStats {
    /// Forward calls made.
    pub steps: usize,
    /// Prompt tokens computed (each distinct prompt once, however many samples it has, less the
    /// whole blocks it shares with a prompt that began alike).
    pub prefill_tokens: usize,
    /// Prompt tokens read from blocks another prefill had computed: a sample's prompt (all but
    /// the first sample of each prompt) and the leading whole blocks of a prompt that begins like
    /// one prefilled before it (a system prompt, a few-shot preamble).
    pub shared_prompt_tokens: usize,
    /// Completion tokens sampled.
    pub generated_tokens: usize,
    /// Mean number of sequences per forward call (batch occupancy; a prompt being prefilled
    /// counts as one).
    pub mean_batch: f64,
    /// Weight switches in the middle of the generation (in-flight updates).
    pub weight_switches: usize,
    /// Sequences stopped to free KV blocks for others, and re-prefilled later.
    pub preemptions: usize,
    /// Tokens re-prefilled after weight switches and preemptions.
    pub reprefill_tokens: usize,
    /// Blocks in the paged KV cache (0 where the model keeps one cache per sequence).
    pub kv_blocks: usize,
    /// Most blocks in use at once.
    pub kv_blocks_peak: usize,
}

/// The weights a generation samples with, and their version.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The model (no autodiff).
    pub model: CausalLm,
    /// Its policy version.
    pub version: PolicyVersion,
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
///
/// Requests with the same prompt share it: it is prefilled once and its samples read its keys
/// and values. Where the model reads a paged KV cache, memory stays within
/// [`GenerationConfig::kv_cache_bytes`]: a request waits for room, and a sequence that cannot
/// grow is preempted and re-prefilled later ([`GenerationStats::preemptions`]).
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
    cfg.sampling
        .validate()
        .map_err(|m| RolloutError::config("sampling", m, "invalid sampling parameter"))?;
    if cfg.max_batch == 0 || cfg.max_completion_length == 0 || cfg.kv_block_size == 0 {
        return Err(RolloutError::config(
            "max_batch / max_completion_length / kv_block_size",
            format!(
                "{} / {} / {}",
                cfg.max_batch, cfg.max_completion_length, cfg.kv_block_size
            ),
            "must be positive",
        ));
    }
    let mut scheduler = Scheduler::new(&policy.model, cfg, decode, requests.into_iter().collect())?;
    while scheduler.admit(policy.version, &mut on_done)? {
        if refresh(policy)? {
            scheduler.switch_weights();
        }
        scheduler.step(policy, &mut on_done)?;
    }
    Ok(scheduler.finish())
}
