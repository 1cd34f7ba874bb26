//! A worker's side of weight synchronisation: the weights at the wire dtype, brought up to date
//! update by update (the codec is [`grail_protocol::delta`]), and the model built from them.

use burn::tensor::Device;
use grail_core::Result;
use grail_core::model::{Bf16Matrices, CausalLm, ModelConfig, NamedTensorSource, named_tensors};
use grail_protocol::{NamedTensor, PolicyVersion, WeightUpdate, WireDtype};

/// A worker's copy of the weights at the wire dtype, updated payload by payload.
#[derive(Debug, Clone)]
pub struct WeightState {
    tensors: Vec<NamedTensor>,
    version: PolicyVersion,
    wire: WireDtype,
}

impl WeightState {
    /// Starts from the weights the pool was spawned with, which are `version`, rounded to `wire`
    /// (the publisher's dtype): then the weights at every version are exactly the trainer's
    /// rounded to `wire`, whatever the history, so a resumed pool samples from the same weights
    /// as one that never stopped.
    pub fn new(initial: &CausalLm, version: PolicyVersion, wire: WireDtype) -> Self {
        Self {
            tensors: named_tensors(initial, wire),
            version,
            wire,
        }
    }

    /// The version applied last.
    pub fn version(&self) -> PolicyVersion {
        self.version
    }

    /// The current tensors (sorted by name).
    pub fn tensors(&self) -> &[NamedTensor] {
        &self.tensors
    }

    /// Applies the next update. A delta must apply to the version this state holds.
    pub fn apply(&mut self, update: &WeightUpdate) -> Result<()> {
        update.apply_to(&mut self.tensors, self.version)?;
        self.version = update.version;
        Ok(())
    }

    /// A model with the current weights. Weights sent at bf16 are held at bf16 where the
    /// kernels read them so (the CPU): the same values, half the memory and half the bytes each
    /// decode step reads; each matrix is cast as it is built, so the f32 model never exists. On
    /// the CPU the matrices are then held in panel order for the decode kernel
    /// ([`CausalLm::with_panel_matrices`]).
    pub fn build_model(&self, config: &ModelConfig, device: &Device) -> Result<CausalLm> {
        let mut source = NamedTensorSource::new(&self.tensors, device);
        let model = if self.wire == WireDtype::Bf16 && grail_kernels::host_kernels(device) {
            CausalLm::build(config, &mut Bf16Matrices(source))?
        } else {
            CausalLm::build(config, &mut source)?
        };
        Ok(model.with_panel_matrices())
    }
}
