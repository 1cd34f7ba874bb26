//! The bookkeeping of a paged KV cache (vLLM's PagedAttention): a fixed pool of blocks of
//! `block_size` token positions, handed to sequences through block tables, shared by reference
//! count between sequences with a common prefix (the G samples of a GRPO group share their
//! prompt's blocks), copied on write when a sequence appends to a block others still read.
//!
//! This module owns block ids and counts only; the keys and values live in per-layer arrays
//! indexed by block id, owned by whoever reads them. Every allocation can fail: the caller
//! decides whether to wait (admission) or to preempt a sequence and re-prefill it later.
//!
//! Prompts that merely begin alike (a system prompt, a few-shot preamble) share too, block by
//! block (vLLM's automatic prefix caching, while a block is held): a prefilled prompt publishes
//! its full blocks under the tokens from position 0 to each block's end, a later prompt that
//! begins with those tokens takes the blocks by reference, and a block leaves the registry when
//! it is freed (or when new weights make every cached key stale).

use std::collections::HashMap;

/// A block's index in the pool (and in the per-layer key/value arrays).
pub type BlockId = u32;

/// The pool of blocks: who holds each, and which are free.
#[derive(Debug, Clone)]
pub struct BlockPool {
    block_size: usize,
    /// Reference count per block; 0 = free.
    refs: Vec<u32>,
    /// Free blocks, most recently freed last (reused first: its memory is warm).
    free: Vec<BlockId>,
    /// Published full prompt blocks: the tokens of positions 0 to the block's end → the block.
    published: HashMap<Vec<u32>, BlockId>,
    /// The key each published block is registered under, to unregister it when it is freed.
    published_as: HashMap<BlockId, Vec<u32>>,
}

/// Not enough free blocks for a request: it needs `needed`, the pool has `free`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the KV cache needs {needed} more blocks and has {free} free")]
pub struct OutOfBlocks {
    /// Blocks the request needed.
    pub needed: usize,
    /// Blocks free when it was made.
    pub free: usize,
}

/// A block to copy before a write: the sequence's table now names `to`, which must receive the
/// first `tokens` positions of `from` (the positions written so far).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOnWrite {
    /// The shared block the sequence read until now.
    pub from: BlockId,
    /// Its own new block.
    pub to: BlockId,
    /// Positions of `from` in use.
    pub tokens: usize,
}

impl BlockPool {
    /// A pool of `num_blocks` blocks of `block_size` positions each.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "a KV block holds at least one position");
        assert!(
            num_blocks <= BlockId::MAX as usize,
            "{num_blocks} KV blocks do not fit a block id"
        );
        Self {
            block_size,
            refs: vec![0; num_blocks],
            free: (0..num_blocks as BlockId).rev().collect(),
            published: HashMap::new(),
            published_as: HashMap::new(),
        }
    }

    /// The blocks a pool of `bytes` holds, each block storing keys and values of `block_size`
    /// positions for `layers` layers of `kv_heads × head_dim` values of `dtype_bytes` bytes.
    pub fn blocks_in_budget(
        bytes: usize,
        block_size: usize,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype_bytes: usize,
    ) -> usize {
        let per_block = 2 * layers * kv_heads * head_dim * dtype_bytes * block_size;
        assert!(
            per_block > 0,
            "a KV block of {block_size} positions × {layers} layers × {kv_heads} heads × {head_dim} × {dtype_bytes} bytes holds nothing"
        );
        bytes / per_block
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks free now.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// How many blocks hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// The reference count of `block` (0 = free).
    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.refs[block as usize]
    }

    fn allocate(&mut self) -> Option<BlockId> {
        let block = self.free.pop()?;
        debug_assert_eq!(self.refs[block as usize], 0);
        self.refs[block as usize] = 1;
        Some(block)
    }

    fn share(&mut self, block: BlockId) {
        let r = &mut self.refs[block as usize];
        assert!(*r > 0, "sharing free KV block {block}");
        *r += 1;
    }

    fn release(&mut self, block: BlockId) {
        let r = &mut self.refs[block as usize];
        assert!(*r > 0, "releasing free KV block {block}");
        *r -= 1;
        if *r == 0 {
            self.free.push(block);
            if let Some(key) = self.published_as.remove(&block) {
                self.published.remove(&key);
            }
        }
    }

    /// Publishes the full blocks of `table`, which holds the keys/values of `tokens` (a prompt
    /// just prefilled), for later prompts that begin with the same tokens. A block another table
    /// published first for the same tokens stays the one shared.
    pub fn publish(&mut self, table: &BlockTable, tokens: &[u32]) {
        let full = table.len().min(tokens.len()) / self.block_size;
        for (i, &block) in table.blocks()[..full].iter().enumerate() {
            let key = tokens[..(i + 1) * self.block_size].to_vec();
            if self.published.contains_key(&key) || self.published_as.contains_key(&block) {
                continue;
            }
            self.published.insert(key.clone(), block);
            self.published_as.insert(block, key);
        }
    }

    /// The published blocks that hold the first positions of `tokens`, whole blocks from
    /// position 0, leaving at least the last token to compute (its logits are what a prefill is
    /// for).
    fn published_blocks(&self, tokens: &[u32]) -> Vec<BlockId> {
        let mut blocks = Vec::new();
        loop {
            let end = (blocks.len() + 1) * self.block_size;
            if end >= tokens.len() {
                return blocks;
            }
            match self.published.get(&tokens[..end]) {
                Some(&b) => blocks.push(b),
                None => return blocks,
            }
        }
    }

    /// Positions of `tokens` that published blocks hold
    /// (see [`share_published`](Self::share_published)).
    pub fn published_len(&self, tokens: &[u32]) -> usize {
        self.published_blocks(tokens).len() * self.block_size
    }

    /// A table over the first positions of `tokens` that published blocks hold, whole blocks
    /// from position 0 and leaving at least the last token to compute, sharing those blocks
    /// (empty if none do). Takes no free block.
    pub fn share_published(&mut self, tokens: &[u32]) -> BlockTable {
        let blocks = self.published_blocks(tokens);
        for &b in &blocks {
            self.share(b);
        }
        let len = blocks.len() * self.block_size;
        BlockTable { blocks, len }
    }

    /// Forgets every published block (new weights: the keys they hold are stale).
    pub fn unpublish_all(&mut self) {
        self.published.clear();
        self.published_as.clear();
    }
}

