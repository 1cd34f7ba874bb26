//! A rollout worker's prompt cursor: prompt indices from the blocks it claims in the store, and
//! the run's admission bound across processes. A worker claims a new block only while the
//! groups all workers have taken and the trainer has not yet consumed, refused or seen fail are
//! fewer than `(max_ahead + 1) × prompts_per_step` — the bound of a pool in one process, with
//! every worker's counts summed, so that samples are not generated only to arrive stale.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grail_rollout::{PromptCursor, RolloutError};
use grail_store::progress::{self, now_ms};
use grail_store::{PromptClaims, Store, StoreError};

/// How often a worker held back by the bound looks again.
const RECHECK: Duration = Duration::from_millis(20);

/// Prompt indices from claimed blocks, admitted under the run's bound.
pub(crate) struct ClaimedPrompts {
    store: Store,
    worker: String,
    /// Groups that may be ahead of the trainer over all workers; `None`: no bound.
    room: Option<u64>,
    /// Set when the worker is to stop: the cursor then hands out nothing more.
    end: Arc<AtomicBool>,
    state: Mutex<Claimed>,
}

struct Claimed {
    claims: PromptClaims,
    block: Range<u64>,
    taken: u64,
}

impl ClaimedPrompts {
    pub(crate) fn new(
        store: Store,
        worker: &str,
        block_size: u64,
        room: Option<u64>,
        end: Arc<AtomicBool>,
    ) -> Result<Self, StoreError> {
        let claims = PromptClaims::new(store.clone(), worker, block_size)?;
        Ok(Self {
            store,
            worker: worker.to_string(),
            room,
            end,
            state: Mutex::new(Claimed {
                claims,
                block: 0..0,
                taken: 0,
            }),
        })
    }

    /// Groups taken by all workers and not yet settled by the trainer, `taken` being this
    /// worker's own count. A worker that is gone (finished, or silent for
    /// [`progress::GONE_AFTER_MS`]) counts only the groups it wrote: the rest of its claims died
    /// with it.
    fn ahead(&self, taken: u64) -> Result<u64, StoreError> {
        let trainer = progress::get_trainer(&self.store)?;
        let now = now_ms();
        let mut open = taken;
        let mut failed = 0;
        for (id, c) in progress::get_workers(&self.store)? {
            failed += c.failed_groups;
            if id == self.worker {
                continue;
            }
            open += if c.running(now) {
                c.taken
            } else {
                c.sent_groups + c.failed_groups
            };
        }
        Ok(open.saturating_sub(trainer.consumed_groups + trainer.refused_groups + failed))
    }
}

impl PromptCursor for ClaimedPrompts {
    fn next(&self) -> Result<Option<u64>, RolloutError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.block.is_empty() {
            let at = state.block.end;
            let store_error =
                |e: StoreError| RolloutError::prompt(at, format!("claiming prompts: {e}"));
            loop {
                if self.end.load(Ordering::SeqCst) {
                    return Ok(None);
                }
                let admitted = match self.room {
                    None => true,
                    Some(room) => self.ahead(state.taken).map_err(store_error)? < room,
                };
                if admitted {
                    break;
                }
                std::thread::sleep(RECHECK);
            }
            state.block = state.claims.claim().map_err(store_error)?;
        }
        state.taken += 1;
        Ok(state.block.next())
    }

    fn taken(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).taken
    }
}
