//! Which prompt a rollout worker takes next. In one process a counter shared by the pool's
//! workers; across processes a cursor over blocks claimed in the store, so that no two workers
//! anywhere take the same prompt.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::RolloutError;

/// Hands out prompt indices to a pool's workers.
pub trait PromptCursor: Send + Sync {
    /// The index of the next prompt to generate; `None` when this pool is to take no more
    /// (its workers then finish their batches and stop, as when the environment runs out).
    fn next(&self) -> Result<Option<u64>, RolloutError>;
    /// Prompts handed out since the pool started (the pool's `max_ahead` bound counts these).
    fn taken(&self) -> u64;
}

/// Consecutive indices from a first one: the cursor of a pool that owns its environment.
#[derive(Debug)]
pub struct Counter {
    first: u64,
    next: AtomicU64,
}

impl Counter {
    /// Indices `first`, `first + 1`, …
    pub fn new(first: u64) -> Self {
        Self {
            first,
            next: AtomicU64::new(first),
        }
    }
}

impl PromptCursor for Counter {
    fn next(&self) -> Result<Option<u64>, RolloutError> {
        Ok(Some(self.next.fetch_add(1, Ordering::SeqCst)))
    }

    fn taken(&self) -> u64 {
        self.next.load(Ordering::SeqCst) - self.first
    }
}
