//! Weight updates: the tensors a trainer publishes after an optimizer step, whole or as a delta
//! from the previous update, at a wire dtype.
//!
//! Both ends keep the weights at the wire dtype: the sender remembers what it last sent, the
//! receiver applies updates in order, and after every update the two hold exactly the same
//! values. Sender and receiver must start from the same weights.

use std::sync::Arc;

use crate::delta;
use crate::error::ProtocolError;
use crate::group::PolicyVersion;

/// One named tensor in Hugging Face naming and layout, f32 values.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// Hugging Face tensor name, e.g. `model.layers.0.mlp.up_proj.weight`.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// The dtype weights travel at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireDtype {
    /// Exact f32.
    F32,
    /// bfloat16 (round to nearest even); the workers run the bf16-rounded weights.
    Bf16,
}

impl WireDtype {
    /// `x` rounded to this dtype (as f32).
    pub fn round(self, x: f32) -> f32 {
        match self {
            WireDtype::F32 => x,
            WireDtype::Bf16 => half::bf16::from_f32(x).to_f32(),
        }
    }

    /// Bytes one value takes on the wire.
    pub fn value_bytes(self) -> usize {
        match self {
            WireDtype::F32 => 4,
            WireDtype::Bf16 => 2,
        }
    }

    /// `values` as little-endian bytes at this dtype (what anchors store and hashes read).
    pub fn to_le_bytes(self, values: &[f32]) -> Vec<u8> {
        match self {
            WireDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            WireDtype::Bf16 => values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
        }
    }

    /// The values of little-endian `bytes` at this dtype (a trailing partial value is dropped).
    pub fn from_le_bytes(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            WireDtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            WireDtype::Bf16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }
}

/// The xxh3-128 hash of `tensors` at the wire dtype, in the order given (both ends keep them
/// sorted by name): names, shapes and value bits. Two holders of the same weights get the same
/// hash, so a receiver checks what it reconstructed against the publisher's.
pub fn weights_hash(tensors: &[NamedTensor], wire: WireDtype) -> u128 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for t in tensors {
        hasher.update(&(t.name.len() as u64).to_le_bytes());
        hasher.update(t.name.as_bytes());
        hasher.update(&(t.shape.len() as u64).to_le_bytes());
        for &d in &t.shape {
            hasher.update(&(d as u64).to_le_bytes());
        }
        hasher.update(&wire.to_le_bytes(&t.values));
    }
    hasher.digest128()
}

/// Full tensors or sparse deltas (`weight_sync = full | delta`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// Every tensor every time.
    Full,
    /// Changed elements only.
    Delta,
}

/// The content of a weight update.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightPayload {
    /// Every tensor (values already rounded to the wire dtype).
    Full(Arc<Vec<NamedTensor>>),
    /// Compressed changed elements since the previous version (see [`delta`]).
    Delta {
        /// The version this delta applies to (the previously published one).
        base: PolicyVersion,
        /// The dtype of the values.
        wire: WireDtype,
        /// The encoded delta.
        bytes: Arc<Vec<u8>>,
    },
}

impl WeightPayload {
    /// The payload that takes a receiver holding `old` (version `base`) to `new`. Both are
    /// rounded to `wire` and list the same tensors in the same order (sorted by name).
    pub fn encode(
        mode: SyncMode,
        wire: WireDtype,
        base: PolicyVersion,
        old: &[NamedTensor],
        new: &[NamedTensor],
    ) -> Self {
        match mode {
            SyncMode::Full => WeightPayload::Full(Arc::new(new.to_vec())),
            SyncMode::Delta => WeightPayload::Delta {
                base,
                wire,
                bytes: Arc::new(delta::encode(old, new, wire)),
            },
        }
    }

    /// Bytes on the wire (f32 values for full payloads of f32-exact tensors).
    pub fn wire_bytes(&self) -> usize {
        match self {
            WeightPayload::Full(t) => t.iter().map(|t| t.values.len() * 4).sum(),
            WeightPayload::Delta { bytes, .. } => bytes.len(),
        }
    }
}

/// New weights published by the trainer after an optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightUpdate {
    /// The version these weights are.
    pub version: PolicyVersion,
    /// The weights, full or as a delta from the previous version.
    pub payload: WeightPayload,
}

impl WeightUpdate {
    /// Brings `tensors`, which are version `held` (sorted by name), to this update's version: a
    /// full payload replaces them, a delta must apply to `held`. On an error `tensors` are
    /// unchanged.
    pub fn apply_to(
        &self,
        tensors: &mut Vec<NamedTensor>,
        held: PolicyVersion,
    ) -> Result<(), ProtocolError> {
        match &self.payload {
            WeightPayload::Full(full) => {
                let mut t = full.as_ref().clone();
                t.sort_by(|a, b| a.name.cmp(&b.name));
                *tensors = t;
            }
            WeightPayload::Delta { base, wire, bytes } => {
                if *base != held {
                    return Err(ProtocolError::OutOfOrder {
                        base: *base,
                        version: self.version,
                        held,
                    });
                }
                delta::apply(tensors, *wire, bytes)?;
            }
        }
        Ok(())
    }
}
