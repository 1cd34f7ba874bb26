//! Off-policy correction between the policy that sampled a completion (the rollout's
//! *behaviour* policy π_behav) and the trainer's policy at the start of the step (the
//! *proximal* policy π_prox, whose log-probs the trainer recomputes once per batch).
//!
//! In an async run the two differ for two reasons: the sample is a few versions stale, and the
//! rollout's numerics differ from the trainer's. Uncorrected, that gap biases the gradient and
//! long runs collapse. The correction multiplies each token's policy loss by a weight derived from
//! the ratio `π_prox / π_behav`:
//!
//! | mode | ratio | weight |
//! | --- | --- | --- |
//! | `token_truncate` | per token: `exp(prox_t − behav_t)` | `min(ratio, C)` |
//! | `token_mask` | per token | `ratio` inside `[low, high]`, else 0 |
//! | `sequence_truncate` | per sequence: `exp(Σ_t prox_t − behav_t)` | `min(ratio, C)` on every token |
//! | `sequence_mask` (default) | per sequence | `ratio` inside `[low, high]`, else 0 on every token |
//!
//! These are TRL's `vllm_importance_sampling_mode` values (the sequence ratio is the product of the
//! token ratios, as TRL takes it). TRL's mask drops only ratios above C; grail masks both tails,
//! `[low, high] = [1/C, C]` unless configured, since a sample far *less* likely under the trainer is
//! as off-policy as one far more likely. Masked tokens keep their place in the loss normaliser
//! (weight 0, as TRL does), so masking never changes how micro-batches add up.
//!
//! Both log-probs use one definition: the temperature-scaled log-softmax over the *full*
//! vocabulary (the rollout records it before any top-k/top-p/min-p truncation; see
//! `grail_rollout::sampling`). A renormalised behaviour log-prob would make every ratio of a
//! truncated distribution > 1 by construction, and the correction would fight the sampler instead
//! of the policy change.

use crate::error::{Result, TrainerError};

/// How the importance-sampling weight is formed (`importance_sampling_mode`, TRL's values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceSamplingMode {
    /// Per-token ratio, capped at C.
    TokenTruncate,
    /// Per-token ratio; tokens outside `[low, high]` get weight 0.
    TokenMask,
    /// Per-sequence ratio (product over its tokens), capped at C.
    SequenceTruncate,
    /// Per-sequence ratio; sequences outside `[low, high]` get weight 0.
    SequenceMask,
}

impl ImportanceSamplingMode {
    fn sequence_level(self) -> bool {
        matches!(
            self,
            ImportanceSamplingMode::SequenceTruncate | ImportanceSamplingMode::SequenceMask
        )
    }

    fn masks(self) -> bool {
        matches!(
            self,
            ImportanceSamplingMode::TokenMask | ImportanceSamplingMode::SequenceMask
        )
    }
}

/// The importance-sampling correction's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImportanceSamplingCorrection {
    /// Token or sequence level, truncate or mask.
    pub mode: ImportanceSamplingMode,
    /// C: the truncation cap, and the default mask range `[1/C, C]`.
    pub cap: f64,
    /// Lower edge of the mask range (default 1/C).
    pub mask_low: Option<f64>,
    /// Upper edge of the mask range (default C).
    pub mask_high: Option<f64>,
}

impl Default for ImportanceSamplingCorrection {
    /// `sequence_mask` with C = 3, as TRL defaults.
    fn default() -> Self {
        Self {
            mode: ImportanceSamplingMode::SequenceMask,
            cap: 3.0,
            mask_low: None,
            mask_high: None,
        }
    }
}

impl ImportanceSamplingCorrection {
    /// The mask range `[low, high]`.
    pub fn mask_range(&self) -> (f64, f64) {
        (
            self.mask_low.unwrap_or(1.0 / self.cap),
            self.mask_high.unwrap_or(self.cap),
        )
    }

