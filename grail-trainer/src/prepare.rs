//! From a batch of groups to what the GRPO passes train on, computed once per batch: advantages,
//! checked sequences in micro-batches, the step's normalisers, and the log-probs the loss compares
//! against (π_prox, the behaviour weights, the reference model's).

use burn::module::Module;
use grail_core::model::CausalLm;
use grail_kernels::selective_logprobs_forward;
use grail_protocol::{Group, Sample};

use crate::advantages::compute_advantages;
use crate::batch::{Batch, MicroBatch, Sequence};
use crate::error::{Result, TrainerError};
use crate::loss::{LossBatch, StepNormalizer};
use crate::metrics::BatchMetrics;
use crate::trainer::GrpoTrainer;

/// A batch of groups ready for the passes of an optimizer step.
pub(crate) struct PreparedBatch {
    pub(crate) batch: Batch,
    /// One advantage per sequence.
    advantages: Vec<f32>,
    pub(crate) norm: StepNormalizer,
    /// Per sequence, per token: the log-probs the clipped ratio is taken against (`None`: the
    /// current ones, detached).
    old: Option<Vec<Vec<f32>>>,
    /// Per sequence, per token: the reference model's log-probs (when beta > 0).
    reference: Option<Vec<Vec<f32>>>,
    /// Per sequence, per token: the behaviour weights (when the correction applies).
    behaviour_weights: Option<Vec<Vec<f32>>>,
    pub(crate) metrics: BatchMetrics,
}

impl PreparedBatch {
    /// The loss's view of micro-batch `mb`: its grid, advantages and per-token log-probs.
    pub(crate) fn loss_batch(&self, mb: &MicroBatch) -> LossBatch {
        let per_token = |v: &Option<Vec<Vec<f32>>>| v.as_deref().map(|all| mb.gather(all));
        LossBatch {
            sequences: mb.members.len(),
            width: mb.width,
            cells: mb.cells.clone(),
            advantages: mb.members.iter().map(|&i| self.advantages[i]).collect(),
            old_logps: per_token(&self.old),
            ref_logps: per_token(&self.reference),
            is_ratio: per_token(&self.behaviour_weights),
        }
    }
}

impl GrpoTrainer {
    /// Prepares `groups` for training; `None` when every group was filtered out for zero reward
    /// spread (nothing to train on).
    pub(crate) fn prepare(&self, groups: &[Group]) -> Result<Option<PreparedBatch>> {
        let cfg = self.config();
        if groups.is_empty() {
            return Err(TrainerError::Input("no groups to train on".into()));
        }
        let adv = compute_advantages(
            groups,
            &cfg.reward_weights,
            cfg.scale_rewards,
            cfg.filter_zero_std_groups,
        )?;
        let vocab = self.model().vocab_size();
        let mut sequences = Vec::new();
        let mut advantages = Vec::new();
        let mut behaviour = Vec::new();
        for (&g, group_advantages) in adv.kept.iter().zip(&adv.values) {
            let group = &groups[g];
            for (s, (sample, &a)) in group.samples.iter().zip(group_advantages).enumerate() {
                let name = || format!("group {g} sample {s}");
                sequences.push(Sequence::new(
                    &group.prompt_ids,
                    &sample.completion_ids,
                    vocab,
                    name,
                )?);
                check_sample(sample, name)?;
                advantages.push(a);
                behaviour.push(sample.behaviour_logps.clone());
            }
        }
        if sequences.is_empty() {
            return Ok(None);
        }
        let batch = Batch::new(sequences, cfg)?;
        let norm = StepNormalizer {
            sequences: batch.sequences.len(),
            tokens: batch.completion_tokens(),
        };
        // π_prox: the trainer's log-probs before this batch's first update, computed once.
        let need_prox = cfg.num_iterations > 1 || cfg.behaviour_correction().is_some();
        let prox = if need_prox {
            Some(self.sequence_logps(&self.model().valid(), &batch)?)
        } else {
            None
        };
        let (behaviour_weights, importance_sampling) = match &prox {
            Some(prox) => {
                let (w, stats) = cfg.importance_sampling().weights(prox, &behaviour);
                (cfg.behaviour_correction().map(|_| w), Some(stats))
            }
            None => (None, None),
        };
        // The log-probs the clipped ratio is taken against.
        let old = if cfg.use_decoupled_loss {
            // With one pass π_prox is the current policy: ratios are exactly 1 (TRL detaches).
            if cfg.num_iterations > 1 { prox } else { None }
        } else {
            Some(behaviour)
        };
        let reference = match self.reference() {
            Some(r) if cfg.loss.beta != 0.0 => Some(self.sequence_logps(r, &batch)?),
            _ => None,
        };
        let metrics = BatchMetrics::new(
            groups,
            &adv,
            &batch,
            &self.model().config,
            cfg,
            self.version(),
            importance_sampling,
        );
        Ok(Some(PreparedBatch {
            batch,
            advantages,
            norm,
            old,
            reference,
            behaviour_weights,
            metrics,
        }))
    }

    /// Per-sequence completion log-probs under `model` (no gradients), micro-batch by micro-batch.
    fn sequence_logps(&self, model: &CausalLm, batch: &Batch) -> Result<Vec<Vec<f32>>> {
        let mut out = vec![Vec::new(); batch.sequences.len()];
        for mb in batch.assemble(&self.model().device()) {
            let hidden = mb.prediction_hidden(model)?;
            let targets = mb.targets_on(&hidden.device());
            let logp = selective_logprobs_forward(
                &hidden,
                &model.lm_head_weight(),
                &targets,
                self.config().loss.temperature,
                self.config().logprob_chunks,
                false,
            )
            .logp;
            let logp: Vec<f32> = logp.into_data().convert::<f32>().try_to_vec().expect("f32");
            mb.scatter(&logp, &mut out);
        }
        Ok(out)
    }
}

/// What a sample must carry beyond its tokens: a behaviour log-prob and a policy version per
/// completion token, the log-probs being log-probabilities. `name` says which sample.
fn check_sample(sample: &Sample, name: impl Fn() -> String) -> Result<()> {
    let c = sample.completion_ids.len();
    if sample.behaviour_logps.len() != c {
        return Err(TrainerError::Input(format!(
            "{}: {} behaviour log-probs for {c} completion tokens",
            name(),
            sample.behaviour_logps.len()
        )));
    }
    if sample.token_versions.len() != c {
        return Err(TrainerError::Input(format!(
            "{}: {} token versions for {c} completion tokens",
            name(),
            sample.token_versions.len()
        )));
    }
    if let Some(bad) = sample
        .behaviour_logps
        .iter()
        .find(|l| l.is_nan() || **l > 0.0)
    {
        return Err(TrainerError::Input(format!(
            "{}: behaviour log-prob {bad} is not a log-probability",
            name()
        )));
    }
    Ok(())
}
