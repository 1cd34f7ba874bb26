//! The keys and values of many sequences in one preallocated pool of fixed-size blocks (vLLM's
//! PagedAttention), in host memory on Flex and in device memory on the CubeCL backends: nothing
//! is reallocated or concatenated while decoding, and sequences that share a prefix (the samples
//! of a GRPO group) read the same blocks.
//!
//! Which blocks a sequence owns is its caller's bookkeeping (grail-rollout's `kv_blocks`); this
//! is only the storage, addressed through each sequence's block list.

use burn::tensor::{Device, FloatDType, IndexingUpdateOp, Int, Tensor, TensorData};
use grail_kernels::attention::HostKv;
use grail_kernels::{PagedSpan, paged_attention};

use super::ModelConfig;

/// Keys and values of every layer, `[num_blocks × block_size, kv_heads, head_dim]` per layer.
#[derive(Debug, Clone)]
pub struct PagedKvCache {
    block_size: usize,
    num_blocks: usize,
    /// Values per position and layer: `kv_heads × head_dim`.
    row_width: usize,
    layers: Pools,
    /// The device the pool was built for.
    device: Device,
}

/// Where the blocks live.
#[derive(Debug, Clone)]
enum Pools {
    /// Host memory, read by the host attention kernel in place.
    Host(Vec<(Vec<f32>, Vec<f32>)>),
    /// Device tensors (f32). A layer's pair is taken out while it is updated, so the update
    /// holds the only handle and writes in place instead of copying the pool.
    Device(Vec<Option<(Tensor<3>, Tensor<3>)>>),
}

/// One sequence of a paged forward ([`CausalLm::forward_paged`](super::CausalLm::forward_paged)):
/// its blocks in position order, and how many positions were cached before this call (the
/// position of its first new token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedSequence<'a> {
    /// The blocks holding positions `0..cached + new`.
    pub blocks: &'a [u32],
    /// Positions already cached.
    pub cached: usize,
}

impl PagedKvCache {
    /// A pool of `num_blocks` blocks of `block_size` positions for a model of `config`'s shape,
    /// in the memory `device`'s kernels read: host memory on Flex (zeroed lazily by the OS, page
    /// by page as blocks are first written), device memory on the CubeCL backends.
    pub fn new(
        config: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
        device: &Device,
    ) -> Self {
        let row_width = config.num_key_value_heads * config.head_dim;
        let n = num_blocks * block_size * row_width;
        let layers = 0..config.num_hidden_layers;
        let layers = if grail_kernels::host_kernels(device) {
            Pools::Host(layers.map(|_| (vec![0.0; n], vec![0.0; n])).collect())
        } else {
            let shape = [
                num_blocks * block_size,
                config.num_key_value_heads,
                config.head_dim,
            ];
            let zeros = || Tensor::<3>::zeros(shape, device).cast(FloatDType::F32);
            Pools::Device(layers.map(|_| Some((zeros(), zeros()))).collect())
        };
        Self {
            block_size,
            num_blocks,
            row_width,
            layers,
            device: device.clone(),
        }
    }

    /// The device the pool was built for (its memory is that device's kernels').
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the blocks are in host memory (the host kernels read them there).
    pub fn on_host(&self) -> bool {
        matches!(self.layers, Pools::Host(_))
    }