    /// Checks ranges, naming the key.
    pub fn validate(&self) -> Result<()> {
        if !(self.cap >= 1.0 && self.cap.is_finite()) {
            return Err(TrainerError::config(
                "importance_sampling_cap",
                self.cap,
                "must be a finite number ≥ 1",
            ));
        }
        let (low, high) = self.mask_range();
        if !((0.0..=1.0).contains(&low) && high >= 1.0 && high.is_finite()) {
            return Err(TrainerError::config(
                "importance_sampling_mask_low / importance_sampling_mask_high",
                format!("[{low}, {high}]"),
                "the mask range must satisfy 0 ≤ low ≤ 1 ≤ high < ∞",
            ));
        }
        Ok(())
    }

    /// The per-token weights of every sequence, and what the correction saw.
    ///
    /// `prox[i]` and `behav[i]` are the log-probs of sequence i's completion tokens under the
    /// trainer's proximal policy and the behaviour policy.
    pub fn weights(
        &self,
        prox: &[Vec<f32>],
        behav: &[Vec<f32>],
    ) -> (Vec<Vec<f32>>, ImportanceSamplingStats) {
        let (low, high) = self.mask_range();
        let cap = self.cap;
        let mut stats = ImportanceSamplingStats::default();
        let mut ratios = Vec::new();
        let mut weights = Vec::with_capacity(prox.len());
        for (p, b) in prox.iter().zip(behav) {
            let diffs: Vec<f64> = p.iter().zip(b).map(|(&p, &b)| (p - b) as f64).collect();
            for d in &diffs {
                stats.logp_diff_sum += d.abs();
                stats.logp_diff_max = stats.logp_diff_max.max(d.abs());
            }
            stats.tokens += diffs.len();
            let weigh = |ratio: f64| {
                if self.mode.masks() {
                    if (low..=high).contains(&ratio) {
                        ratio
                    } else {
                        0.0
                    }
                } else {
                    ratio.min(cap)
                }
            };
            let w: Vec<f32> = if self.mode.sequence_level() {
                let ratio = diffs.iter().sum::<f64>().exp();
                ratios.push(ratio);
                let w = weigh(ratio);
                if self.mode.masks() && w == 0.0 {
                    stats.masked_tokens += diffs.len();
                }
                vec![w as f32; diffs.len()]
            } else {
                diffs
                    .iter()
                    .map(|d| {
                        let ratio = d.exp();
                        ratios.push(ratio);
                        let w = weigh(ratio);
                        if self.mode.masks() && w == 0.0 {
                            stats.masked_tokens += 1;
                        }
                        w as f32
                    })
                    .collect()
            };
            weights.push(w);
        }
        if !ratios.is_empty() {
            stats.ratio_min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
            stats.ratio_max = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            stats.ratio_mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
        }
        (weights, stats)
    }
}

/// What the correction saw over one step: the raw ratios (per token or per sequence, by mode)
/// before truncation or masking, the tokens it masked, and the behaviour–trainer log-prob gap.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ImportanceSamplingStats {
    /// Smallest ratio.
    pub ratio_min: f64,
    /// Mean ratio.
    pub ratio_mean: f64,
    /// Largest ratio.
    pub ratio_max: f64,
    /// Completion tokens given weight 0 by a mask mode.
    pub masked_tokens: usize,
    /// Completion tokens seen.
    pub tokens: usize,
    /// Σ |prox − behav| over tokens.
    pub logp_diff_sum: f64,
    /// max |prox − behav| over tokens.
    pub logp_diff_max: f64,
}

impl ImportanceSamplingStats {
    /// Fraction of completion tokens masked.
    pub fn masked_fraction(&self) -> f64 {
        self.masked_tokens as f64 / self.tokens.max(1) as f64
    }

