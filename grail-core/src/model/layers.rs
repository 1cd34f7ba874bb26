//! The building blocks of the decoder, each holding its weights in Hugging Face's shapes so that a
//! checkpoint maps onto them name by name (a rollout copy on the CPU holds its matrices in panel
//! order: `row_major_weight` reads them in Hugging Face's layout).

use burn::module::{Module, Param};
use burn::tensor::activation::silu;
use burn::tensor::{DType, Device, FloatDType, Int, Tensor, TensorCreationOptions, TensorData};

use super::kernels::Kernels;

/// A dense layer `y = x · Wᵀ + b` with `W` `[out, in]` as Hugging Face stores it (or in panel
/// order, see [`Linear::panels`]).
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
    /// The weight is held in panel order ([`grail_kernels::panel_order`]) for the CPU's decode
    /// kernel: a rollout copy ([`CausalLm::with_panel_matrices`](super::CausalLm::with_panel_matrices)).
    /// burn records (`into_record`, `save_file`) carry no such flag: they hold the panel order.
    #[module(skip)]
    pub panels: bool,
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
            panels: false,
        }
    }

    /// Applies the layer to the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        project(
            x,
            self.weight.val(),
            self.bias.as_ref().map(Param::val),
            self.kernels,
            self.panels,
        )
    }

    /// The weight `[out_features, in_features]` in Hugging Face's row-major layout, whatever
    /// order it is held in.
    pub fn row_major_weight(&self) -> Tensor<2> {
        row_major(self.weight.val(), self.panels)
    }

    /// Holds the weight in panel order when its output features fill whole panels.
    pub(crate) fn hold_in_panels(&mut self) {
        hold_in_panels(&mut self.weight, &mut self.panels);
    }
}

/// Reorders `weight` into panel order (and sets `panels`) when its rows fill whole panels.
fn hold_in_panels(weight: &mut Param<Tensor<2>>, panels: &mut bool) {
    if !*panels && weight.dims()[0].is_multiple_of(grail_kernels::PANEL) {
        *weight = take_param(weight).map(panel_order);
        *panels = true;
    }
}

/// The param out of `slot` (an empty one left there), so that its tensor has no other handle
/// and can be reordered without a copy of the old layout staying alive.
fn take_param(slot: &mut Param<Tensor<2>>) -> Param<Tensor<2>> {
    let device = slot.device();
    std::mem::replace(slot, Param::from_tensor(Tensor::empty([0, 0], &device)))
}

/// `w` in panel order, stored contiguously (the CPU kernel reads the buffer as it lies). The
/// host's f32 and bf16 matrices are reordered in one copy (the lm_head is the largest matrix:
/// a round trip through tensor ops would hold it four times at once).
fn panel_order(w: Tensor<2>) -> Tensor<2> {
    let ([out, inp], device, trained) = (w.dims(), w.device(), w.is_require_grad());
    let data = w.into_data();
    let options = TensorCreationOptions::new(device).with_dtype(data.dtype());
    let data = match data.dtype() {
        DType::F32 => reordered::<f32>(&data, out, inp),
        DType::BF16 => reordered::<half::bf16>(&data, out, inp),
        _ => grail_kernels::panel_order(Tensor::from_data(data, options.clone())).into_data(),
    };
    let packed = Tensor::from_data(data, options);
    if trained {
        packed.require_grad()
    } else {
        packed
    }
}

/// The values of `data` `[out, inp]` (of element type `E`) in panel order.
fn reordered<E: burn::tensor::Element>(data: &TensorData, out: usize, inp: usize) -> TensorData {
    let values = data.as_slice::<E>().expect("the caller matched the dtype");
    TensorData::new(grail_kernels::to_panel_order(values, out, inp), [out, inp])
}

/// `w` (held in panel order when `panels`) in row-major layout.
pub(crate) fn row_major(w: Tensor<2>, panels: bool) -> Tensor<2> {
    if panels {
        grail_kernels::row_order(w)
    } else {
        w
    }
}

/// `x · weightᵀ + bias` over the last dimension, with `weight` `[out, in]`. The fused kernel
/// multiplies by the weight in place and its weight gradient comes out contiguous (see
/// [`grail_kernels::linear`]).
/// A `weight` held in panel order (`panels`) goes through the panel kernel, or back to row-major
/// where a gradient must flow or the fused kernels are off.
pub(crate) fn project<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    kernels: Kernels,
    panels: bool,
) -> Tensor<D> {
    let dims = x.dims();
    let in_features = dims[D - 1];
    let rows = x.shape().num_elements() / in_features;
    let out_features = weight.dims()[0];
    let x = x.reshape([rows, in_features]);
    let y = if kernels.fuse(&weight) {
        if panels && !x.device().is_autodiff() {
            grail_kernels::linear_panels(x, weight)
        } else {
            grail_kernels::linear(x, row_major(weight, panels))
        }
    } else {
        // bf16 matrices (built through `Bf16Matrices`) meet the f32 activations widened.
        x.matmul(row_major(weight, panels).cast(FloatDType::F32).transpose())
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
    /// The table is held in panel order: it is the tied lm_head of a rollout copy (see
    /// [`Linear::panels`]); lookups gather each row's values from its panel.
    #[module(skip)]
    pub panels: bool,
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
            panels: false,
        }
    }

    /// Looks up ids `[rows, cols]`, giving `[rows, cols, hidden]`.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [rows, cols] = ids.dims();
        let n = rows * cols;
        let weight = self.weight.val();
        let [vocab, hidden] = weight.dims();
        let ids = ids.reshape([n]);
        let found = if self.panels {
            // Value h of token t sits at (t / 16) · hidden · 16 + h · 16 + t % 16.
            let lanes = grail_kernels::PANEL as i64;
            let start = ids
                .clone()
                .div_scalar(lanes)
                .mul_scalar(hidden as i64 * lanes)
                + ids.remainder_scalar(lanes);
            let along =
                Tensor::<1, Int>::arange(0..hidden as i64, &weight.device()).mul_scalar(lanes);
            let at = start.reshape([n, 1]) + along.reshape([1, hidden]);
            weight
                .reshape([vocab * hidden])
                .select(0, at.reshape([n * hidden]))
        } else {
            weight.select(0, ids).reshape([n * hidden])
        };
        found.cast(FloatDType::F32).reshape([rows, cols, hidden])
    }

    /// The table `[vocab, hidden]` in row-major layout, whatever order it is held in.
    pub fn row_major_weight(&self) -> Tensor<2> {
        row_major(self.weight.val(), self.panels)
    }

    /// Holds the table in panel order (for the logits of a tied lm_head) when the vocabulary
    /// fills whole panels.
    pub(crate) fn hold_in_panels(&mut self) {
        hold_in_panels(&mut self.weight, &mut self.panels);
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
