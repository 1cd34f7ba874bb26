//! A rollout worker's side of the rollouts: each batch of scored groups becomes one immutable
//! Parquet object under the worker's own folder.

use grail_protocol::Group;

use crate::error::StoreError;
use crate::layout::{ROLLOUTS, check_worker_id, rollout_key};
use crate::rollout_batch::{RolloutBatch, encode};
use crate::store::Store;

/// Writes `rollouts/<worker>/<seq>.parquet`, `seq` counting up from the worker's last object.
pub struct RolloutWriter {
    store: Store,
    worker: String,
    reward_names: Vec<String>,
    next_seq: u64,
}

impl RolloutWriter {
    /// The writer of `worker` (one path segment: letters, digits, `-`, `_`, `.`), whose rewards
    /// are named `reward_names`. A worker id already in the store continues after its objects.
    pub fn new(store: Store, worker: &str, reward_names: Vec<String>) -> Result<Self, StoreError> {
        check_worker_id(worker)?;
        let prefix = format!("{ROLLOUTS}{worker}/");
        let next_seq = store
            .list(&prefix)?
            .iter()
            .filter_map(|k| {
                k.strip_prefix(&prefix)?
                    .strip_suffix(".parquet")?
                    .parse()
                    .ok()
            })
            .max()
            .map_or(0, |last: u64| last + 1);
        Ok(Self {
            store,
            worker: worker.to_string(),
            reward_names,
            next_seq,
        })
    }

    /// The worker's id.
    pub fn worker(&self) -> &str {
        &self.worker
    }

    /// Writes `groups` as the worker's next object and returns its key. Objects are created,
    /// never replaced: should another process write under the same id, the next free number is
    /// taken.
    pub fn write(&mut self, groups: Vec<Group>) -> Result<String, StoreError> {
        let batch = RolloutBatch {
            worker_id: self.worker.clone(),
            reward_names: self.reward_names.clone(),
            groups,
        };
        let bytes = encode(&batch).map_err(|why| StoreError::Encode {
            key: self
                .store
                .location(&rollout_key(&self.worker, self.next_seq)),
            why,
        })?;
        loop {
            let key = rollout_key(&self.worker, self.next_seq);
            self.next_seq += 1;
            if self.store.create(&key, bytes.clone())? {
                return Ok(key);
            }
        }
    }
}
