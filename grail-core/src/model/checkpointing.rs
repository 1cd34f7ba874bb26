//! Gradient (activation) checkpointing, as transformers' `gradient_checkpointing`: the forward
//! keeps only each decoder layer's input, and the backward recomputes the layers one at a time
//! from those inputs, last to first. Only one layer's activations are alive at once instead of
//! every layer's, for one more forward of the layers per step; the gradients are the same.

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Gradients, Int, Tensor};

use super::CausalLm;
use super::attention::AttentionMode;
use super::layout::{Layout, Segment};
use crate::error::Result;

/// What [`CausalLm::forward_hidden_checkpointed`] keeps for the backward: the ids, the layout
/// and each decoder layer's input, off the autodiff graph.
pub struct LayerInputs {
    ids: Tensor<2, Int>,
    positions: Vec<usize>,
    rows: usize,
    segments: Option<Vec<Segment>>,
    /// The input of decoder layer `l`, without autodiff.
    inputs: Vec<Tensor<3>>,
    /// The last layer's output as an autodiff leaf: the graph the caller's loss builds (final
    /// norm, lm_head, loss) starts here.
    last: Tensor<3>,
}

/// Packed rows attend per segment; a padded batch is one causal attention. No KV cache.
fn mode(segments: Option<&[Segment]>) -> AttentionMode<'_> {
    match segments {
        None => AttentionMode::Padded,
        Some(segments) => AttentionMode::Segments {
            segments,
            caches: None,
        },
    }
}

impl CausalLm {
    /// [`forward_hidden`](CausalLm::forward_hidden) with gradient checkpointing, for a model on
    /// an autodiff device: the decoder layers run without autodiff (their inputs are kept) and
    /// only the final norm is on the graph. Compute the loss from the returned hidden states,
    /// call `backward()` on it, and give the gradients to [`LayerInputs::backward`], which
    /// recomputes the layers and returns every parameter's gradient.
    pub fn forward_hidden_checkpointed(
        &self,
        ids: Tensor<2, Int>,
        layout: &Layout,
    ) -> Result<(Tensor<3>, LayerInputs)> {
        let [rows, cols] = ids.dims();
        let (positions, segments) = layout.plan(rows, cols)?;
        let frozen = self.valid();
        let (cos, sin) = frozen.rope_tables(&positions, rows);
        let mut x = frozen
            .model
            .embed_tokens
            .forward(ids.clone().without_autodiff());
        let mut inputs = Vec::with_capacity(frozen.model.layers.len());
        for (l, layer) in frozen.model.layers.iter().enumerate() {
            inputs.push(x.clone());
            x = layer.forward(x, &cos, &sin, mode(segments.as_deref()), l);
        }
        let last = x.autodiff().require_grad();
        let hidden = self.model.norm.forward(last.clone());
        let kept = LayerInputs {
            ids,
            positions,
            rows,
            segments,
            inputs,
            last,
        };
        Ok((hidden, kept))
    }
}

impl LayerInputs {
    /// Finishes the backward that `grads` (the loss's `backward()`) began at the final norm:
    /// recomputes each decoder layer of `model` (the model whose forward kept these inputs) from
    /// its input with autodiff, last to first, carrying the gradient through it, then through the
    /// embeddings. Returns the gradient of every parameter, summed where a tensor is used twice
    /// (tied embeddings).
    pub fn backward(self, model: &CausalLm, mut grads: Gradients) -> GradientsParams {
        let upstream = self.last.grad_remove(&mut grads);
        let mut accum = GradientsAccumulator::<CausalLm>::new();
        accum.accumulate(model, GradientsParams::from_grads(grads, model));
        // A loss that does not reach the hidden states leaves the layers without gradient.
        let Some(mut upstream) = upstream else {
            return accum.grads();
        };
        let (cos, sin) = model.rope_tables(&self.positions, self.rows);
        for (l, input) in self.inputs.into_iter().enumerate().rev() {
            let x = input.autodiff().require_grad();
            let layer = &model.model.layers[l];
            let y = layer.forward(x.clone(), &cos, &sin, mode(self.segments.as_deref()), l);
            // d/dy Σ(y ⊙ upstream) = upstream: the layer's backward with the gradient so far.
            let mut layer_grads = (y * upstream).sum().backward();
            upstream = x
                .grad_remove(&mut layer_grads)
                .expect("a decoder layer's output depends on its input");
            accum.accumulate(model, GradientsParams::from_grads(layer_grads, model));
        }
        let embedded = model.model.embed_tokens.forward(self.ids);
        let embedding_grads = (embedded * upstream).sum().backward();
        accum.accumulate(model, GradientsParams::from_grads(embedding_grads, model));
        accum.grads()
    }
}