/// The blocks of one sequence, in position order, and how many positions it has written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<BlockId>,
    len: usize,
}

impl BlockTable {
    /// An empty table (no blocks).
    pub fn new() -> Self {
        Self::default()
    }

    /// The blocks, in position order: position `p` is at offset `p % block_size` of block
    /// `p / block_size`.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Positions written.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Blocks that making room for `more` positions would take from the pool (new blocks, and
    /// a copy of a shared last block that still has room).
    pub fn blocks_needed(&self, pool: &BlockPool, more: usize) -> usize {
        let new = pool.blocks_for(self.len + more) - self.blocks.len();
        new + usize::from(more > 0 && self.shared_partial_tail(pool).is_some())
    }

    /// The last block, if other tables also hold it and the next position would be written
    /// into it.
    fn shared_partial_tail(&self, pool: &BlockPool) -> Option<BlockId> {
        let last = *self.blocks.last()?;
        let partial = !self.len.is_multiple_of(pool.block_size);
        (partial && pool.ref_count(last) > 1).then_some(last)
    }

    /// Makes room for `more` positions and counts them written: takes new blocks and, when the
    /// last block is shared and not full, replaces it with a copy the caller must fill (the
    /// returned [`CopyOnWrite`]). All or nothing: on [`OutOfBlocks`] the table is unchanged.
    pub fn grow(
        &mut self,
        pool: &mut BlockPool,
        more: usize,
    ) -> Result<Option<CopyOnWrite>, OutOfBlocks> {
        let needed = self.blocks_needed(pool, more);
        if needed > pool.free_blocks() {
            return Err(OutOfBlocks {
                needed,
                free: pool.free_blocks(),
            });
        }
        let mut copy = None;
        if more > 0
            && let Some(from) = self.shared_partial_tail(pool)
        {
            let to = pool.allocate().expect("counted");
            pool.release(from);
            *self.blocks.last_mut().expect("a tail") = to;
            copy = Some(CopyOnWrite {
                from,
                to,
                tokens: self.len % pool.block_size,
            });
        }
        while self.blocks.len() < pool.blocks_for(self.len + more) {
            self.blocks.push(pool.allocate().expect("counted"));
        }
        self.len += more;
        Ok(copy)
    }

    /// A second table over the same positions, sharing every block (the samples of a group
    /// after their prompt's prefill). Takes no free block.
    pub fn fork(&self, pool: &mut BlockPool) -> BlockTable {
        for &b in &self.blocks {
            pool.share(b);
        }
        self.clone()
    }

