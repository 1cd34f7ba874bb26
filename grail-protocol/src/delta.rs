//! The sparse-delta codec of weight updates (PULSE's encoding).
//!
//! A delta holds, per tensor, the positions whose value at the *wire dtype* changed since the
//! previous update and their **new** values: applying it overwrites, so it is bit-exact and safe
//! to replay. At bf16 most elements do not change in a small optimizer step, so deltas are a
//! fraction of the full size.
//!
//! Layout: a `u8` [`Compression`] tag, the `u64` size of the raw bytes, then the compressed raw
//! bytes. Raw, per tensor in order: a `u8` kind; sparse (0): a `u32` count, a `u8` index width
//! (1, 2 or 4 bytes: the narrowest that holds every gap), the gaps between sorted changed
//! indices (the first from 0) at that width, then the new values at the wire dtype; dense (1,
//! when most elements changed and indices would cost more): every value. Values are stored in
//! byte planes (every value's low byte, then every next byte), which compress better.

use crate::error::ProtocolError;
use crate::weights::{NamedTensor, WireDtype};

/// How a delta's raw bytes are compressed (the first byte of every delta says which).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// lz4 (the `lz4_flex` crate): the fastest to encode and decode.
    Lz4,
    /// zstd level 1: smaller deltas at a similar speed; the default.
    #[default]
    Zstd,
}

impl Compression {
    fn tag(self) -> u8 {
        match self {
            Compression::Lz4 => 1,
            Compression::Zstd => 2,
        }
    }
}

const ZSTD_LEVEL: i32 = 1;

/// Appends `values` at the wire dtype in byte planes: every value's first byte, then every
/// second byte, and so on. The planes that hold sign and exponent repeat a few byte values, which
/// the compressor sees as runs; interleaved, it would not.
fn push_planes(raw: &mut Vec<u8>, values: impl Iterator<Item = f32> + Clone, wire: WireDtype) {
    for plane in 0..wire.value_bytes() {
        raw.extend(values.clone().map(|v| match wire {
            WireDtype::F32 => v.to_le_bytes()[plane],
            WireDtype::Bf16 => half::bf16::from_f32(v).to_le_bytes()[plane],
        }));
    }
}

/// The narrowest width in bytes (1, 2 or 4) that holds every gap.
fn index_width(largest_gap: usize) -> u8 {
    match largest_gap {
        0..=0xff => 1,
        0x100..=0xffff => 2,
        _ => 4,
    }
}

/// The delta from `old` to `new` (the same tensors in the same order, rounded to `wire`),
/// compressed with zstd.
pub fn encode(old: &[NamedTensor], new: &[NamedTensor], wire: WireDtype) -> Vec<u8> {
    encode_with(old, new, wire, Compression::default())
}

/// [`encode`] with a chosen compression.
pub fn encode_with(
    old: &[NamedTensor],
    new: &[NamedTensor],
    wire: WireDtype,
    compression: Compression,
) -> Vec<u8> {
    let mut raw = Vec::new();
    for (o, n) in old.iter().zip(new) {
        debug_assert_eq!(o.name, n.name);
        let changed: Vec<usize> = (0..n.values.len())
            .filter(|&i| o.values[i].to_bits() != n.values[i].to_bits())
            .collect();
        let mut prev = 0usize;
        let gaps: Vec<usize> = changed
            .iter()
            .map(|&i| {
                let gap = i - prev;
                prev = i;
                gap
            })
            .collect();
        let width = index_width(gaps.iter().copied().max().unwrap_or(0));
        let sparse_bytes = changed.len() * (width as usize + wire.value_bytes());
        if sparse_bytes >= n.values.len() * wire.value_bytes() {
            raw.push(1);
            push_planes(&mut raw, n.values.iter().copied(), wire);
            continue;
        }
        raw.push(0);
        raw.extend((changed.len() as u32).to_le_bytes());
        raw.push(width);
        for gap in gaps {
            raw.extend(&(gap as u32).to_le_bytes()[..width as usize]);
        }
        push_planes(&mut raw, changed.iter().map(|&i| n.values[i]), wire);
    }
    let body = match compression {
        Compression::Lz4 => lz4_flex::compress(&raw),
        // Compressing a buffer in memory fails only when zstd cannot allocate.
        Compression::Zstd => zstd::bulk::compress(&raw, ZSTD_LEVEL)
            .unwrap_or_else(|e| panic!("zstd could not compress {} bytes: {e}", raw.len())),
    };
    let mut out = Vec::with_capacity(9 + body.len());
    out.push(compression.tag());
    out.extend((raw.len() as u64).to_le_bytes());
    out.extend(body);
    out
}

