//! Where generation keeps its sequences' keys and values: one paged block pool for all of them
//! when the model runs the fused kernels (in host memory on Flex, device memory on the GPU
//! backends; bounded by a byte budget, prefixes shared by reference, nothing reallocated while
//! decoding), else one cache per sequence (the reference path; a shared prefix is a cheap clone
//! there).

use burn::tensor::Tensor;
use grail_core::model::{CausalLm, KvCache, PagedKvCache, PagedSequence};
use grail_protocol::proof::SketchCoefficients;

use crate::error::RolloutError;
use crate::kv_blocks::{BlockPool, BlockTable, OutOfBlocks};

/// The keys and values of every sequence of one generation.
// One per generation, never moved while it runs: the size of the paged variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum KvStore {
    /// One block pool (see [`crate::kv_blocks`]).
    Paged {
        pool: BlockPool,
        storage: PagedKvCache,
        peak_used: usize,
    },
    /// One growing cache per sequence; never runs out.
    PerSequence { layers: usize },
}

/// One sequence's share of a [`KvStore`].
pub(crate) enum SequenceKv {
    /// Its block table in the pool.
    Table(BlockTable),
    /// Its own cache.
    Cache(KvCache),
}

impl SequenceKv {
    /// Whether nothing is cached (a new, preempted or re-prefilling sequence).
    pub(crate) fn is_empty(&self) -> bool {
        match self {
            SequenceKv::Table(t) => t.is_empty(),
            SequenceKv::Cache(c) => c.is_empty(),
        }
    }
}

impl KvStore {
    /// A store for `model`: a pool of `num_blocks` blocks of `block_size` positions where the
    /// model can read one, else per-sequence caches.
    pub(crate) fn for_model(model: &CausalLm, num_blocks: usize, block_size: usize) -> Self {
        if model.supports_paged_kv() {
            KvStore::Paged {
                pool: BlockPool::new(num_blocks, block_size),
                storage: PagedKvCache::new(&model.config, num_blocks, block_size, &model.device()),
                peak_used: 0,
            }
        } else {
            KvStore::PerSequence {
                layers: model.config.num_hidden_layers,
            }
        }
    }

    /// A sequence with nothing cached.
    pub(crate) fn new_sequence(&self) -> SequenceKv {
        match self {
            KvStore::Paged { .. } => SequenceKv::Table(BlockTable::new()),
            KvStore::PerSequence { layers } => SequenceKv::Cache(KvCache::new(*layers)),
        }
    }

    /// Makes room for `more` positions of `seq` (all or nothing), copying a shared block it
    /// would write into.
    pub(crate) fn reserve(&mut self, seq: &mut SequenceKv, more: usize) -> Result<(), OutOfBlocks> {
        if let (
            KvStore::Paged {
                pool,
                storage,
                peak_used,
            },
            SequenceKv::Table(table),
        ) = (self, seq)
        {
            if let Some(copy) = table.grow(pool, more)? {
                storage.copy_block(copy.from, copy.to, copy.tokens);
            }
            *peak_used = (*peak_used).max(pool.num_blocks() - pool.free_blocks());
        }
        Ok(())
    }

    /// A second sequence over `seq`'s cached positions (the samples of a prompt after its one
    /// prefill): shared blocks in the pool, a copy of a per-sequence cache.
    pub(crate) fn fork(&mut self, seq: &SequenceKv) -> SequenceKv {
        match (self, seq) {
            (KvStore::Paged { pool, .. }, SequenceKv::Table(t)) => SequenceKv::Table(t.fork(pool)),
            (_, SequenceKv::Cache(c)) => SequenceKv::Cache(c.clone()),
            _ => unreachable!("a sequence of another store"),
        }
    }

    /// A sequence for `prompt` over the blocks other prompts published for its first positions
    /// (see [`crate::kv_blocks`]), and how many positions those hold: 0 and an empty sequence
    /// where nothing matches or caches are per sequence.
    pub(crate) fn share_published(&mut self, prompt: &[u32]) -> (SequenceKv, usize) {
        match self {
            KvStore::Paged { pool, .. } => {
                let table = pool.share_published(prompt);
                let len = table.len();
                (SequenceKv::Table(table), len)
            }
            KvStore::PerSequence { .. } => (self.new_sequence(), 0),
        }
    }

    /// Whether `waiting` could share more whole blocks once `prefilling`'s prefill publishes its
    /// blocks than it can now (both begin with those blocks' tokens); never for per-sequence
    /// caches.
    pub(crate) fn would_share_more(&self, prefilling: &[u32], waiting: &[u32]) -> bool {
        let KvStore::Paged { pool, .. } = self else {
            return false;
        };
        let n = pool.block_size();
        // Whole blocks `prefilling` fills, leaving `waiting` at least its last token to compute.
        let reach = (prefilling.len() / n).min((waiting.len() - 1) / n) * n;
        let common = prefilling[..reach]
            .iter()
            .zip(waiting)
            .take_while(|(a, b)| a == b)
            .count();
        common / n * n > pool.published_len(waiting)
    }