    /// Returns every block to the pool (a finished or preempted sequence) and empties the table.
    pub fn free(&mut self, pool: &mut BlockPool) {
        for b in self.blocks.drain(..) {
            pool.release(b);
        }
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_shares_its_prompt_and_copies_the_partial_block_on_write() {
        let mut pool = BlockPool::new(8, 4);
        let mut prompt = BlockTable::new();
        assert_eq!(prompt.grow(&mut pool, 6).unwrap(), None); // positions 0..6: 2 blocks
        assert_eq!(pool.free_blocks(), 6);
        let mut sample = prompt.fork(&mut pool);
        assert_eq!(pool.free_blocks(), 6, "a fork takes no block");
        assert_eq!(sample.blocks_needed(&pool, 1), 1);
        let copy = sample
            .grow(&mut pool, 1)
            .unwrap()
            .expect("the tail is shared");
        assert_eq!(copy.from, prompt.blocks()[1]);
        assert_eq!(copy.tokens, 2);
        assert_eq!(
            sample.blocks()[0],
            prompt.blocks()[0],
            "full blocks stay shared"
        );
        assert_eq!(pool.ref_count(prompt.blocks()[0]), 2);
        assert_eq!(pool.ref_count(prompt.blocks()[1]), 1);
        // The prompt's own table now holds its tail alone: no copy.
        assert_eq!(prompt.grow(&mut pool, 2).unwrap(), None);
        prompt.free(&mut pool);
        sample.free(&mut pool);
        assert_eq!(pool.free_blocks(), 8);
    }

    #[test]
    fn prompts_that_begin_alike_share_published_blocks_while_they_are_held() {
        let mut pool = BlockPool::new(8, 4);
        let system: Vec<u32> = (0..9).collect();
        let mut first = BlockTable::new();
        first.grow(&mut pool, system.len()).unwrap(); // 3 blocks, the last partial
        pool.publish(&first, &system);
        // Another prompt with the same 8 first tokens takes both full blocks, not the partial one.
        let other: Vec<u32> = (0..8).chain([50, 51]).collect();
        assert_eq!(pool.published_len(&other), 8);
        let mut second = pool.share_published(&other);
        assert_eq!((second.len(), second.blocks()), (8, &first.blocks()[..2]));
        assert_eq!(pool.ref_count(first.blocks()[0]), 2);
        assert_eq!(
            second.grow(&mut pool, 2).unwrap(),
            None,
            "a new block, no copy"
        );
        // The last token is always left to compute; a different start shares nothing.
        assert_eq!(pool.published_len(&system[..8]), 4);
        assert_eq!(pool.published_len(&[1, 2, 3, 4, 5, 6, 7, 8, 9]), 0);
        // Freed blocks leave the registry; so does everything when the weights change.
        second.free(&mut pool);
        first.free(&mut pool);
        assert_eq!(pool.published_len(&other), 0);
        assert_eq!(pool.free_blocks(), 8);
        first.grow(&mut pool, system.len()).unwrap();
        pool.publish(&first, &system);
        pool.unpublish_all();
        assert_eq!(pool.published_len(&other), 0);
    }

    #[test]
    fn a_request_that_does_not_fit_changes_nothing() {
        let mut pool = BlockPool::new(2, 4);
        let mut a = BlockTable::new();
        a.grow(&mut pool, 5).unwrap();
        let before = (a.clone(), pool.free_blocks());
        let err = a.grow(&mut pool, 4).unwrap_err();
        assert_eq!(err, OutOfBlocks { needed: 1, free: 0 });
        assert_eq!((a, pool.free_blocks()), before);
    }

    #[test]
    fn a_budget_gives_whole_blocks() {
        // 30 layers, 3 kv heads of 64, f32, 16 positions: 737,280 bytes a block.
        let n = BlockPool::blocks_in_budget(10 * 737_280 + 5, 16, 30, 3, 64, 4);
        assert_eq!(n, 10);
    }

    /// Random admit / fork / grow / preempt / free, checking after each that every block is
    /// either free or held exactly as often as the tables hold it, and at the end that every
    /// block is back.
    #[test]
    fn ten_thousand_random_operations_leak_no_block() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as usize
        };
        let mut pool = BlockPool::new(64, 4);
        let mut live: Vec<BlockTable> = Vec::new();
        let (mut refused, mut preempted, mut copies) = (0, 0, 0);
        for _ in 0..10_000 {
            match next(5) {
                0 => {
                    let mut t = BlockTable::new();
                    match t.grow(&mut pool, 1 + next(20)) {
                        Ok(_) => live.push(t),
                        Err(_) => refused += 1,
                    }
                }
                1 if !live.is_empty() => {
                    let i = next(live.len());
                    let fork = live[i].fork(&mut pool);
                    live.push(fork);
                }
                2 | 3 if !live.is_empty() => {
                    let i = next(live.len());
                    match live[i].grow(&mut pool, 1 + next(3)) {
                        Ok(copy) => copies += usize::from(copy.is_some()),
                        // Preempt the grower: its blocks go back, it would re-prefill later.
                        Err(_) => {
                            live.swap_remove(i).free(&mut pool);
                            preempted += 1;
                        }
                    }
                }
                _ if !live.is_empty() => {
                    let i = next(live.len());
                    live.swap_remove(i).free(&mut pool);
                }
                _ => {}
            }
            let mut held = vec![0u32; pool.num_blocks()];
            for t in &live {
                assert_eq!(t.blocks().len(), pool.blocks_for(t.len()));
                for &b in t.blocks() {
                    held[b as usize] += 1;
                }
            }
            for (b, &h) in held.iter().enumerate() {
                assert_eq!(pool.ref_count(b as BlockId), h, "block {b}");
            }
            let used = held.iter().filter(|&&h| h > 0).count();
            assert_eq!(pool.free_blocks() + used, pool.num_blocks());
        }
        for mut t in live.drain(..) {
            t.free(&mut pool);
        }
        assert_eq!(pool.free_blocks(), pool.num_blocks(), "every block back");
        assert!(
            refused > 0 && preempted > 0 && copies > 0,
            "{refused} {preempted} {copies}"
        );
    }
}
