//! The key/value cache of one sequence, owned by the caller (one per sequence slot) so that one
//! model serves many sequences at once.

use burn::tensor::Tensor;

/// Keys and values of every layer for the tokens a sequence has seen so far.
///
/// Two storages, chosen by the first append: backend tensors `[1, num_kv_heads, len, head_dim]`
/// grown by concatenation (any backend), or host vectors `[len, num_kv_heads, head_dim]` grown in
/// place with amortised O(1) appends (the fused CPU path, which attends straight from them).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    host: Vec<(Vec<f32>, Vec<f32>)>,
    len: usize,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            host: vec![(Vec::new(), Vec::new()); num_layers],
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
        self.host.iter_mut().for_each(|(k, v)| {
            k.clear();
            v.clear();
        });
        self.len = 0;
    }

    fn advance(&mut self, layer: usize, new: usize) {
        if layer + 1 == self.layers.len() {
            self.len += new;
        }
    }

    /// Appends new keys/values of `layer` and returns the full keys/values to attend to.
    /// The length advances once the last layer has been appended.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: Tensor<4>,
        v: Tensor<4>,
    ) -> (Tensor<4>, Tensor<4>) {
        assert!(
            self.host[layer].0.is_empty(),
            "KvCache: tensor append to a host cache (fused ops switched mid-sequence)"
        );
        let new = k.dims()[2];
        let (k, v) = match self.layers[layer].take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        self.advance(layer, new);
        (k, v)
    }

    /// Host storage: appends `new` tokens' keys/values (`[new, kv_heads, head_dim]`, row-major) to
    /// `layer`. The length advances once the last layer has been appended.
    pub(crate) fn append_host(&mut self, layer: usize, k: &[f32], v: &[f32], new: usize) {
        assert!(
            self.layers[layer].is_none(),
            "KvCache: host append to a tensor cache (fused ops switched mid-sequence)"
        );
        self.host[layer].0.extend_from_slice(k);
        self.host[layer].1.extend_from_slice(v);
        self.advance(layer, new);
    }

    /// Host storage: all keys and values of `layer`, `[len, kv_heads, head_dim]`.
    pub(crate) fn host_kv(&self, layer: usize) -> (&[f32], &[f32]) {
        let (k, v) = &self.host[layer];
        (k, v)
    }
}
