//! Token sampling: temperature, top-k, top-p, min-p and an optional repetition penalty, seeded
//! per sample so every completion is reproducible on its own.
//!
//! Every sampled token carries its **behaviour log-prob**: `log softmax(logits / T)[token]` over the
//! full vocabulary, never renormalised after top-k/top-p/min-p truncation. That is the quantity the
//! trainer recomputes (`grail_kernels::selective_logprobs`), so the two agree up to float error,
//! and importance ratios between them measure policy change rather than the sampler's truncation. The same holds
//! for the repetition penalty: it changes what is drawn, not the recorded log-prob. (A renormalised
//! log-prob would put every ratio of a truncated distribution above 1 by construction; see
//! `grail_trainer::off_policy`.)

use std::borrow::Cow;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Sampling parameters (TRL / vLLM names).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingConfig {
    /// Softmax temperature; 0 means greedy (arg-max).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1 = off).
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p ×` the top probability (0 = off).
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of already generated tokens (1 = off).
    pub repetition_penalty: f32,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
        }
    }
}

impl SamplingConfig {
    /// Checks ranges, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature = {}: must be ≥ 0", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p = {}: must be in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p = {}: must be in [0, 1]", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repetition_penalty = {}: must be positive",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// The RNG of one sample: a stream derived from the run seed, the prompt and the sample index.
pub fn sample_rng(seed: u64, prompt_id: u64, sample_index: usize) -> StdRng {
    let mix = seed
        ^ prompt_id.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (sample_index as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    StdRng::seed_from_u64(mix)
}

/// `log softmax(logits / temperature)` of one row (temperature 0 is treated as 1).
pub fn log_softmax(logits: &[f32], temperature: f32) -> Vec<f32> {
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let scaled: Vec<f32> = logits.iter().map(|&x| x / t).collect();
    let max = scaled.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + scaled.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
    scaled.into_iter().map(|x| x - lse).collect()
}

/// The tokens the sampler may draw from (after top-k, top-p, min-p), most likely first, with
/// their full-distribution log-probs.
pub fn candidate_set(logprobs: &[f32], cfg: &SamplingConfig) -> Vec<(u32, f32)> {
    // Most likely first, ties by id: a total order, so the set is the same however it is reached.
    let likelier = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut order: Vec<(u32, f32)> = logprobs
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    // min-p and top-k keep a prefix of the sorted vocabulary, so they can cut it in linear time
    // first; only what survives is sorted (a full sort per token costs more than the model's
    // decode step at a 150k vocabulary).
    if cfg.min_p > 0.0 {
        let floor = logprobs.iter().copied().fold(f32::NEG_INFINITY, f32::max) + cfg.min_p.ln();
        order.retain(|&(_, l)| l >= floor);
    }
    if cfg.top_k > 0 && cfg.top_k < order.len() {
        order.select_nth_unstable_by(cfg.top_k - 1, likelier);
        order.truncate(cfg.top_k);
    }
    order.sort_by(likelier);
    if cfg.top_p < 1.0 {
        let mut mass = 0.0f32;
        let keep = order
            .iter()
            .position(|&(_, l)| {
                mass += l.exp();
                mass >= cfg.top_p
            })
            .map_or(order.len(), |i| i + 1);
        order.truncate(keep);
    }
    order
}

/// Whether top-k, top-p or min-p would drop any token.
pub(crate) fn truncates(cfg: &SamplingConfig, vocab: usize) -> bool {
    (cfg.top_k > 0 && cfg.top_k < vocab) || cfg.top_p < 1.0 || cfg.min_p > 0.0
}

/// `logits` with the repetition penalty applied to the `generated` tokens: positive logits
/// divided by `penalty`, negative ones multiplied (what is drawn from, not what is recorded);
/// borrowed unchanged when there is nothing to penalise.
pub fn penalised_logits<'a>(logits: &'a [f32], generated: &[u32], penalty: f32) -> Cow<'a, [f32]> {
    if penalty == 1.0 || generated.is_empty() {
        return Cow::Borrowed(logits);
    }
    let mut l = logits.to_vec();
    for &t in generated {
        let x = &mut l[t as usize];
        *x = if *x > 0.0 { *x / penalty } else { *x * penalty };
    }
    Cow::Owned(l)
}

/// Draws one token from `logits` (one row) given the tokens generated so far; returns the token and
/// its behaviour log-prob: the model's full distribution at the sampling temperature, before any
/// repetition penalty or top-k/top-p/min-p truncation (those shape what is drawn, not the recorded
/// log-prob, which must match the trainer's recomputation).
pub fn sample_token(
    logits: &[f32],
    generated: &[u32],
    cfg: &SamplingConfig,
    rng: &mut StdRng,
) -> (u32, f32) {
    let raw_logits = logits;
    let logits = penalised_logits(raw_logits, generated, cfg.repetition_penalty);
    let penalise = matches!(logits, Cow::Owned(_));
    let logprobs = log_softmax(&logits, cfg.temperature);
    // The recorded log-prob of a token: from the unpenalised logits.
    let raw = |token: u32, sampled: f32| {
        if penalise {
            log_softmax(raw_logits, cfg.temperature)[token as usize]
        } else {
            sampled
        }
    };
    if cfg.temperature == 0.0 {
        let (token, _) =
            logits
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |best, (i, &x)| {
                    if x > best.1 { (i, x) } else { best }
                });
        return (token as u32, raw(token as u32, logprobs[token]));
    }
    let (token, l) = if truncates(cfg, logprobs.len()) {
        draw(candidate_set(&logprobs, cfg).into_iter(), rng)
    } else {
        // The whole distribution: draw in id order, nothing to sort.
        draw(
            logprobs.iter().enumerate().map(|(i, &l)| (i as u32, l)),
            rng,
        )
    };
    (token, raw(token, l))
}

/// Draws one of the `(token, log-prob)` pairs in proportion to its probability, walking them in
/// the order given. Rounding can leave the draw a hair past the end: then the last pair that has
/// any probability, never one that has none.
fn draw(pairs: impl Iterator<Item = (u32, f32)> + Clone, rng: &mut StdRng) -> (u32, f32) {
    let total: f32 = pairs.clone().map(|(_, l)| l.exp()).sum();
    let mut u = rng.random_range(0.0..total);
    let mut fallback = None;
    for (token, l) in pairs {
        let p = l.exp();
        u -= p;
        if u <= 0.0 {
            return (token, l);
        }
        if p > 0.0 {
            fallback = Some((token, l));
        }
    }
    fallback.expect("a distribution with positive mass")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: sort the whole vocabulary, then truncate by top-k, top-p, min-p in turn.
    fn full_sort_candidates(logprobs: &[f32], cfg: &SamplingConfig) -> Vec<(u32, f32)> {
        let mut order: Vec<(u32, f32)> = (0..logprobs.len() as u32)
            .map(|i| (i, logprobs[i as usize]))
            .collect();
        order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if cfg.top_k > 0 {
            order.truncate(cfg.top_k);
        }
        let mut mass = 0.0f32;
        if cfg.top_p < 1.0 {
            let keep = order
                .iter()
                .position(|&(_, l)| {
                    mass += l.exp();
                    mass >= cfg.top_p
                })
                .map_or(order.len(), |i| i + 1);
            order.truncate(keep);
        }
        if cfg.min_p > 0.0 {
            let floor = order[0].1 + cfg.min_p.ln();
            order.retain(|&(_, l)| l >= floor);
        }
        order
    }

    #[test]
    fn cutting_before_sorting_keeps_the_same_candidates() {
        // Logits with ties, a vocabulary of 301, every combination of the three truncations.
        let logits: Vec<f32> = (0..301).map(|i| ((i * 37 % 53) as f32) / 7.0).collect();
        let logprobs = log_softmax(&logits, 0.8);
        for top_k in [0, 1, 7, 300, 301, 500] {
            for top_p in [1.0, 0.95, 0.5, 0.01] {
                for min_p in [0.0, 0.05, 0.5] {
                    let cfg = SamplingConfig {
                        top_k,
                        top_p,
                        min_p,
                        ..SamplingConfig::default()
                    };
                    assert_eq!(
                        candidate_set(&logprobs, &cfg),
                        full_sort_candidates(&logprobs, &cfg),
                        "top_k {top_k} top_p {top_p} min_p {min_p}"
                    );
                }
            }
        }
    }

    #[test]
    fn untruncated_draws_follow_the_distribution() {
        let logits = [2.0f32, -1.0, 0.5, 1.5, -30.0];
        let probs: Vec<f32> = log_softmax(&logits, 1.0).iter().map(|l| l.exp()).collect();
        let cfg = SamplingConfig {
            temperature: 1.0,
            ..SamplingConfig::default()
        };
        let mut rng = sample_rng(7, 0, 0);
        let n = 40_000;
        let mut counts = [0usize; 5];
        for _ in 0..n {
            let (token, logp) = sample_token(&logits, &[], &cfg, &mut rng);
            assert!((logp.exp() - probs[token as usize]).abs() < 1e-6);
            counts[token as usize] += 1;
        }
        for (c, p) in counts.iter().zip(&probs) {
            // Five standard deviations of a binomial count.
            let sd = (n as f32 * p * (1.0 - p)).sqrt();
            assert!(
                (*c as f32 - n as f32 * p).abs() <= 5.0 * sd + 1.0,
                "{counts:?} vs {probs:?}"
            );
        }
    }
}
