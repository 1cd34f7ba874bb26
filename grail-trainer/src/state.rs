//! Train state on disk, so a run can stop and resume exactly.
//!
//! A state directory holds:
//! - the policy in Hugging Face layout (f32 `model.safetensors` + `config.json`), loadable by
//!   grail's checkpoint loader and by transformers;
//! - `reference/`: the frozen reference model, when the loss has a KL term (beta > 0);
//! - `optimizer.bpk`: the AdamW moments and step counts (burn-pack), keyed by parameter ids that
//!   grail derives from the tensor names, so they match the reloaded model;
//! - `trainer_state.json`: step, policy version and the trainer config.
//!
//! The trainer draws no random numbers (sampling happens in the rollout pool), so there is no RNG
//! state to keep here. Resuming is bit-identical on the CPU backend (tested).

use std::path::Path;

use burn::tensor::Device;
use grail_core::checkpoint::{StorageDtype, load_model, save_model};
use grail_core::{GrailError, atomic};
use grail_protocol::PolicyVersion;
use serde::{Deserialize, Serialize};

use crate::config::TrainerConfig;
use crate::error::{Result, TrainerError};
use crate::learner::Learner;
use crate::trainer::GrpoTrainer;

/// The scalar part of the train state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: usize,
    /// Policy version of the saved weights.
    pub policy_version: PolicyVersion,
    /// The trainer configuration.
    pub config: TrainerConfig,
}

const REFERENCE_DIR: &str = "reference";
const OPTIMIZER_FILE: &str = "optimizer.bpk";
const STATE_FILE: &str = "trainer_state.json";

impl GrpoTrainer {
    /// Writes the train state to `dir` as a whole: into a temporary directory first, then
    /// swapped into place, so an interrupted save leaves the previous state intact.
    pub fn save_state(&self, dir: impl AsRef<Path>) -> Result<()> {
        atomic::write_dir(dir.as_ref(), |tmp| self.write_state(tmp))
    }

    /// Writes the train state's files into the existing directory `dir` (for a caller that
    /// assembles a larger checkpoint and makes it atomic itself).
    pub fn write_state(&self, dir: &Path) -> Result<()> {
        save_model(self.model(), dir, StorageDtype::F32)?;
        if let Some(reference) = self.reference() {
            save_model(reference, dir.join(REFERENCE_DIR), StorageDtype::F32)?;
        }
        let optimizer = dir.join(OPTIMIZER_FILE);
        self.optimizer().save(&optimizer).map_err(|e| {
            TrainerError::Input(format!(
                "{}: cannot save optimizer state: {e:?}",
                optimizer.display()
            ))
        })?;
        let state = TrainerState {
            step: self.step(),
            policy_version: self.version(),
            config: self.config().clone(),
        };
        let json = serde_json::to_string_pretty(&state).expect("serialisable state");
        atomic::write_file(&dir.join(STATE_FILE), json.as_bytes())?;
        Ok(())
    }

    /// Restores a trainer saved by [`save_state`](Self::save_state) (or
    /// [`write_state`](Self::write_state)) onto `device` (with autodiff). `config` replaces the
    /// saved configuration when given (a resumed run may, say, train for more steps).
    pub fn load_state(
        dir: impl AsRef<Path>,
        device: &Device,
        config: Option<TrainerConfig>,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let state_path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&state_path)
            .map_err(|e| TrainerError::Core(GrailError::io(&state_path, e)))?;
        let state: TrainerState = serde_json::from_str(&text).map_err(|e| {
            TrainerError::Core(GrailError::Json {
                path: state_path.clone(),
                message: e.to_string(),
            })
        })?;
        let model = load_model(dir, &device.clone().autodiff())?;
        let reference_dir = dir.join(REFERENCE_DIR);
        let reference = if reference_dir.is_dir() {
            Some(load_model(
                &reference_dir,
                &device.clone().without_autodiff(),
            )?)
        } else {
            None
        };
        let config = config.unwrap_or(state.config);
        let learner = Learner::new(model, &config)?.load_optimizer(&dir.join(OPTIMIZER_FILE))?;
        GrpoTrainer::from_learner(learner, reference, config, state.step, state.policy_version)
    }
}
