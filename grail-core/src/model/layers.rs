//! The building blocks of the decoder, each holding its weights in Hugging Face layout so that a
//! checkpoint maps onto them name by name.

use burn::module::{Module, Param};
use burn::tensor::activation::silu;
use burn::tensor::{Device, FloatDType, Int, Tensor};

use super::kernels::Kernels;

/// A dense layer `y = x · Wᵀ + b` with `W` stored as Hugging Face stores it: `[out, in]`.
///
/// # Shapes
/// - input `[..., in]`, output `[..., out]`.
#[derive(Module, Debug)]
pub struct Linear {
    /// `[out_features, in_features]`.
    pub weight: Param<Tensor<2>>,
    /// `[out_features]`, if the layer has a bias.
    pub bias: Option<Param<Tensor<1>>>,
    /// The fused linear kernel or `matmul`.
    #[module(skip)]
    pub kernels: Kernels,
}

impl Linear {
    /// A layer with weights drawn from N(0, std²) (biases zero), as HF initialises them.
    pub fn init(
        in_features: usize,
        out_features: usize,
        bias: bool,
        std: f64,
        device: &Device,
    ) -> Self {
        let weight = Tensor::random(
            [out_features, in_features],
            burn::tensor::Distribution::Normal(0.0, std),
            device,
        );
        Self {
            weight: Param::from_tensor(weight),
            bias: bias.then(|| Param::from_tensor(Tensor::zeros([out_features], device))),
            kernels: Kernels::default(),
        }
    }

    /// Applies the layer to the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        project(
            x,
            self.weight.val(),
            self.bias.as_ref().map(Param::val),
            self.kernels,
        )
    }
}

/// `x · weightᵀ + bias` over the last dimension, with `weight` `[out, in]`. The fused kernel
/// multiplies by the weight in place and its weight gradient comes out contiguous (see
/// [`grail_kernels::linear`]).
pub(crate) fn project<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    kernels: Kernels,
) -> Tensor<D> {
    let dims = x.dims();
    let in_features = dims[D - 1];
    let rows = x.shape().num_elements() / in_features;
    let out_features = weight.dims()[0];
    let x = x.reshape([rows, in_features]);
    let y = if kernels.fuse(&weight) {
        grail_kernels::linear(x, weight)
    } else {
        // bf16 matrices (built through `Bf16Matrices`) meet the f32 activations widened.
        x.matmul(weight.cast(FloatDType::F32).transpose())
    };
    let y = match bias {
        Some(b) => y + b.unsqueeze::<2>(),
        None => y,
    };
    let mut out = dims;
    out[D - 1] = out_features;
    y.reshape(out)
}

/// Root-mean-square normalisation as Hugging Face computes it:
/// `y = w ⊙ x / sqrt(mean(x²) + eps)` over the last dimension (in f32).
///
/// # Shapes
/// - input and output `[..., hidden]`; `weight` `[hidden]`.
#[derive(Module, Debug)]
pub struct RmsNorm {
    /// Per-channel gain, `[hidden]`.
    pub weight: Param<Tensor<1>>,
    /// Added to the mean square before the square root.
    pub eps: f64,
    /// One fused kernel (forward and backward) or the tensor math.
    #[module(skip)]
    pub kernels: Kernels,
}

impl RmsNorm {
    /// A norm with unit gain.
    pub fn init(hidden: usize, eps: f64, device: &Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([hidden], device)),
            eps,
            kernels: Kernels::default(),
        }
    }

    /// Normalises the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let weight = self.weight.val();
        if self.kernels.fuse(&weight) {
            let dims = x.dims();
            let c = dims[D - 1];
            let n = x.shape().num_elements() / c.max(1);
            return grail_kernels::rms_norm(x.reshape([n, c]), weight, self.eps as f32)
                .reshape(dims);
        }
        let inv_rms = (x.clone().square().mean_dim(D - 1) + self.eps)
            .sqrt()
            .recip();
        x * inv_rms * weight.unsqueeze()
    }
}

/// Token embedding table, `[vocab, hidden]`.
#[derive(Module, Debug)]
pub struct Embedding {
    /// `[vocab_size, hidden_size]`.
    pub weight: Param<Tensor<2>>,
}

impl Embedding {
    /// A table drawn from N(0, std²).
    pub fn init(vocab: usize, hidden: usize, std: f64, device: &Device) -> Self {
        let weight = Tensor::random(
            [vocab, hidden],
            burn::tensor::Distribution::Normal(0.0, std),
            device,
        );
        Self {
            weight: Param::from_tensor(weight),
        }
    }

    /// Looks up ids `[rows, cols]`, giving `[rows, cols, hidden]`.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [rows, cols] = ids.dims();
        let weight = self.weight.val();
        let hidden = weight.dims()[1];
        weight
            .select(0, ids.reshape([rows * cols]))
            .cast(FloatDType::F32)
            .reshape([rows, cols, hidden])
    }
}

/// The SwiGLU MLP of Qwen2/Llama: `down(silu(gate(x)) ⊙ up(x))`.
#[derive(Module, Debug)]
pub struct Mlp {
    /// hidden → intermediate, through SiLU.
    pub gate_proj: Linear,
    /// hidden → intermediate, linear branch.
    pub up_proj: Linear,
    /// intermediate → hidden.
    pub down_proj: Linear,
    /// `silu(gate) · up` as one kernel that keeps only its two inputs for backward, or the
    /// tensor math.
    #[module(skip)]
    pub kernels: Kernels,
}

impl Mlp {
    /// Applies the MLP to `[..., hidden]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let gate = self.gate_proj.forward(x.clone());
        let up = self.up_proj.forward(x);
        self.down_proj.forward(self.swiglu(gate, up))
    }

    /// `silu(gate) ⊙ up`.
    fn swiglu<const D: usize>(&self, gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
        if !self.kernels.fuse(&self.gate_proj.weight.val()) {
            return silu(gate) * up;
        }
        let dims = gate.dims();
        let i = dims[D - 1];
        let n = gate.shape().num_elements() / i.max(1);
        grail_kernels::swiglu(gate.reshape([n, i]), up.reshape([n, i])).reshape(dims)
    }

    /// Sets the implementation of every op of the MLP.
    pub(crate) fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
        for proj in [&mut self.gate_proj, &mut self.up_proj, &mut self.down_proj] {
            proj.kernels = kernels;
        }
    }
}