    /// Publishes the full blocks of `seq`, a prompt's just-prefilled cache, for later prompts
    /// that begin alike.
    pub(crate) fn publish(&mut self, seq: &SequenceKv, prompt: &[u32]) {
        if let (KvStore::Paged { pool, .. }, SequenceKv::Table(t)) = (self, seq) {
            pool.publish(t, prompt);
        }
    }

    /// Forgets every published block (new weights).
    pub(crate) fn unpublish_all(&mut self) {
        if let KvStore::Paged { pool, .. } = self {
            pool.unpublish_all();
        }
    }

    /// Gives back what `seq` holds and leaves it empty.
    pub(crate) fn free(&mut self, seq: &mut SequenceKv) {
        match (self, seq) {
            (KvStore::Paged { pool, .. }, SequenceKv::Table(t)) => t.free(pool),
            (KvStore::PerSequence { layers }, seq) => {
                *seq = SequenceKv::Cache(KvCache::new(*layers))
            }
            _ => unreachable!("a sequence of another store"),
        }
    }

    /// Blocks free now, `None` for per-sequence caches (no limit).
    pub(crate) fn free_blocks(&self) -> Option<usize> {
        match self {
            KvStore::Paged { pool, .. } => Some(pool.free_blocks()),
            KvStore::PerSequence { .. } => None,
        }
    }

    /// Blocks a sequence of `positions` takes from the pool, 0 for per-sequence caches.
    pub(crate) fn blocks_for(&self, positions: usize) -> usize {
        match self {
            KvStore::Paged { pool, .. } => pool.blocks_for(positions),
            KvStore::PerSequence { .. } => 0,
        }
    }

    /// `(blocks in the pool, most ever in use)`, zeros for per-sequence caches.
    pub(crate) fn usage(&self) -> (usize, usize) {
        match self {
            KvStore::Paged {
                pool, peak_used, ..
            } => (pool.num_blocks(), *peak_used),
            KvStore::PerSequence { .. } => (0, 0),
        }
    }

    /// Feeds `inputs[i]` to `seqs[i]` (whose room was reserved) and returns the logits of each
    /// one's last new token as host rows `[sequences × vocab]`, and with `sketch`, the GRAIL
    /// sketch of each one's last hidden state (else no sketches).
    pub(crate) fn forward(
        &mut self,
        model: &CausalLm,
        inputs: &[&[u32]],
        seqs: &mut [&mut SequenceKv],
        sketch: Option<&SketchCoefficients>,
    ) -> Result<(Vec<f32>, Vec<u32>), RolloutError> {
        // The CPU kernels: on a rayon worker (inline when already on one), like the trainer's
        // step, so their parallel sections are joins inside the pool instead of one injection
        // (and wake-up) each from this thread. A GPU backend's step stays on this thread (and
        // its device stream).
        if grail_kernels::host_kernels(&model.device()) {
            rayon::scope(|_| self.forward_here(model, inputs, seqs, sketch))
        } else {
            self.forward_here(model, inputs, seqs, sketch)
        }
    }

    /// [`forward`](Self::forward) on the calling thread.
    fn forward_here(
        &mut self,
        model: &CausalLm,
        inputs: &[&[u32]],
        seqs: &mut [&mut SequenceKv],
        sketch: Option<&SketchCoefficients>,
    ) -> Result<(Vec<f32>, Vec<u32>), RolloutError> {
        let hidden = match self {
            KvStore::Paged { storage, .. } => {
                let sequences: Vec<PagedSequence<'_>> = seqs
                    .iter()
                    .zip(inputs)
                    .map(|(seq, input)| match &**seq {
                        SequenceKv::Table(t) => PagedSequence {
                            blocks: t.blocks(),
                            cached: t.len() - input.len(),
                        },
                        SequenceKv::Cache(_) => unreachable!("a sequence of another store"),
                    })
                    .collect();
                model.forward_paged_hidden(inputs, storage, &sequences)?
            }
            KvStore::PerSequence { layers } => {
                let mut caches: Vec<KvCache> = seqs
                    .iter_mut()
                    .map(|seq| match &mut **seq {
                        SequenceKv::Cache(c) => std::mem::replace(c, KvCache::new(*layers)),
                        SequenceKv::Table(_) => unreachable!("a sequence of another store"),
                    })
                    .collect();
                let hidden = model.forward_cached_hidden(inputs, &mut caches);
                for (seq, cache) in seqs.iter_mut().zip(caches) {
                    **seq = SequenceKv::Cache(cache);
                }
                hidden?
            }
        };
        let host = |t: Tensor<2>| -> Vec<f32> {
            t.into_data()
                .convert::<f32>()
                .try_to_vec()
                .expect("f32 rows")
        };
        let logits = host(model.logits(hidden.clone()));
        let sketches = match sketch {
            Some(c) => c.sketches(&host(hidden), model.config.hidden_size),
            None => Vec::new(),
        };
        Ok((logits, sketches))
    }
}