    /// Mean |prox − behav| per token.
    pub fn logp_diff_mean(&self) -> f64 {
        self.logp_diff_sum / self.tokens.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn correction(mode: ImportanceSamplingMode) -> ImportanceSamplingCorrection {
        ImportanceSamplingCorrection {
            mode,
            cap: 2.0,
            ..ImportanceSamplingCorrection::default()
        }
    }

    /// Two sequences. Sequence 0: token log-ratios ln 3, ln 0.25, 0 (ratios 3, 0.25, 1; product
    /// 0.75). Sequence 1: ln 1.5, ln 1.5 (product 2.25).
    fn logps() -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let behav = vec![vec![-2.0f32, -1.0, -0.5], vec![-3.0, -1.5]];
        let ratios = [vec![3.0f64, 0.25, 1.0], vec![1.5, 1.5]];
        let prox = behav
            .iter()
            .zip(&ratios)
            .map(|(b, r)| {
                b.iter()
                    .zip(r)
                    .map(|(&b, &r)| (b as f64 + r.ln()) as f32)
                    .collect()
            })
            .collect();
        (prox, behav)
    }

    fn close(a: &[Vec<f32>], b: &[Vec<f64>]) {
        for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
            assert!((*x as f64 - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn token_truncate_caps_each_token() {
        let (p, b) = logps();
        let (w, s) = correction(ImportanceSamplingMode::TokenTruncate).weights(&p, &b);
        close(&w, &[vec![2.0, 0.25, 1.0], vec![1.5, 1.5]]);
        assert_eq!(s.masked_tokens, 0);
        assert!((s.ratio_max - 3.0).abs() < 1e-5 && (s.ratio_min - 0.25).abs() < 1e-5);
        assert!((s.ratio_mean - (3.0 + 0.25 + 1.0 + 1.5 + 1.5) / 5.0).abs() < 1e-5);
        assert!((s.logp_diff_max - 4f64.ln()).abs() < 1e-5);
        let mean = (3f64.ln() + 4f64.ln() + 0.0 + 2.0 * 1.5f64.ln()) / 5.0;
        assert!((s.logp_diff_mean() - mean).abs() < 1e-5);
    }

    #[test]
    fn token_mask_drops_both_tails() {
        let (p, b) = logps();
        let (w, s) = correction(ImportanceSamplingMode::TokenMask).weights(&p, &b);
        // Range [0.5, 2]: 3 and 0.25 leave it.
        close(&w, &[vec![0.0, 0.0, 1.0], vec![1.5, 1.5]]);
        assert_eq!(s.masked_tokens, 2);
        assert!((s.masked_fraction() - 0.4).abs() < 1e-12);
    }

    #[test]
    fn sequence_truncate_uses_the_product_of_token_ratios() {
        let (p, b) = logps();
        let (w, s) = correction(ImportanceSamplingMode::SequenceTruncate).weights(&p, &b);
        close(&w, &[vec![0.75; 3], vec![2.0; 2]]);
        assert!((s.ratio_mean - (0.75 + 2.25) / 2.0).abs() < 1e-5);
    }

    #[test]
    fn sequence_mask_drops_whole_sequences_and_honours_a_configured_range() {
        let (p, b) = logps();
        let (w, s) = correction(ImportanceSamplingMode::SequenceMask).weights(&p, &b);
        close(&w, &[vec![0.75; 3], vec![0.0; 2]]);
        assert_eq!((s.masked_tokens, s.tokens), (2, 5));
        let narrow = ImportanceSamplingCorrection {
            mask_low: Some(0.8),
            mask_high: Some(3.0),
            ..correction(ImportanceSamplingMode::SequenceMask)
        };
        let (w, _) = narrow.weights(&p, &b);
        close(&w, &[vec![0.0; 3], vec![2.25; 2]]);
    }

    #[test]
    fn bad_ranges_name_the_key() {
        let bad = ImportanceSamplingCorrection {
            cap: 0.5,
            ..ImportanceSamplingCorrection::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("importance_sampling_cap")
        );
        let bad = ImportanceSamplingCorrection {
            mask_low: Some(1.5),
            ..ImportanceSamplingCorrection::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("mask"));
    }
}
