//! What one loss call is given: the step's normalisers and the per-token data of its sequences.

use burn::tensor::{Int, Tensor};

use super::GrpoLossConfig;
use crate::error::{Result, TrainerError};

/// Counts over the whole optimizer step that fix each loss type's normaliser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepNormalizer {
    /// Sequences in the step (grpo, sapo, dr_grpo).
    pub sequences: usize,
    /// Completion tokens in the step (bnpo, dapo, cispo; and the metric means).
    pub tokens: usize,
}

/// Per-token data of the sequences in one loss call, on a `[sequences, width]` grid. Token `i`
/// of the fused input sits at grid cell `cells[i]` (row-major); other cells are masked out.
#[derive(Debug, Clone)]
pub struct LossBatch {
    /// Number of sequences (grid rows).
    pub sequences: usize,
    /// Grid width (longest completion here).
    pub width: usize,
    /// Grid cell of each token row of the hidden states.
    pub cells: Vec<usize>,
    /// One advantage per sequence.
    pub advantages: Vec<f32>,
    /// Old (pre-update) log-prob per token, aligned with `cells`; `None` means "the current
    /// log-probs, detached" (TRL with `num_iterations = 1`: every ratio is exactly 1).
    pub old_logps: Option<Vec<f32>>,
    /// Reference-model log-prob per token (needed when beta > 0).
    pub ref_logps: Option<Vec<f32>>,
    /// Behaviour weight per token (π_prox / π_behav after truncation or masking, see
    /// [`crate::off_policy`]) multiplying the policy loss before the KL term, if used.
    pub is_ratio: Option<Vec<f32>>,
}

impl LossBatch {
    /// Checks that the batch fits `n` token rows and `targets`, and that `cfg` has what it needs.
    pub(super) fn validate(
        &self,
        cfg: &GrpoLossConfig,
        n: usize,
        targets: &Tensor<1, Int>,
    ) -> Result<()> {
        let size = self.sequences * self.width;
        let check = |name: &str, len: usize, want: usize| {
            if len == want {
                Ok(())
            } else {
                Err(TrainerError::Input(format!(
                    "{name} has {len} entries, expected {want}"
                )))
            }
        };
        check("cells", self.cells.len(), n)?;
        check("targets", targets.dims()[0], n)?;
        check("advantages", self.advantages.len(), self.sequences)?;
        for (name, v) in [
            ("old_logps", &self.old_logps),
            ("ref_logps", &self.ref_logps),
            ("is_ratio", &self.is_ratio),
        ] {
            if let Some(v) = v {
                check(name, v.len(), n)?;
            }
        }
        if let Some(&c) = self.cells.iter().find(|&&c| c >= size) {
            return Err(TrainerError::Input(format!(
                "cell {c} outside the {}×{} grid",
                self.sequences, self.width
            )));
        }
        if cfg.beta != 0.0 && self.ref_logps.is_none() {
            return Err(TrainerError::Input(
                "beta > 0 needs reference log-probs (a reference model)".into(),
            ));
        }
        Ok(())
    }
}
