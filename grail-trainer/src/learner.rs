//! The learner: the policy being trained and its AdamW state, which change together, once per
//! optimizer step (gradient-norm clipping, then the update).

use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::Tensor;
use grail_core::model::CausalLm;

use crate::config::TrainerConfig;
use crate::error::{Result, TrainerError};
use crate::optimizer::FusedAdamW;

/// The policy (on an autodiff device) and its AdamW state.
pub struct Learner {
    model: CausalLm,
    optimizer: ModuleOptimizer,
}

impl Learner {
    /// `model` with a fresh AdamW under `config`'s hyper-parameters. The model must live on an
    /// autodiff device (`Device::autodiff()`).
    pub fn new(model: CausalLm, config: &TrainerConfig) -> Result<Self> {
        if !model.device().is_autodiff() {
            return Err(TrainerError::Input(
                "the policy model must live on an autodiff device (Device::autodiff())".into(),
            ));
        }
        let optimizer = FusedAdamW::new(
            config.adam_beta1 as f32,
            config.adam_beta2 as f32,
            config.adam_epsilon as f32,
            config.weight_decay as f32,
        )
        .init();
        Ok(Self { model, optimizer })
    }

    /// The same learner with the AdamW state saved at `path` (burn-pack) instead of a fresh one.
    pub(crate) fn load_optimizer(self, path: &Path) -> Result<Self> {
        let optimizer = self.optimizer.load(path).map_err(|e| {
            TrainerError::Input(format!(
                "{}: cannot load optimizer state: {e:?}",
                path.display()
            ))
        })?;
        Ok(Self {
            model: self.model,
            optimizer,
        })
    }

    /// The policy.
    pub fn model(&self) -> &CausalLm {
        &self.model
    }

    /// The AdamW state.
    pub fn optimizer(&self) -> &ModuleOptimizer {
        &self.optimizer
    }

    /// Clips `grads` to a global L2 norm of `max_grad_norm` (0: no clipping) and takes an AdamW
    /// step at learning rate `lr`; returns the norm before clipping.
    pub fn update(&mut self, lr: f64, mut grads: GradientsParams, max_grad_norm: f64) -> f64 {
        let grad_norm = clip_global_norm(&self.model, &mut grads, max_grad_norm);
        // burn's optimizer maps a module by value. The clone shares every tensor with the model
        // (nothing is copied), and the optimizer consumes the gradients parameter by parameter as
        // it writes the new weights, so the live tensors never exceed what the update starts with.
        self.model = self.optimizer.step(lr, self.model.clone(), grads);
        grad_norm
    }
}

/// Scales every gradient so their global L2 norm is at most `max_norm` (0 disables); returns the
/// norm before clipping.
pub fn clip_global_norm(model: &CausalLm, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    struct SumSquares<'a> {
        grads: &'a GradientsParams,
        total: f64,
    }
    impl ModuleVisitor for SumSquares<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                self.total += grail_kernels::sum_squares(g);
            }
        }
    }
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                let g = grail_kernels::scale(g, self.factor as f32);
                self.grads.register(param.id, g);
            }
        }
    }
    let mut sum = SumSquares { grads, total: 0.0 };
    model.visit(&mut sum);
    let norm = sum.total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let mut scale = Scale {
            grads,
            factor: max_norm / (norm + 1e-6),
        };
        model.visit(&mut scale);
    }
    norm
}
