//! The keys and values of many sequences in one preallocated pool of fixed-size blocks (vLLM's
//! PagedAttention), in host memory: nothing is reallocated or concatenated while decoding, and
//! sequences that share a prefix (the samples of a GRPO group) read the same blocks.
//!
//! Which blocks a sequence owns is its caller's bookkeeping (grail-rollout's `kv_blocks`); this
//! is only the storage, addressed through each sequence's block list.

use grail_kernels::attention::HostKv;

use super::ModelConfig;

/// Keys and values of every layer, `[num_blocks × block_size, kv_heads, head_dim]` per layer.
#[derive(Debug, Clone)]
pub struct PagedKvCache {
    block_size: usize,
    num_blocks: usize,
    /// Values per position and layer: `kv_heads × head_dim`.
    row_width: usize,
    layers: Vec<(Vec<f32>, Vec<f32>)>,
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
    /// A pool of `num_blocks` blocks of `block_size` positions for a model of `config`'s shape.
    /// The memory is zeroed lazily by the OS, page by page as blocks are first written.
    pub fn new(config: &ModelConfig, num_blocks: usize, block_size: usize) -> Self {
        let row_width = config.num_key_value_heads * config.head_dim;
        let n = num_blocks * block_size * row_width;
        Self {
            block_size,
            num_blocks,
            row_width,
            layers: (0..config.num_hidden_layers)
                .map(|_| (vec![0.0; n], vec![0.0; n]))
                .collect(),
        }
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
        let n = positions * self.row_width;
        let at = |b: u32| b as usize * self.block_size * self.row_width;
        let (from, to) = (at(from), at(to));
        for (k, v) in &mut self.layers {
            k.copy_within(from..from + n, to);
            v.copy_within(from..from + n, to);
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

    /// Writes `k`/`v` (`[new, kv_heads, head_dim]`) of `layer` at positions
    /// `seq.cached..seq.cached + new`.
    pub(crate) fn write(&mut self, layer: usize, seq: &PagedSequence<'_>, k: &[f32], v: &[f32]) {
        let w = self.row_width;
        let (keys, values) = &mut self.layers[layer];
        for (j, (kr, vr)) in k.chunks_exact(w).zip(v.chunks_exact(w)).enumerate() {
            let p = seq.cached + j;
            let row =
                seq.blocks[p / self.block_size] as usize * self.block_size + p % self.block_size;
            keys[row * w..(row + 1) * w].copy_from_slice(kr);
            values[row * w..(row + 1) * w].copy_from_slice(vr);
        }
    }

    /// The `positions` cached positions of `seq` in `layer`, for the attention kernel.
    pub(crate) fn host_kv<'a>(
        &'a self,
        layer: usize,
        seq: &PagedSequence<'a>,
        positions: usize,
    ) -> HostKv<'a> {
        let (keys, values) = &self.layers[layer];
        HostKv {
            keys,
            values,
            blocks: seq.blocks,
            block_size: self.block_size,
            len: positions,
        }
    }
}
