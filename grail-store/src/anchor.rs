//! Anchor payloads: every tensor as safetensors at the wire dtype (bf16 or f32), so an anchor is
//! also a checkpoint any safetensors reader can open.

use std::collections::HashMap;

use grail_protocol::{NamedTensor, WireDtype};
use safetensors::{Dtype, SafeTensors};

fn dtype(wire: WireDtype) -> Dtype {
    match wire {
        WireDtype::F32 => Dtype::F32,
        WireDtype::Bf16 => Dtype::BF16,
    }
}

/// `tensors` (rounded to `wire`) as safetensors bytes.
pub fn encode(tensors: &[NamedTensor], wire: WireDtype) -> Result<Vec<u8>, String> {
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| wire.to_le_bytes(&t.values))
        .collect();
    let views = tensors
        .iter()
        .zip(&data)
        .map(|(t, bytes)| {
            safetensors::tensor::TensorView::new(dtype(wire), t.shape.clone(), bytes)
                .map(|v| (t.name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(metadata)).map_err(|e| e.to_string())
}

/// The tensors of an anchor, sorted by name; an error says what is wrong with the bytes.
pub fn decode(bytes: &[u8], wire: WireDtype) -> Result<Vec<NamedTensor>, String> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut tensors = Vec::with_capacity(st.len());
    for (name, view) in st.tensors() {
        if view.dtype() != dtype(wire) {
            return Err(format!(
                "tensor `{name}` is {:?}, the run's weights travel as {wire:?}",
                view.dtype()
            ));
        }
        tensors.push(NamedTensor {
            name,
            shape: view.shape().to_vec(),
            values: wire.from_le_bytes(view.data()),
        });
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(tensors)
}
