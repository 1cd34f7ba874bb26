//! Which prompts a rollout worker generates: blocks of consecutive prompt indices, each claimed
//! by a conditional create of `prompts/<block>`, so two workers never take the same prompts
//! however many join or leave, with no coordinator.

use std::ops::Range;

use crate::error::StoreError;
use crate::layout::{PROMPTS, claim_key, parse_claim_key};
use crate::store::Store;

/// A worker's claims on blocks of `block_size` prompts.
pub struct PromptClaims {
    store: Store,
    worker: String,
    block_size: u64,
    next_block: u64,
}

impl PromptClaims {
    /// Claims for `worker`, starting after the highest block claimed so far.
    pub fn new(store: Store, worker: &str, block_size: u64) -> Result<Self, StoreError> {
        let next_block = store
            .list(PROMPTS)?
            .iter()
            .filter_map(|k| parse_claim_key(k))
            .max()
            .map_or(0, |b| b + 1);
        Ok(Self {
            store,
            worker: worker.to_string(),
            block_size: block_size.max(1),
            next_block,
        })
    }

    /// Claims the next free block and returns its prompt indices. A block another worker got
    /// first is skipped.
    pub fn claim(&mut self) -> Result<Range<u64>, StoreError> {
        loop {
            let block = self.next_block;
            self.next_block += 1;
            if self
                .store
                .create(&claim_key(block), self.worker.clone().into_bytes())?
            {
                let start = block * self.block_size;
                return Ok(start..start + self.block_size);
            }
        }
    }
}
