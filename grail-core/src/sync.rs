//! Weight synchronisation between the trainer and the rollout workers.
//!
//! The trainer publishes a [`WeightUpdate`] after each optimizer step. Its payload is either every
//! tensor, or a **sparse delta**: the indices and new values of the elements whose value at the
//! *wire dtype* changed since the previous update, lz4-compressed. At bf16 (the default) most
//! elements do not change in a small optimizer step, so deltas are a fraction of the full size.
//!
//! Both sides keep the weights at the wire dtype: the [`WeightPublisher`] remembers what it last
//! sent, a worker's [`WeightState`] applies payloads in order, and after every update the two hold
//! exactly the same values (tested). Publisher and pool must start from the same weights.

use std::sync::Arc;

use crate::error::{GrailError, Result};
use crate::model::CausalLm;
use crate::types::{NamedTensor, PolicyVersion, PoolMessage, WeightPayload, WeightUpdate};

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

    fn value_bytes(self) -> usize {
        match self {
            WireDtype::F32 => 4,
            WireDtype::Bf16 => 2,
        }
    }
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
        let payload = match self.mode {
            SyncMode::Full => WeightPayload::Full(Arc::new(now.clone())),
            SyncMode::Delta => WeightPayload::Delta {
                base: self.last_version,
                wire: self.wire,
                bytes: Arc::new(encode_delta(&self.last, &now, self.wire)),
            },
        };
        self.last = now;
        self.last_version = version;
        WeightUpdate { version, payload }
    }

    /// Bytes a full update at the wire dtype would take (for the delta/full ratio).
    pub fn full_bytes(&self) -> usize {
        self.last.iter().map(|t| t.values.len()).sum::<usize>() * self.wire.value_bytes()
    }
}

fn push_value(raw: &mut Vec<u8>, v: f32, wire: WireDtype) {
    match wire {
        WireDtype::F32 => raw.extend(v.to_le_bytes()),
        WireDtype::Bf16 => raw.extend(half::bf16::from_f32(v).to_le_bytes()),
    }
}

/// Changed elements of every tensor, then lz4. Per tensor: a `u8` kind; sparse (0): a `u32`
/// count, the gaps between changed indices (`u32` each) and their new values at the wire dtype;
/// dense (1, when most elements changed and indices would cost more): every value.
fn encode_delta(old: &[NamedTensor], new: &[NamedTensor], wire: WireDtype) -> Vec<u8> {
    let mut raw = Vec::new();
    for (o, n) in old.iter().zip(new) {
        debug_assert_eq!(o.name, n.name);
        let changed: Vec<usize> = (0..n.values.len())
            .filter(|&i| o.values[i].to_bits() != n.values[i].to_bits())
            .collect();
        let sparse_bytes = changed.len() * (4 + wire.value_bytes());
        if sparse_bytes >= n.values.len() * wire.value_bytes() {
            raw.push(1);
            for &v in &n.values {
                push_value(&mut raw, v, wire);
            }
            continue;
        }
        raw.push(0);
        raw.extend((changed.len() as u32).to_le_bytes());
        let mut prev = 0usize;
        for &i in &changed {
            raw.extend(((i - prev) as u32).to_le_bytes());
            prev = i;
        }
        for &i in &changed {
            push_value(&mut raw, n.values[i], wire);
        }
    }
    lz4_flex::compress_prepend_size(&raw)
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
        match &update.payload {
            WeightPayload::Full(tensors) => {
                let mut t = tensors.as_ref().clone();
                t.sort_by(|a, b| a.name.cmp(&b.name));
                self.tensors = t;
            }
            WeightPayload::Delta { base, wire, bytes } => {
                if *base != self.version {
                    return Err(GrailError::Input(format!(
                        "weight delta from version {base} to {} applied on version {} (deltas must arrive in order)",
                        update.version, self.version
                    )));
                }
                self.apply_delta(*wire, bytes)?;
            }
        }
        self.version = update.version;
        Ok(())
    }

    fn apply_delta(&mut self, wire: WireDtype, bytes: &[u8]) -> Result<()> {
        let bad = |what: &str| GrailError::Input(format!("corrupt weight delta: {what}"));
        // The largest honest delta: every tensor dense. A bigger size prefix is corruption, and
        // must not become an allocation.
        let most: usize = self
            .tensors
            .iter()
            .map(|t| 5 + t.values.len() * (4 + wire.value_bytes()))
            .sum();
        let claimed = bytes
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| bad("truncated"))?;
        if claimed > most {
            return Err(bad(&format!(
                "claims {claimed} bytes, more than the {most} a full update of these tensors takes"
            )));
        }
        let raw = lz4_flex::decompress_size_prepended(bytes).map_err(|e| bad(&e.to_string()))?;
        let mut at = 0usize;
        let mut read = |n: usize| -> Result<&[u8]> {
            let s = raw.get(at..at + n).ok_or_else(|| bad("truncated"))?;
            at += n;
            Ok(s)
        };
        let u32_at = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let decode = |b: &[u8]| match wire {
            WireDtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            WireDtype::Bf16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        };
        // Decode and check everything first, so a corrupt delta leaves the weights untouched.
        let mut changes: Vec<Vec<(usize, f32)>> = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            let len = t.values.len();
            let idx: Vec<usize> = match read(1)?[0] {
                1 => (0..len).collect(),
                0 => {
                    let count = u32_at(read(4)?) as usize;
                    if count > len {
                        return Err(bad(&format!(
                            "{count} changes for the {len} values of `{}`",
                            t.name
                        )));
                    }
                    let mut idx = Vec::with_capacity(count);
                    let mut prev = 0usize;
                    for _ in 0..count {
                        prev += u32_at(read(4)?) as usize;
                        if prev >= len {
                            return Err(bad(&format!("index {prev} outside `{}`", t.name)));
                        }
                        idx.push(prev);
                    }
                    idx
                }
                k => return Err(bad(&format!("unknown tensor kind {k}"))),
            };
            let mut values = Vec::with_capacity(idx.len());
            for i in idx {
                values.push((i, decode(read(wire.value_bytes())?)));
            }
            changes.push(values);
        }
        if at != raw.len() {
            return Err(bad(
                "trailing bytes (tensor layout differs from the publisher's)",
            ));
        }
        for (t, values) in self.tensors.iter_mut().zip(changes) {
            // The baseline is rounded lazily, so a bf16 stream starts from the rounded weights.
            for v in &mut t.values {
                *v = wire.round(*v);
            }
            for (i, v) in values {
                t.values[i] = v;
            }
        }
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
