//! Weight synchronisation on the model's side: a model's tensors as [`NamedTensor`]s, the
//! trainer's [`WeightPublisher`] and a worker's [`WeightState`]. The update format and its codec
//! are [`grail_protocol`]'s.

use grail_protocol::{
    NamedTensor, PolicyVersion, PoolMessage, SyncMode, WeightPayload, WeightUpdate, WireDtype,
};

use crate::error::Result;
use crate::model::CausalLm;

/// A model's tensors in HF naming, sorted by name, rounded to `wire` (f32: exact).
pub fn named_tensors(model: &CausalLm, wire: WireDtype) -> Vec<NamedTensor> {
    let mut out = Vec::new();
    model.for_each_tensor(|name, data| {
        let shape = data.shape().to_vec();
        let values = data
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32 weights")
            .into_iter()
            .map(|v| wire.round(v))
            .collect();
        out.push(NamedTensor {
            name,
            shape,
            values,
        });
    });
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The trainer's side: turns the current model into the next update.
pub struct WeightPublisher {
    mode: SyncMode,
    wire: WireDtype,
    last: Vec<NamedTensor>,
    last_version: PolicyVersion,
}

impl WeightPublisher {
    /// A publisher whose receivers start from `initial` at `version` (the weights the pool was
    /// spawned with: version 0 for a new run, the checkpoint's version on resume).
    pub fn new(
        mode: SyncMode,
        wire: WireDtype,
        initial: &CausalLm,
        version: PolicyVersion,
    ) -> Self {
        Self {
            mode,
            wire,
            last: named_tensors(initial, wire),
            last_version: version,
        }
    }

    /// The update that brings a receiver from the previously published weights to `model`'s.
    pub fn publish(&mut self, version: PolicyVersion, model: &CausalLm) -> WeightUpdate {
        let now = named_tensors(model, self.wire);
        let payload =
            WeightPayload::encode(self.mode, self.wire, self.last_version, &self.last, &now);
        self.last = now;
        self.last_version = version;
        WeightUpdate { version, payload }
    }

    /// Bytes a full update at the wire dtype would take (for the delta/full ratio).
    pub fn full_bytes(&self) -> usize {
        self.last.iter().map(|t| t.values.len()).sum::<usize>() * self.wire.value_bytes()
    }
}

/// A worker's copy of the weights at the wire dtype, updated payload by payload.
#[derive(Debug, Clone)]
pub struct WeightState {
    tensors: Vec<NamedTensor>,
    version: PolicyVersion,
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

    /// A model with the current weights.
    pub fn build_model(
        &self,
        config: &crate::model::ModelConfig,
        device: &burn::tensor::Device,
    ) -> Result<CausalLm> {
        CausalLm::build(
            config,
            &mut crate::model::NamedTensorSource::new(&self.tensors, device),
        )
    }
}

/// The trainer's end of the channel back to the rollout pool: new weights, encoded by the
/// publisher, and how many groups the trainer has consumed, in one ordered stream.
pub struct PoolFeedback {
    /// The pool's feedback channel.
    pub tx: flume::Sender<PoolMessage>,
    /// Encoder state.
    pub publisher: WeightPublisher,
    consumed: u64,
}

impl PoolFeedback {
    /// Feedback through `tx`, encoding weights with `publisher`.
    pub fn new(tx: flume::Sender<PoolMessage>, publisher: WeightPublisher) -> Self {
        Self {
            tx,
            publisher,
            consumed: 0,
        }
    }

    /// Sends `model`'s weights as `version`. A closed pool is not an error: the trainer keeps its
    /// weights and its run ends when the group channel closes.
    pub fn publish(&mut self, version: PolicyVersion, model: &CausalLm) {
        let update = self.publisher.publish(version, model);
        let _ = self.tx.send(PoolMessage::Weights(update));
    }

    /// Records that the trainer is done with `groups` more groups (trained, filtered or dropped as
    /// stale) and tells the pool the new total, which frees it to take as many new prompts.
    pub fn consumed(&mut self, groups: usize) {
        self.consumed += groups as u64;
        let _ = self.tx.send(PoolMessage::Consumed(self.consumed));
    }
}
