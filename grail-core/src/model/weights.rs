//! Where a model's tensors come from when it is built (a checkpoint, a seeded random init, the
//! tensors of a weight update), and the model's tensors as a weight update carries them.

use burn::module::{Param, ParamId};
use burn::tensor::{Device, Tensor, TensorData};
use grail_protocol::{NamedTensor, WireDtype};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

use crate::error::Result;
use crate::model::CausalLm;

/// A provider of named tensors for [`CausalLm::build`](super::CausalLm::build).
pub trait WeightSource {
    /// The f32 values of tensor `name`, which must have shape `shape`.
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;

    /// The device the parameters are created on.
    fn device(&self) -> Device;

    /// Called once every tensor was taken: a checkpoint reports tensors nobody asked for.
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }

    /// Tensor `name` as a trainable parameter.
    fn param<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Result<Param<Tensor<D>>>
    where
        Self: Sized,
    {
        let values = self.take(name, &shape)?;
        let tensor = Tensor::from_data(TensorData::new(values, shape), &self.device());
        let mut param = Param::from_tensor(tensor);
        // Ids derived from the name, so a reloaded model matches its saved optimizer state.
        param.id = ParamId::from(stable_id(name));
        Ok(param)
    }
}

/// FNV-1a hash of a tensor name: a parameter id that is the same in every process.
pub fn stable_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Seeded initialisation as Hugging Face does it: linear and embedding weights ~ N(0, std²),
/// biases 0, norm gains 1. The same seed gives the same model on every backend.
pub struct RandomInit {
    rng: StdRng,
    normal: Normal<f32>,
    device: Device,
}

impl RandomInit {
    /// A source drawing from N(0, `std`²) with a fixed seed.
    pub fn new(seed: u64, std: f64, device: &Device) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            normal: Normal::new(0.0, std as f32).expect("std must be finite and non-negative"),
            device: device.clone(),
        }
    }
}

impl WeightSource for RandomInit {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let n = shape.iter().product();
        Ok(if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| self.normal.sample(&mut self.rng)).collect()
        })
    }

    fn device(&self) -> Device {
        self.device.clone()
    }
}

/// Builds a model from the tensors of a [`WeightUpdate`](grail_protocol::WeightUpdate) (how rollout
/// workers pick up new weights). Missing, extra or mis-shaped tensors are errors.
pub struct NamedTensorSource<'a> {
    tensors: std::collections::HashMap<&'a str, &'a NamedTensor>,
    taken: usize,
    device: Device,
}

impl<'a> NamedTensorSource<'a> {
    /// A source over `tensors`, creating parameters on `device`.
    pub fn new(tensors: &'a [NamedTensor], device: &Device) -> Self {
        Self {
            tensors: tensors.iter().map(|t| (t.name.as_str(), t)).collect(),
            taken: 0,
            device: device.clone(),
        }
    }
}

impl WeightSource for NamedTensorSource<'_> {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let path = std::path::PathBuf::from("<weight update>");
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| crate::GrailError::MissingTensor {
                path: path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
            })?;
        if t.shape != shape {
            return Err(crate::GrailError::ShapeMismatch {
                path,
                name: name.to_string(),
                expected: shape.to_vec(),
                found: t.shape.clone(),
            });
        }
        self.taken += 1;
        Ok(t.values.clone())
    }

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn finish(&mut self) -> Result<()> {
        if self.taken == self.tensors.len() {
            return Ok(());
        }
        Err(crate::GrailError::UnexpectedTensors {
            path: "<weight update>".into(),
            names: vec![format!(
                "{} tensors not used by the model",
                self.tensors.len() - self.taken
            )],
        })
    }
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
