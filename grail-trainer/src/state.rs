//! Train state on disk, so a run can stop and resume exactly.
//!
//! A state directory holds:
//! - `model/`: the policy in Hugging Face layout (f32 `model.safetensors` + `config.json`),
//!   loadable by grail's checkpoint loader and by transformers;
//! - `optimizer.bpk`: the AdamW moments and step counts (burn-pack), keyed by parameter ids that
//!   grail derives from the tensor names, so they match the reloaded model;
//! - `trainer_state.json`: step, policy version and the trainer config.
//!
//! The trainer draws no random numbers (sampling happens in the rollout pool), so there is no RNG
//! state to keep here. Resuming is bit-identical on the CPU backend (tested).

use std::path::Path;

use burn::tensor::Device;
use grail_core::GrailError;
use grail_core::checkpoint::{StorageDtype, load_model, save_model};
use grail_core::model::CausalLm;
use grail_core::types::PolicyVersion;
use serde::{Deserialize, Serialize};

use crate::config::TrainerConfig;
use crate::error::{Result, TrainerError};
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

const MODEL_DIR: &str = "model";
const OPTIMIZER_FILE: &str = "optimizer.bpk";
const STATE_FILE: &str = "trainer_state.json";

fn io(path: &Path, e: std::io::Error) -> TrainerError {
    TrainerError::Core(GrailError::io(path, e))
}

impl GrpoTrainer {
    /// Writes the train state to `dir` (created if needed). Files are written to a temporary
    /// directory first and renamed into place, so an interrupted save leaves the previous state.
    pub fn save_state(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let tmp = dir.with_extension("saving");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        save_model(self.model(), tmp.join(MODEL_DIR), StorageDtype::F32)?;
        self.optimizer()
            .save(tmp.join(OPTIMIZER_FILE))
            .map_err(|e| TrainerError::Input(format!("saving optimizer state: {e:?}")))?;
        let state = TrainerState {
            step: self.step(),
            policy_version: self.version(),
            config: self.config().clone(),
        };
        let json = serde_json::to_string_pretty(&state).expect("serialisable state");
        std::fs::write(tmp.join(STATE_FILE), json).map_err(|e| io(&tmp.join(STATE_FILE), e))?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| io(dir, e))
    }

    /// Restores a trainer saved by [`save_state`](Self::save_state) onto `device` (with autodiff).
    /// `reference` is needed when the saved config has beta > 0.
    pub fn load_state(
        dir: impl AsRef<Path>,
        device: &Device,
        reference: Option<CausalLm>,
        peak_flops: f64,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let state_path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&state_path).map_err(|e| io(&state_path, e))?;
        let state: TrainerState = serde_json::from_str(&text).map_err(|e| {
            TrainerError::Core(GrailError::Json {
                path: state_path.clone(),
                message: e.to_string(),
            })
        })?;
        let model = load_model(dir.join(MODEL_DIR), &device.clone().autodiff())?;
        let mut trainer = GrpoTrainer::new(model, reference, state.config, peak_flops)?;
        let optim_path = dir.join(OPTIMIZER_FILE);
        trainer.restore(state.step, state.policy_version, |optim| {
            optim.load(&optim_path).map_err(|e| {
                TrainerError::Input(format!(
                    "{}: cannot load optimizer state: {e:?}",
                    optim_path.display()
                ))
            })
        })?;
        Ok(trainer)
    }
}
