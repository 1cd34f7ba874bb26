//! The GRPO trainer: groups in, optimizer steps out.
//!
//! [`GrpoTrainer`] holds what persists between steps: the [`Learner`] (policy and AdamW state), the
//! frozen reference model, the configuration and the step and version counters. What it does lives
//! with each concept: the step in [`crate::step`], preparing a batch in `prepare.rs`, metrics in
//! [`crate::metrics`], the supervised warm-up in [`crate::sft`], save and resume in
//! [`crate::state`], training from the rollout pool in [`crate::channel`].

use std::sync::Arc;

use burn::optim::{GradientsParams, ModuleOptimizer};
use grail_core::model::{CausalLm, named_tensors};
use grail_protocol::{PolicyVersion, WeightPayload, WeightUpdate, WireDtype};

use crate::config::TrainerConfig;
use crate::error::{Result, TrainerError};
use crate::learner::Learner;

/// The GRPO trainer. Holds the policy (on an autodiff device) and its AdamW state, an optional
/// frozen reference model, the step counter and the policy version.
pub struct GrpoTrainer {
    learner: Learner,
    reference: Option<CausalLm>,
    config: TrainerConfig,
    step: usize,
    version: PolicyVersion,
    peak_flops: Option<f64>,
}

impl GrpoTrainer {
    /// A trainer for `model` (whose device must have autodiff enabled). `reference` is required
    /// when `loss.beta > 0` and ignored (never run) when it is 0.
    pub fn new(
        model: CausalLm,
        reference: Option<CausalLm>,
        config: TrainerConfig,
    ) -> Result<Self> {
        let learner = Learner::new(model, &config)?;
        Self::from_learner(learner, reference, config, 0, 0)
    }

    /// A trainer that continues from optimizer step `step` and policy `version` with `learner`
    /// (a fresh one, or one resumed from disk), once `config` checks out.
    pub(crate) fn from_learner(
        learner: Learner,
        reference: Option<CausalLm>,
        config: TrainerConfig,
        step: usize,
        version: PolicyVersion,
    ) -> Result<Self> {
        config.validate()?;
        let reference = if config.loss.beta != 0.0 {
            Some(reference.ok_or_else(|| {
                TrainerError::config("beta", config.loss.beta, "beta > 0 needs a reference model")
            })?)
        } else {
            None
        };
        Ok(Self {
            learner,
            reference,
            config,
            step,
            version,
            peak_flops: None,
        })
    }

    /// Reports MFU against `peak` FLOP/s, the device's measured peak (see
    /// [`crate::flops::measure_peak_flops`]).
    pub fn with_peak_flops(mut self, peak: f64) -> Self {
        self.peak_flops = Some(peak);
        self
    }

    /// The current policy.
    pub fn model(&self) -> &CausalLm {
        self.learner.model()
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> usize {
        self.step
    }

    /// Version of the current weights.
    pub fn version(&self) -> PolicyVersion {
        self.version
    }

    /// Moves the policy version on to `version` (never back). A trainer resumed from a
    /// checkpoint, whose run published newer versions after that checkpoint, continues after
    /// them: a version number always names one set of weights.
    pub fn continue_versions_from(&mut self, version: PolicyVersion) {
        self.version = self.version.max(version);
    }

    /// The frozen reference model of the KL term (present when beta > 0).
    pub fn reference(&self) -> Option<&CausalLm> {
        self.reference.as_ref()
    }

    /// The configuration.
    pub fn config(&self) -> &TrainerConfig {
        &self.config
    }

    /// The AdamW state.
    pub fn optimizer(&self) -> &ModuleOptimizer {
        self.learner.optimizer()
    }

    /// The current weights as a [`WeightUpdate`] (full tensors, HF names).
    pub fn weight_update(&self) -> WeightUpdate {
        WeightUpdate {
            version: self.version,
            payload: WeightPayload::Full(Arc::new(named_tensors(self.model(), WireDtype::F32))),
        }
    }

    /// The device's measured peak FLOP/s, when MFU is reported.
    pub(crate) fn peak_flops(&self) -> Option<f64> {
        self.peak_flops
    }

    /// Clips `grads` (`max_grad_norm`) and takes an AdamW step at `lr`; returns the norm before
    /// clipping. The counters are left alone (see [`advance`](Self::advance)).
    pub(crate) fn update(&mut self, lr: f64, grads: GradientsParams) -> f64 {
        self.learner.update(lr, grads, self.config.max_grad_norm)
    }

    /// Counts one GRPO optimizer step: the step counter and the policy version move on.
    pub(crate) fn advance(&mut self) {
        self.step += 1;
        self.version += 1;
    }
}

/// Runs `f` on a rayon worker thread (inline when already on one). The CPU kernels parallelise
/// with rayon; when a step runs on an outside thread, that thread does the serial work while idle
/// workers spin for jobs on the same cores. On a worker, the step's own thread takes part in every
/// parallel section instead.
pub(crate) fn on_rayon_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}
