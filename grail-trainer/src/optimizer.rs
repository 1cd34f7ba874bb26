//! AdamW as one fused pass per parameter where the backend has the kernel.
//!
//! burn's `AdamW` is a dozen element-wise tensor ops per parameter (each a pass over memory and an
//! allocation). [`FusedAdamW`] does the same arithmetic, in the same order, in one pass
//! (`grail_kernels::adamw`), and falls back to burn's
//! `AdamW` on backends without the kernel. Its state is burn's `AdamWState`, so saved optimizer
//! state loads either way.

use burn::optim::{
    AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, ModuleOptimizer, Optimizer,
};
use burn::tensor::{Device, Tensor};
use grail_kernels::AdamWStep;
use grail_kernels::{adamw, supported, supported_dtype};

/// AdamW with a fused CPU kernel (and burn's implementation elsewhere).
#[derive(Clone)]
pub struct FusedAdamW {
    beta1: f32,
    beta2: f32,
    epsilon: f32,
    weight_decay: f32,
    fallback: AdamW,
}

impl FusedAdamW {
    /// AdamW with these hyper-parameters.
    pub fn new(beta1: f32, beta2: f32, epsilon: f32, weight_decay: f32) -> Self {
        let fallback = AdamWConfig::new()
            .with_beta_1(beta1)
            .with_beta_2(beta2)
            .with_epsilon(epsilon)
            .with_weight_decay(weight_decay)
            .build();
        Self {
            beta1,
            beta2,
            epsilon,
            weight_decay,
            fallback,
        }
    }

    /// The module optimizer that applies it to every parameter.
    pub fn init(self) -> ModuleOptimizer {
        ModuleOptimizer::from(self)
    }
}

impl Optimizer for FusedAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: f64,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let kernel = supported(&tensor.device())
            && supported_dtype(tensor.dtype())
            && supported_dtype(grad.dtype());
        if !kernel {
            return self.fallback.step(lr, tensor, grad, state);
        }
        let (m, v, time) = match state {
            Some(s) => (
                s.momentum.moment_1,
                s.momentum.moment_2,
                s.momentum.time + 1,
            ),
            None => (grad.zeros_like(), grad.zeros_like(), 1),
        };
        let step = AdamWStep {
            lr: lr as f32,
            beta1: self.beta1,
            beta2: self.beta2,
            epsilon: self.epsilon,
            weight_decay: self.weight_decay,
            time: time as i32,
        };
        let (tensor, moment_1, moment_2) = adamw(tensor, grad, m, v, step);
        let momentum = AdaptiveMomentumState {
            time,
            moment_1,
            moment_2,
            max_moment_2: None,
        };
        (tensor, Some(AdamWState { momentum }))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        AdamW::to_device(state, device)
    }
}
