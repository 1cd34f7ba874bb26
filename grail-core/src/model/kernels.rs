//! The one choice every op of the model makes: grail-kernels' fused kernel or plain tensor math.

use burn::tensor::Tensor;

/// Which implementation a layer's ops run. Each layer holds one (set model-wide by
/// [`CausalLm::with_fused_ops`](super::CausalLm::with_fused_ops)) and asks it at the op, so the
/// forward passes carry no flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// grail-kernels' fused ops wherever the weights' device and dtype have them, the reference
    /// math elsewhere.
    #[default]
    Fused,
    /// burn tensor math only: the definition the fused kernels are checked against.
    Reference,
}

impl Kernels {
    /// `Fused` when `on`, else `Reference`.
    pub fn fused_if(on: bool) -> Self {
        if on {
            Kernels::Fused
        } else {
            Kernels::Reference
        }
    }

    /// Whether an op over `weight` runs the fused kernel: asked for, and the weight's device and
    /// dtype have it (activations are f32 and on the weights' device).
    pub fn fuse<const D: usize>(self, weight: &Tensor<D>) -> bool {
        self == Kernels::Fused && grail_kernels::supported_weight(&weight.device(), weight.dtype())
    }
}