/// Applies the delta `bytes` to `tensors` (the ones it was encoded against, at `wire`). The
/// delta is read twice: once to check all of it, changing nothing, then to write the values; so
/// on an error `tensors` are unchanged, and no decoded copy of the values is held. A size larger
/// than a full update of these tensors is refused before it allocates.
pub fn apply(
    tensors: &mut [NamedTensor],
    wire: WireDtype,
    bytes: &[u8],
) -> Result<(), ProtocolError> {
    // The largest honest delta: every tensor dense. A bigger size is corruption, and must not
    // become an allocation.
    let most: usize = tensors
        .iter()
        .map(|t| 6 + t.values.len() * (4 + wire.value_bytes()))
        .sum();
    let (&tag, rest) = bytes.split_first().ok_or_else(|| corrupt("empty"))?;
    let claimed = rest
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| corrupt("truncated"))?;
    let claimed = match usize::try_from(claimed) {
        Ok(n) if n <= most => n,
        _ => {
            return Err(corrupt(&format!(
                "claims {claimed} bytes, more than the {most} a full update of these tensors takes"
            )));
        }
    };
    let body = &rest[8..];
    let raw = match tag {
        1 => lz4_flex::decompress(body, claimed).map_err(|e| corrupt(&e.to_string()))?,
        2 => zstd::bulk::decompress(body, claimed).map_err(|e| corrupt(&e.to_string()))?,
        t => return Err(corrupt(&format!("unknown compression tag {t}"))),
    };
    if raw.len() != claimed {
        return Err(corrupt(&format!(
            "{} bytes decompressed where {claimed} were announced",
            raw.len()
        )));
    }
    let layout: Vec<(String, usize)> = tensors
        .iter()
        .map(|t| (t.name.clone(), t.values.len()))
        .collect();
    walk(&raw, &layout, wire, |_, _, _| {})?;
    // The baseline is rounded lazily, so a bf16 stream starts from the rounded weights.
    for t in tensors.iter_mut() {
        for v in &mut t.values {
            *v = wire.round(*v);
        }
    }
    walk(&raw, &layout, wire, |t, i, v| tensors[t].values[i] = v)
}

fn corrupt(what: &str) -> ProtocolError {
    ProtocolError::CorruptDelta(what.to_string())
}

/// The raw bytes of a delta, read front to back.
struct Reader<'a> {
    raw: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        let end = self.at.checked_add(n).ok_or_else(|| corrupt("truncated"))?;
        let s = self
            .raw
            .get(self.at..end)
            .ok_or_else(|| corrupt("truncated"))?;
        self.at = end;
        Ok(s)
    }
}

/// A little-endian unsigned integer of 1 to 4 bytes.
fn uint(b: &[u8]) -> usize {
    b.iter()
        .rev()
        .fold(0usize, |acc, &x| (acc << 8) | x as usize)
}

/// Value `k` of `count` stored in byte planes.
fn plane_value(planes: &[u8], count: usize, k: usize, wire: WireDtype) -> f32 {
    let mut b = [0u8; 4];
    for (plane, byte) in b.iter_mut().take(wire.value_bytes()).enumerate() {
        *byte = planes[plane * count + k];
    }
    match wire {
        WireDtype::F32 => f32::from_le_bytes(b),
        WireDtype::Bf16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
    }
}

/// Reads a raw delta for tensors of `layout` (name, length), checking every count, width and
/// index, and calls `set(tensor, index, value)` for each value it holds.
fn walk(
    raw: &[u8],
    layout: &[(String, usize)],
    wire: WireDtype,
    mut set: impl FnMut(usize, usize, f32),
) -> Result<(), ProtocolError> {
    let vb = wire.value_bytes();
    let mut r = Reader { raw, at: 0 };
    for (t, (name, len)) in layout.iter().enumerate() {
        let len = *len;
        match r.take(1)?[0] {
            1 => {
                let planes = r.take(len * vb)?;
                for i in 0..len {
                    set(t, i, plane_value(planes, len, i, wire));
                }
            }
            0 => {
                let count = uint(r.take(4)?);
                if count > len {
                    return Err(corrupt(&format!(
                        "{count} changes for the {len} values of `{name}`"
                    )));
                }
                let width = r.take(1)?[0] as usize;
                if ![1, 2, 4].contains(&width) {
                    return Err(corrupt(&format!("index width {width} for `{name}`")));
                }
                let gaps = r.take(count * width)?;
                let planes = r.take(count * vb)?;
                let mut prev = 0usize;
                for k in 0..count {
                    let gap = uint(&gaps[k * width..(k + 1) * width]);
                    // Indices are strictly increasing: only the first may be position 0.
                    if k > 0 && gap == 0 {
                        return Err(corrupt(&format!("repeated index {prev} in `{name}`")));
                    }
                    prev = prev
                        .checked_add(gap)
                        .filter(|&i| i < len)
                        .ok_or_else(|| corrupt(&format!("an index outside `{name}`")))?;
                    set(t, prev, plane_value(planes, count, k, wire));
                }
            }
            k => return Err(corrupt(&format!("unknown tensor kind {k}"))),
        }
    }
    if r.at != raw.len() {
        return Err(corrupt(
            "trailing bytes (tensor layout differs from the publisher's)",
        ));
    }
    Ok(())
}
