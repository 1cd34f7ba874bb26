//! The trainer's side of weight synchronisation: each optimizer step's weights as the next
//! [`WeightUpdate`], full or as a delta from the previous one (the codec is
//! [`grail_protocol::delta`]).

use grail_core::model::{CausalLm, named_tensors};
use grail_protocol::{
    NamedTensor, PolicyVersion, SyncMode, WeightPayload, WeightUpdate, WireDtype,
};

/// Turns the current model into the next update, remembering what it last sent (at the wire
/// dtype) so that receivers applying every update in order hold exactly these weights.
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
