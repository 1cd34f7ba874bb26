//! The GRPO step: one call of [`GrpoTrainer::train_step`] reads like nanoGPT's loop.
//!
//! Prepare the batch once (advantages, micro-batches, old and reference log-probs); then for each
//! of μ passes: for each micro-batch: forward → log-probs and loss → backward → accumulate; clip;
//! AdamW step; metrics.

use std::time::Instant;

use burn::optim::{GradientsAccumulator, GradientsParams};
use grail_core::model::CausalLm;
use grail_protocol::Group;

use crate::error::{Result, TrainerError};
use crate::loss::{LogProbPath, LossStats, grpo_loss};
use crate::metrics::{StepMeasurements, StepMetrics, StepTimes};
use crate::prepare::PreparedBatch;
use crate::schedule::learning_rate;
use crate::trainer::{GrpoTrainer, on_rayon_worker};

/// What [`GrpoTrainer::train_step`] did with a batch of groups.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    /// The batch was trained on: one metrics entry per optimizer step (`num_iterations` of them).
    Trained(Vec<StepMetrics>),
    /// Every group had zero reward spread and was filtered out (`filter_zero_std_groups`): no
    /// optimizer step was taken and the weights are unchanged.
    NothingToTrain {
        /// Groups filtered out.
        groups: usize,
        /// Samples in them.
        samples: usize,
    },
}

impl StepOutcome {
    /// The metrics of the steps taken (none when there was nothing to train).
    pub fn metrics(&self) -> &[StepMetrics] {
        match self {
            Self::Trained(metrics) => metrics,
            Self::NothingToTrain { .. } => &[],
        }
    }

    /// The metrics of the steps taken, owned (empty when there was nothing to train).
    pub fn into_metrics(self) -> Vec<StepMetrics> {
        match self {
            Self::Trained(metrics) => metrics,
            Self::NothingToTrain { .. } => Vec::new(),
        }
    }
}

/// The accumulated gradients of one pass over a batch, and what the pass measured.
#[derive(Debug)]
pub struct StepGradients {
    /// Gradients of every policy parameter, summed over the micro-batches.
    pub grads: GradientsParams,
    /// The loss stats, summed over the micro-batches.
    pub stats: LossStats,
    /// Micro-batches the pass was split into.
    pub micro_batches: usize,
    /// Token slots the micro-batches took (padding included).
    pub allocated_tokens: usize,
    /// Where the pass's time went (its forward, loss and backward parts).
    pub times: StepTimes,
}

impl GrpoTrainer {
    /// Runs `num_iterations` optimizer steps on one batch of groups, or none when every group was
    /// filtered out for zero reward spread.
    pub fn train_step(&mut self, groups: &[Group]) -> Result<StepOutcome> {
        on_rayon_worker(|| self.train_step_here(groups))
    }

    fn train_step_here(&mut self, groups: &[Group]) -> Result<StepOutcome> {
        let start = Instant::now();
        let Some(batch) = self.prepare(groups)? else {
            // Only zero-spread filtering leaves a non-empty batch without sequences.
            return Ok(StepOutcome::NothingToTrain {
                groups: groups.len(),
                samples: groups.iter().map(|g| g.samples.len()).sum(),
            });
        };
        let mut prepare_s = start.elapsed().as_secs_f64();
        let mut out = Vec::with_capacity(self.config().num_iterations);
        for _ in 0..self.config().num_iterations {
            let start = Instant::now();
            let pass = self.gradients_of(&batch)?;
            let mut times = pass.times;
            times.prepare_s = std::mem::take(&mut prepare_s);
            let cfg = self.config();
            let lr = learning_rate(
                cfg.learning_rate,
                cfg.lr_scheduler_type,
                self.step(),
                cfg.warmup_steps,
                cfg.max_steps,
            );
            let optimizer = Instant::now();
            let grad_norm = self.update(lr, pass.grads);
            times.optimizer_s = optimizer.elapsed().as_secs_f64();
            self.advance();
            let seconds = start.elapsed().as_secs_f64() + times.prepare_s;
            let measured = StepMeasurements {
                loss: pass.stats,
                micro_batches: pass.micro_batches,
                allocated_tokens: pass.allocated_tokens,
                times,
                grad_norm,
                lr,
                seconds,
                step: self.step(),
                policy_version: self.version(),
                peak_flops: self.peak_flops(),
            };
            out.push(StepMetrics::new(&batch.metrics, measured));
        }
        Ok(StepOutcome::Trained(out))
    }

    /// The accumulated gradients of one pass over `groups` (no optimizer step). Exposed so that
    /// tests can compare gradients across token budgets and layouts.
    #[doc(hidden)]
    pub fn gradients(&self, groups: &[Group]) -> Result<StepGradients> {
        on_rayon_worker(|| match self.prepare(groups)? {
            Some(batch) => self.gradients_of(&batch),
            None => Err(TrainerError::Input(
                "nothing to train on: every group had zero reward spread".into(),
            )),
        })
    }

    /// One pass: forward, loss and backward for every micro-batch, gradients accumulated.
    fn gradients_of(&self, p: &PreparedBatch) -> Result<StepGradients> {
        let model = self.model();
        let cfg = self.config();
        let path = self.log_prob_path();
        let mut times = StepTimes::default();
        let mut clock = Instant::now();
        let mut lap = move || {
            let now = Instant::now();
            let s = (now - clock).as_secs_f64();
            clock = now;
            s
        };
        let mut accum = GradientsAccumulator::<CausalLm>::new();
        let mut stats = LossStats::default();
        let mut allocated_tokens = 0;
        for mb in p.batch.assemble(&model.device()) {
            allocated_tokens += mb.allocated;
            let batch = p.loss_batch(&mb);
            lap();
            let (hidden, kept) = if cfg.gradient_checkpointing {
                let (hidden, kept) = mb.prediction_hidden_checkpointed(model)?;
                (hidden, Some(kept))
            } else {
                (mb.prediction_hidden(model)?, None)
            };
            let weight = model.lm_head_weight();
            times.forward_s += lap();
            let loss = grpo_loss(
                path,
                &cfg.loss,
                p.norm,
                &batch,
                hidden,
                weight,
                mb.targets.clone(),
            )?;
            times.loss_s += lap();
            let grads = loss.objective.backward();
            stats.add(&loss.stats);
            let grads = match kept {
                // Recomputes the decoder layers one at a time (gradient checkpointing).
                Some(kept) => kept.backward(model, grads),
                None => GradientsParams::from_grads(grads, model),
            };
            accum.accumulate(model, grads);
            times.backward_s += lap();
        }
        let grads = accum.grads();
        times.backward_s += lap();
        Ok(StepGradients {
            grads,
            stats,
            micro_batches: p.batch.micro_batches.len(),
            allocated_tokens,
            times,
        })
    }

    /// The log-prob path: the differentiable fused op where the model runs its fused kernels;
    /// elsewhere (other backends, or fused ops switched off) the portable fused path; the unfused
    /// reference only when asked for.
    fn log_prob_path(&self) -> LogProbPath {
        let chunks = self.config().logprob_chunks;
        if self.config().naive_logprob {
            LogProbPath::Reference
        } else if self.model().uses_fused_ops() {
            LogProbPath::FusedAutodiff(chunks)
        } else {
            LogProbPath::Fused(chunks)
        }
    }
}
