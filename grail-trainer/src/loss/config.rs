//! The loss's hyper-parameters, under TRL's names, and their checks.

use crate::error::{Result, TrainerError};

/// The policy-loss variants, as TRL names them (`loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Per-sequence token mean, then mean over sequences.
    Grpo,
    /// Token sum over the step's completion-token count (batch-normalised).
    Bnpo,
    /// Token sum over (sequences × max_completion_length).
    DrGrpo,
    /// Token sum over the step's completion-token count (DAPO).
    Dapo,
    /// Clipped, detached importance weight times log-prob (MiniMax CISPO).
    Cispo,
    /// Soft sigmoid gate instead of hard clipping (SAPO), GRPO normalisation.
    Sapo,
}

/// Where the importance ratio is taken (`importance_sampling_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceSamplingLevel {
    /// One ratio per token (GRPO).
    Token,
    /// One ratio per sequence: exp of the mean token log-ratio (GSPO).
    Sequence,
}

/// Loss hyper-parameters, under TRL's names.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GrpoLossConfig {
    /// Loss variant.
    pub loss_type: LossType,
    /// Token- or sequence-level importance ratio.
    pub importance_sampling_level: ImportanceSamplingLevel,
    /// Lower clip: ratios below `1 − epsilon_low` are clipped.
    pub epsilon_low: f64,
    /// Upper clip: ratios above `1 + epsilon_high` are clipped (CISPO: above `epsilon_high`).
    pub epsilon_high: f64,
    /// Two-sided clipping cap on the unclipped ratio (INTELLECT-2), if set.
    pub delta: Option<f64>,
    /// Weight of the k3 KL penalty against the reference model; 0 skips the reference entirely.
    pub beta: f64,
    /// Sampling temperature the log-probs are computed at.
    pub temperature: f64,
    /// Completion-length budget (the dr_grpo normaliser).
    pub max_completion_length: usize,
    /// SAPO gate temperature for positive advantages.
    pub sapo_temperature_pos: f64,
    /// SAPO gate temperature for negative advantages.
    pub sapo_temperature_neg: f64,
}

impl Default for GrpoLossConfig {
    /// TRL's defaults: dapo, token level, ε = 0.2 both sides, β = 0, T = 1.
    fn default() -> Self {
        Self {
            loss_type: LossType::Dapo,
            importance_sampling_level: ImportanceSamplingLevel::Token,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            delta: None,
            beta: 0.0,
            temperature: 1.0,
            max_completion_length: 256,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
        }
    }
}

impl GrpoLossConfig {
    /// Checks ranges and combinations, naming the offending key.
    pub fn validate(&self) -> Result<()> {
        let positive = |key: &str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(TrainerError::config(key, v, "must be a positive number"))
            }
        };
        positive("temperature", self.temperature)?;
        positive("epsilon_high", self.epsilon_high)?;
        if !(0.0..1.0).contains(&self.epsilon_low) {
            return Err(TrainerError::config(
                "epsilon",
                self.epsilon_low,
                "epsilon_low must be in [0, 1)",
            ));
        }
        if !(self.beta >= 0.0 && self.beta.is_finite()) {
            return Err(TrainerError::config("beta", self.beta, "must be ≥ 0"));
        }
        if let Some(d) = self.delta
            && !(d > 1.0 && d.is_finite())
        {
            return Err(TrainerError::config(
                "delta",
                d,
                "must be > 1 (a cap on the ratio)",
            ));
        }
        if self.max_completion_length == 0 {
            return Err(TrainerError::config(
                "max_completion_length",
                0,
                "must be positive",
            ));
        }
        positive("sapo_temperature_pos", self.sapo_temperature_pos)?;
        positive("sapo_temperature_neg", self.sapo_temperature_neg)?;
        if self.importance_sampling_level == ImportanceSamplingLevel::Sequence
            && matches!(self.loss_type, LossType::Cispo | LossType::Sapo)
        {
            return Err(TrainerError::config(
                "importance_sampling_level",
                "sequence",
                format!(
                    "not supported with loss_type {:?} (use token)",
                    self.loss_type
                ),
            ));
        }
        Ok(())
    }
}
