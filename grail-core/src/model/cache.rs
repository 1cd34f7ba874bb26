//! The key/value cache of one sequence, owned by the caller (one per sequence slot) so that one
//! model serves many sequences at once.

use burn::tensor::Tensor;

/// Keys and values of every layer for the tokens a sequence has seen so far.
///
/// Each layer holds `k`, `v` of shape `[1, num_kv_heads, len, head_dim]` (after RoPE for keys).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
        }
    }

    /// Number of tokens cached (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops everything (e.g. to reuse the slot for a new sequence).
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }

    /// Appends new keys/values of `layer` and returns the full keys/values to attend to.
    /// The length advances once the last layer has been appended.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: Tensor<4>,
        v: Tensor<4>,
    ) -> (Tensor<4>, Tensor<4>) {
        let new = k.dims()[2];
        let (k, v) = match self.layers[layer].take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        if layer + 1 == self.layers.len() {
            self.len += new;
        }
        (k, v)
    }
}