    /// Bytes one block takes across all layers (keys and values, f32).
    pub fn bytes_per_block(config: &ModelConfig, block_size: usize) -> usize {
        2 * config.num_hidden_layers
            * config.num_key_value_heads
            * config.head_dim
            * block_size
            * std::mem::size_of::<f32>()
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Copies the first `positions` positions of block `from` into block `to` in every layer (a
    /// sequence's copy-on-write of a block it shared).
    pub fn copy_block(&mut self, from: u32, to: u32, positions: usize) {
        let (from, to) = (
            from as usize * self.block_size,
            to as usize * self.block_size,
        );
        match &mut self.layers {
            Pools::Host(layers) => {
                let w = self.row_width;
                for (k, v) in layers {
                    k.copy_within(from * w..(from + positions) * w, to * w);
                    v.copy_within(from * w..(from + positions) * w, to * w);
                }
            }
            Pools::Device(layers) => {
                let rows = |start: usize| (start..start + positions).map(|r| r as i64).collect();
                for pair in layers {
                    let (k, v) = pair.take().expect("a device pool layer is in place");
                    let (from, to) = (row_ids(rows(from), &k), row_ids(rows(to), &k));
                    // `select` copies the rows out, so the assignment holds the pool's only
                    // handle and writes in place.
                    let copy = |t: Tensor<3>| {
                        let part = t.clone().select(0, from.clone());
                        t.select_assign(0, to.clone(), part, IndexingUpdateOp::Assign)
                    };
                    *pair = Some((copy(k), copy(v)));
                }
            }
        }
    }

    /// Whether `seq`'s blocks exist and hold `cached + new` positions; else what is wrong.
    pub(crate) fn check(&self, seq: &PagedSequence<'_>, new: usize) -> Result<(), String> {
        let positions = seq.cached + new;
        if seq.blocks.len() * self.block_size < positions {
            return Err(format!(
                "{} blocks of {} positions cannot hold {positions} positions",
                seq.blocks.len(),
                self.block_size
            ));
        }
        match seq.blocks.iter().find(|&&b| b as usize >= self.num_blocks) {
            Some(b) => Err(format!(
                "block {b} is outside the pool of {}",
                self.num_blocks
            )),
            None => Ok(()),
        }
    }

    /// The pool row of position `p` of `seq`.
    fn row(&self, seq: &PagedSequence<'_>, p: usize) -> usize {
        pool_row(seq, self.block_size, p)
    }

    /// Writes `k`/`v` (`[new, kv_heads, head_dim]`) of `layer` at positions
    /// `seq.cached..seq.cached + new` (host memory).
    pub(crate) fn write(&mut self, layer: usize, seq: &PagedSequence<'_>, k: &[f32], v: &[f32]) {
        let (w, block_size) = (self.row_width, self.block_size);
        let Pools::Host(layers) = &mut self.layers else {
            unreachable!("host keys written into a device pool (forward_paged checks the memory)")
        };
        let (keys, values) = &mut layers[layer];
        for (j, (kr, vr)) in k.chunks_exact(w).zip(v.chunks_exact(w)).enumerate() {
            let row = pool_row(seq, block_size, seq.cached + j);
            keys[row * w..(row + 1) * w].copy_from_slice(kr);
            values[row * w..(row + 1) * w].copy_from_slice(vr);
        }
    }

    /// Device memory: writes the new tokens' keys/values `k`/`v` (`[tokens, kv_heads,
    /// head_dim]`) of `layer` (sequence `i`'s are rows `queries[i] = (start, len)`, its positions
    /// `seqs[i].cached..+len`), then attends every sequence's new queries `q` `[tokens, heads,
    /// head_dim]` to its cached positions in one kernel call; zeros on rows no sequence covers.
    pub(crate) fn write_and_attend(
        &mut self,
        layer: usize,
        seqs: &[PagedSequence<'_>],
        queries: &[(usize, usize)],
        [q, k, v]: [Tensor<3>; 3],
        scale: f32,
    ) -> Tensor<3> {
        let (mut from, mut to, mut spans) = (Vec::new(), Vec::new(), Vec::new());
        for (seq, &(start, len)) in seqs.iter().zip(queries) {
            from.extend((start..start + len).map(|r| r as i64));
            to.extend((seq.cached..seq.cached + len).map(|p| self.row(seq, p) as i64));
            spans.push(PagedSpan {
                q_start: start,
                q_len: len,
                k_len: seq.cached + len,
                blocks: seq.blocks.to_vec(),
            });
        }
        let Pools::Device(layers) = &mut self.layers else {
            unreachable!("device keys written into a host pool (forward_paged checks the memory)")
        };
        let (keys, values) = layers[layer]
            .take()
            .expect("a device pool layer is in place");
        // Usually every token is a new one, in order: then no copy.
        let every_token = from.len() == k.dims()[0] && (0..).zip(&from).all(|(i, &r)| i == r);
        let (from, to) = (row_ids(from, &k), row_ids(to, &k));
        let new_rows = |t: Tensor<3>| {
            let t = t.cast(FloatDType::F32);
            if every_token {
                t
            } else {
                t.select(0, from.clone())
            }
        };
        let keys = keys.select_assign(0, to.clone(), new_rows(k), IndexingUpdateOp::Assign);
        let values = values.select_assign(0, to, new_rows(v), IndexingUpdateOp::Assign);
        let out = paged_attention(
            q,
            keys.clone(),
            values.clone(),
            &spans,
            self.block_size,
            scale,
        );
        layers[layer] = Some((keys, values));
        out
    }

    /// The `positions` cached positions of `seq` in `layer`, for the attention kernel.
    pub(crate) fn host_kv<'a>(
        &'a self,
        layer: usize,
        seq: &PagedSequence<'a>,
        positions: usize,
    ) -> HostKv<'a> {
        let Pools::Host(layers) = &self.layers else {
            unreachable!("host attention over a device pool (forward_paged checks the memory)")
        };
        let (keys, values) = &layers[layer];
        HostKv {
            keys,
            values,
            blocks: seq.blocks,
            block_size: self.block_size,
            len: positions,
        }
    }
}

/// The pool row of position `p` of `seq`, in blocks of `block_size` positions.
fn pool_row(seq: &PagedSequence<'_>, block_size: usize, p: usize) -> usize {
    seq.blocks[p / block_size] as usize * block_size + p % block_size
}

/// Row ids on `like`'s device.
fn row_ids(rows: Vec<i64>, like: &Tensor<3>) -> Tensor<1, Int> {
    let n = rows.len();
    Tensor::from_data(TensorData::new(rows, [n]), &like.device())
}
