//! The trainer's side of the rollouts: every object written under `rollouts/` is read once, in
//! order of arrival as listed, and the keys read are the consumed cursor a restart continues from.

use std::collections::BTreeSet;

use crate::error::StoreError;
use crate::layout::ROLLOUTS;
use crate::rollout_batch::{RolloutBatch, decode};
use crate::store::Store;

/// One rollout object: its key and its groups, or why it cannot be read (a torn or corrupt
/// object: the caller counts and skips it).
#[derive(Debug)]
pub struct Arrival {
    /// The object's key.
    pub key: String,
    /// Its contents, or what is wrong with them.
    pub batch: Result<RolloutBatch, String>,
}

/// Reads the rollout objects not read before.
pub struct RolloutReader {
    store: Store,
    read: BTreeSet<String>,
}

impl RolloutReader {
    /// A reader that has read nothing yet.
    pub fn new(store: Store) -> Self {
        Self::after(store, [])
    }

    /// A reader that has already read `keys` (the cursor saved with a checkpoint).
    pub fn after(store: Store, keys: impl IntoIterator<Item = String>) -> Self {
        Self {
            store,
            read: keys.into_iter().collect(),
        }
    }

    /// The keys read so far.
    pub fn read_keys(&self) -> impl Iterator<Item = &str> {
        self.read.iter().map(String::as_str)
    }

    /// Keys under `rollouts/` not read yet, oldest sequence number first across workers.
    pub fn unread(&self) -> Result<Vec<String>, StoreError> {
        let mut keys: Vec<String> = self
            .store
            .list(ROLLOUTS)?
            .into_iter()
            .filter(|k| k.ends_with(".parquet") && !self.read.contains(k))
            .collect();
        // `rollouts/<worker>/<seq>.parquet`: interleave workers by sequence number.
        keys.sort_by(|a, b| (file_name(a), a).cmp(&(file_name(b), b)));
        Ok(keys)
    }

    /// Reads up to `max` objects not read before. An object that is listed but gone by the time
    /// it is read is left for the next call.
    pub fn poll(&mut self, max: usize) -> Result<Vec<Arrival>, StoreError> {
        let mut out = Vec::new();
        for key in self.unread()?.into_iter().take(max) {
            let Some(bytes) = self.store.get(&key)? else {
                continue;
            };
            let batch =
                decode(bytes).map_err(|why| format!("{}: {why}", self.store.location(&key)));
            self.read.insert(key.clone());
            out.push(Arrival { key, batch });
        }
        Ok(out)
    }
}

fn file_name(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}
