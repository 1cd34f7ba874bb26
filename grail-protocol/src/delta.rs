//! The sparse-delta codec of weight updates.
//!
//! A delta holds the indices and new values of the elements whose value at the *wire dtype*
//! changed since the previous update, lz4-compressed. At bf16 most elements do not change in a
//! small optimizer step, so deltas are a fraction of the full size.
//!
//! Layout before compression, per tensor in order: a `u8` kind; sparse (0): a `u32` count, the
//! gaps between changed indices (`u32` each) and their new values at the wire dtype; dense (1,
//! when most elements changed and indices would cost more): every value. lz4 prepends the
//! uncompressed size.

use crate::error::ProtocolError;
use crate::weights::{NamedTensor, WireDtype};

fn push_value(raw: &mut Vec<u8>, v: f32, wire: WireDtype) {
    match wire {
        WireDtype::F32 => raw.extend(v.to_le_bytes()),
        WireDtype::Bf16 => raw.extend(half::bf16::from_f32(v).to_le_bytes()),
    }
}

/// The delta from `old` to `new`: the same tensors in the same order, rounded to `wire`.
pub fn encode(old: &[NamedTensor], new: &[NamedTensor], wire: WireDtype) -> Vec<u8> {
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

/// Applies the delta `bytes` to `tensors` (the ones it was encoded against, at `wire`). The
/// whole delta is decoded and checked before any value changes, so on an error `tensors` are
/// unchanged; a size prefix larger than a full update of these tensors is refused before it
/// allocates.
pub fn apply(
    tensors: &mut [NamedTensor],
    wire: WireDtype,
    bytes: &[u8],
) -> Result<(), ProtocolError> {
    let bad = |what: &str| ProtocolError::CorruptDelta(what.to_string());
    // The largest honest delta: every tensor dense. A bigger size prefix is corruption, and
    // must not become an allocation.
    let most: usize = tensors
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
    let mut read = |n: usize| -> Result<&[u8], ProtocolError> {
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
    let mut changes: Vec<Vec<(usize, f32)>> = Vec::with_capacity(tensors.len());
    for t in tensors.iter() {
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
    for (t, values) in tensors.iter_mut().zip(changes) {
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
