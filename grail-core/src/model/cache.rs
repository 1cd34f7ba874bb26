//! The key/value cache of one sequence, owned by the caller (one per sequence slot) so that one
//! model serves many sequences at once.

use burn::tensor::Tensor;

/// Keys and values of every layer for the tokens a sequence has seen so far.
///
/// The first append picks the storage the model's attention path reads (backend tensors on the
/// reference path, host vectors or device tensors on the fused one); it stays until
/// [`KvCache::clear`].
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    num_layers: usize,
    len: usize,
    storage: Storage,
}

/// One sequence's keys/values, one entry per layer, in the layout of the attention path that
/// reads them.
#[derive(Debug, Clone, Default)]
enum Storage {
    /// Nothing appended yet.
    #[default]
    Empty,
    /// The reference path (any backend): backend tensors `[1, kv_heads, len, head_dim]` grown by
    /// concatenation.
    Tensors(Vec<Option<(Tensor<4>, Tensor<4>)>>),
    /// The fused path on host memory (Flex): vectors `[len, kv_heads, head_dim]` grown in place
    /// with amortised O(1) appends; the cached-attention kernel reads them where they are.
    Host(Vec<(Vec<f32>, Vec<f32>)>),
    /// The fused path on a GPU: device tensors `[len, kv_heads, head_dim]` grown by
    /// concatenation, gathered across sequences for the cached-attention kernel.
    Device(Vec<Option<(Tensor<3>, Tensor<3>)>>),
}

impl Storage {
    fn name(&self) -> &'static str {
        match self {
            Storage::Empty => "empty",
            Storage::Tensors(_) => "tensor (reference path)",
            Storage::Host(_) => "host (fused, host memory)",
            Storage::Device(_) => "device (fused, GPU)",
        }
    }
}

impl KvCache {
    /// An empty cache for a model with `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            num_layers,
            len: 0,
            storage: Storage::Empty,
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

    /// Drops everything (e.g. to reuse the slot for a new sequence, whatever path it takes).
    pub fn clear(&mut self) {
        self.storage = Storage::Empty;
        self.len = 0;
    }

    /// Appends new keys/values `[1, kv_heads, new, head_dim]` of `layer` to tensor storage and
    /// returns the full keys/values to attend to. The length advances once the last layer has
    /// been appended.
    pub(crate) fn append_tensors(
        &mut self,
        layer: usize,
        k: Tensor<4>,
        v: Tensor<4>,
    ) -> (Tensor<4>, Tensor<4>) {
        self.advance(layer, k.dims()[2]);
        match self.chosen(|n| Storage::Tensors(vec![None; n])) {
            Storage::Tensors(layers) => grow(&mut layers[layer], k, v, 2),
            held => mismatch("tensor", held),
        }
    }

    /// Appends `new` tokens' keys/values (`[new, kv_heads, head_dim]`, row-major) of `layer` to
    /// host storage. The length advances once the last layer has been appended.
    pub(crate) fn append_host(&mut self, layer: usize, k: &[f32], v: &[f32], new: usize) {
        self.advance(layer, new);
        match self.chosen(|n| Storage::Host(vec![(Vec::new(), Vec::new()); n])) {
            Storage::Host(layers) => {
                layers[layer].0.extend_from_slice(k);
                layers[layer].1.extend_from_slice(v);
            }
            held => mismatch("host", held),
        }
    }

    /// All keys and values of `layer` in host storage, `[len, kv_heads, head_dim]`.
    pub(crate) fn host_kv(&self, layer: usize) -> (&[f32], &[f32]) {
        match &self.storage {
            Storage::Host(layers) => (&layers[layer].0, &layers[layer].1),
            held => mismatch("host", held),
        }
    }

    /// Appends the new tokens' keys/values `[new, kv_heads, head_dim]` of `layer` to device
    /// storage and returns all of them. The length advances once the last layer has been
    /// appended.
    pub(crate) fn append_device(
        &mut self,
        layer: usize,
        k: Tensor<3>,
        v: Tensor<3>,
    ) -> (Tensor<3>, Tensor<3>) {
        self.advance(layer, k.dims()[0]);
        match self.chosen(|n| Storage::Device(vec![None; n])) {
            Storage::Device(layers) => grow(&mut layers[layer], k, v, 0),
            held => mismatch("device", held),
        }
    }

    /// The storage, which the first append creates with `init(num_layers)`.
    fn chosen(&mut self, init: impl FnOnce(usize) -> Storage) -> &mut Storage {
        if let Storage::Empty = self.storage {
            self.storage = init(self.num_layers);
        }
        &mut self.storage
    }

    fn advance(&mut self, layer: usize, new: usize) {
        if layer + 1 == self.num_layers {
            self.len += new;
        }
    }
}

/// A sequence's keys/values cannot move between layouts: the model's kernel path changed
/// between calls on one cache (fused ops toggled, or the model moved to another device).
fn mismatch(wanted: &str, held: &Storage) -> ! {
    panic!(
        "KvCache: {wanted} access to a cache holding {} storage (the model's kernel path changed \
         mid-sequence; clear the cache to start over)",
        held.name()
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    #[test]
    fn the_first_append_picks_the_storage_and_another_one_is_refused() {
        let mut cache = KvCache::new(1);
        cache.append_host(0, &[1.0, 2.0], &[3.0, 4.0], 1);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.host_kv(0), (&[1.0, 2.0][..], &[3.0, 4.0][..]));
        let k = Tensor::<4>::zeros([1, 1, 1, 2], &Device::flex());
        let refused = std::panic::catch_unwind(move || {
            let mut cache = cache;
            cache.append_tensors(0, k.clone(), k);
        });
        let message = refused.expect_err("a tensor append to host storage");
        let message = message.downcast_ref::<String>().expect("a formatted panic");
        assert!(message.contains("kernel path changed"), "{message}");
    }

    #[test]
    fn clear_lets_the_slot_take_another_storage() {
        let mut cache = KvCache::new(2);
        cache.append_host(0, &[1.0], &[1.0], 1);
        cache.append_host(1, &[1.0], &[1.0], 1);
        assert_eq!(cache.len(), 1);
        cache.clear();
        assert!(cache.is_empty());
        let k = Tensor::<3>::zeros([3, 1, 1], &Device::flex());
        let (keys, _) = cache.append_device(0, k.clone(), k.clone());
        cache.append_device(1, k.clone(), k);
        assert_eq!((keys.dims()[0], cache.len()), (3, 3));
    }
}
