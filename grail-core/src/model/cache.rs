//! The key/value cache of one sequence, owned by the caller (one per sequence slot) so that one
//! model serves many sequences at once.

use burn::tensor::Tensor;

/// Keys and values of every layer for the tokens a sequence has seen so far.
///
/// Three storages, chosen by the first append: backend tensors `[1, num_kv_heads, len, head_dim]`
/// grown by concatenation (the unfused path, any backend); host vectors `[len, num_kv_heads,
/// head_dim]` grown in place with amortised O(1) appends (the fused CPU path, which attends
/// straight from them); device tensors `[len, num_kv_heads, head_dim]` grown by concatenation
/// (the fused GPU path, whose cached-attention kernel reads every sequence's cache gathered).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    host: Vec<(Vec<f32>, Vec<f32>)>,
    device: Vec<Option<(Tensor<3>, Tensor<3>)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            host: vec![(Vec::new(), Vec::new()); num_layers],
            device: vec![None; num_layers],
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
        self.device.iter_mut().for_each(|l| *l = None);
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
    pub(crate) fn append_tensors(
        &mut self,
        layer: usize,
        k: Tensor<4>,
        v: Tensor<4>,
    ) -> (Tensor<4>, Tensor<4>) {
        assert!(
            self.host[layer].0.is_empty() && self.device[layer].is_none(),
            "KvCache: tensor append to a fused-path cache (fused ops switched mid-sequence)"
        );
        self.advance(layer, k.dims()[2]);
        grow(&mut self.layers[layer], k, v, 2)
    }

    /// Host storage: appends `new` tokens' keys/values (`[new, kv_heads, head_dim]`, row-major) to
    /// `layer`. The length advances once the last layer has been appended.
    pub(crate) fn append_host(&mut self, layer: usize, k: &[f32], v: &[f32], new: usize) {
        assert!(
            self.layers[layer].is_none() && self.device[layer].is_none(),
            "KvCache: host append to a tensor cache (fused ops switched mid-sequence)"
        );
        self.host[layer].0.extend_from_slice(k);
        self.host[layer].1.extend_from_slice(v);
        self.advance(layer, new);
    }

    /// Device storage: appends the new tokens' keys/values `[new, kv_heads, head_dim]` of `layer`
    /// and returns all of them. The length advances once the last layer has been appended.
    pub(crate) fn append_device(
        &mut self,
        layer: usize,
        k: Tensor<3>,
        v: Tensor<3>,
    ) -> (Tensor<3>, Tensor<3>) {
        assert!(
            self.layers[layer].is_none() && self.host[layer].0.is_empty(),
            "KvCache: device append to another storage (fused ops switched mid-sequence)"
        );
        self.advance(layer, k.dims()[0]);
        grow(&mut self.device[layer], k, v, 0)
    }

    /// Host storage: all keys and values of `layer`, `[len, kv_heads, head_dim]`.
    pub(crate) fn host_kv(&self, layer: usize) -> (&[f32], &[f32]) {
        let (k, v) = &self.host[layer];
        (k, v)
    }
}

/// Appends `k`/`v` to a tensor slot along `axis` and returns the whole keys/values.
fn grow<const D: usize>(
    slot: &mut Option<(Tensor<D>, Tensor<D>)>,
    k: Tensor<D>,
    v: Tensor<D>,
    axis: usize,
) -> (Tensor<D>, Tensor<D>) {
    let (k, v) = match slot.take() {
        Some((pk, pv)) => (
            Tensor::cat(vec![pk, k], axis),
            Tensor::cat(vec![pv, v], axis),
        ),
        None => (k, v),
    };
    *slot = Some((k.clone(), v.clone()));
    (k, v)
}
