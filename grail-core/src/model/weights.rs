//! Where a model's tensors come from when it is built (a checkpoint, a seeded random init, the
//! tensors of a weight update), and the model's tensors as a weight update carries them.

use std::collections::HashMap;

use burn::module::{Param, ParamId};
use burn::tensor::{Device, FloatDType, Tensor, TensorData};
use grail_protocol::{NamedTensor, WireDtype};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

use super::tensor_names::{TensorId, TensorRole};
use crate::error::Result;
use crate::model::{CausalLm, ModelConfig};

/// A provider of the model's tensors for [`CausalLm::build`](super::CausalLm::build), asked for
/// each by its [`TensorId`] (whose [`name`](TensorId::name) is the Hugging Face one).
pub trait WeightSource {
    /// The f32 values of tensor `id`, which must have shape `shape`.
    fn take(&mut self, id: TensorId, shape: &[usize]) -> Result<Vec<f32>>;

    /// The device the parameters are created on.
    fn device(&self) -> Device;

    /// Called once every tensor was taken: a checkpoint reports tensors nobody asked for.
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }

    /// Tensor `id` as a trainable parameter.
    fn param<const D: usize>(&mut self, id: TensorId, shape: [usize; D]) -> Result<Param<Tensor<D>>>
    where
        Self: Sized,
    {
        let values = self.take(id, &shape)?;
        let tensor = Tensor::from_data(TensorData::new(values, shape), &self.device());
        let mut param = Param::from_tensor(tensor);
        // Ids derived from the name, so a reloaded model matches its saved optimizer state.
        param.id = ParamId::from(stable_id(&id.name()));
        Ok(param)
    }
}

/// Every tensor of a model, taken from a source in [`TensorId::all`] order and waiting for
/// [`CausalLm::build`] to place it in its layer.
pub(crate) struct Taken {
    vectors: HashMap<TensorId, Param<Tensor<1>>>,
    matrices: HashMap<TensorId, Param<Tensor<2>>>,
}

impl Taken {
    /// Takes every tensor of a model of `config` from `source`, then lets the source report
    /// tensors nobody asked for.
    pub(crate) fn all(config: &ModelConfig, source: &mut impl WeightSource) -> Result<Self> {
        let (mut vectors, mut matrices) = (HashMap::new(), HashMap::new());
        for id in TensorId::all(config) {
            match id.shape(config)[..] {
                [n] => {
                    vectors.insert(id, source.param(id, [n])?);
                }
                [rows, cols] => {
                    matrices.insert(id, source.param(id, [rows, cols])?);
                }
                ref other => unreachable!("{id:?} has shape {other:?}"),
            }
        }
        source.finish()?;
        Ok(Self { vectors, matrices })
    }

    /// Vector `id`, if the model has it (a bias or q/k norm the family may lack).
    pub(crate) fn optional_vector(&mut self, id: TensorId) -> Option<Param<Tensor<1>>> {
        self.vectors.remove(&id)
    }

    /// Matrix `id`, which the table lists for this config.
    pub(crate) fn matrix(&mut self, id: TensorId) -> Param<Tensor<2>> {
        self.optional_matrix(id)
            .unwrap_or_else(|| panic!("{id:?} is not a matrix of this model"))
    }

    /// Matrix `id`, if the model has it (an lm_head not tied to the embeddings).
    pub(crate) fn optional_matrix(&mut self, id: TensorId) -> Option<Param<Tensor<2>>> {
        self.matrices.remove(&id)
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
    fn take(&mut self, id: TensorId, shape: &[usize]) -> Result<Vec<f32>> {
        let n = shape.iter().product();
        Ok(match id.role() {
            TensorRole::NormGain => vec![1.0; n],
            TensorRole::Bias => vec![0.0; n],
            TensorRole::Weight => (0..n).map(|_| self.normal.sample(&mut self.rng)).collect(),
        })
    }

    fn device(&self) -> Device {
        self.device.clone()
    }
}

/// A source whose matrices (embeddings, projections, lm_head: every 2-D tensor) are held at bf16,
/// each cast as it is taken, so the model built never holds them all at f32; norms and biases
/// stay f32, and so do the activations. Where the fused kernels take bf16 weights (Flex: they
/// widen each as they read it) a model whose weights already are bf16 values (a rollout copy of
/// weights sent at bf16) computes bit for bit what the f32 model would, in half the memory and
/// reading half the bytes each decode step; elsewhere the weights are widened per op. For
/// inference: the matrices are no longer f32 parameters to train.
pub struct Bf16Matrices<S>(pub S);

impl<S: WeightSource> WeightSource for Bf16Matrices<S> {
    fn take(&mut self, id: TensorId, shape: &[usize]) -> Result<Vec<f32>> {
        self.0.take(id, shape)
    }

    fn device(&self) -> Device {
        self.0.device()
    }

    fn finish(&mut self) -> Result<()> {
        self.0.finish()
    }

    fn param<const D: usize>(
        &mut self,
        id: TensorId,
        shape: [usize; D],
    ) -> Result<Param<Tensor<D>>> {
        let param = self.0.param(id, shape)?;
        Ok(if D == 2 {
            param.map(|t| t.cast(FloatDType::BF16))
        } else {
            param
        })
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
    fn take(&mut self, id: TensorId, shape: &[usize]) -> Result<Vec<f32>> {
        let name = id.name();
        let path = std::path::PathBuf::from("<weight update>");
        let t =
            self.tensors
                .get(name.as_str())
                .ok_or_else(|| crate::GrailError::MissingTensor {
                    path: path.clone(),
                    name: name.clone(),
                    expected: shape.to_vec(),
                })?;
        if t.shape != shape {
            return Err(crate::GrailError::ShapeMismatch {
                path,
                name,
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
