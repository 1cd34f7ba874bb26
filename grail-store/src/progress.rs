//! What each side of a run tells the other besides weights and rollouts: the trainer how many
//! groups it has consumed (the workers' backpressure), each worker its counters (the trainer's
//! accounting and metrics). Small JSON objects, rewritten in place.

use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::layout::{TRAINER_HEARTBEAT, TRAINER_PROGRESS, WORKERS, worker_key};
use crate::store::Store;

/// `trainer/progress.json`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainerProgress {
    /// Groups the trainer is done with (trained, filtered or dropped as stale) since the run began.
    pub consumed_groups: u64,
    /// Groups in rollout objects the trainer refused (they will never be consumed).
    #[serde(default)]
    pub refused_groups: u64,
    /// The newest weights version published.
    pub version: u64,
}

/// `trainer/heartbeat.json`: rewritten every second from the trainer's start to its exit, so
/// that workers can tell a trainer that is gone (killed, its machine down) from a slow one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainerHeartbeat {
    /// When it was written (Unix milliseconds).
    pub heartbeat_ms: u64,
}

/// `workers/<id>.json`: a rollout worker's counters (samples unless named otherwise), rewritten
/// after each rollout object it writes and when it exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerCounters {
    /// Samples generated.
    pub generated: u64,
    /// Samples written to the store in rollout objects.
    pub sent: u64,
    /// Groups written to the store.
    pub sent_groups: u64,
    /// Samples in groups whose rewards failed.
    pub failed: u64,
    /// Groups whose rewards failed.
    pub failed_groups: u64,
    /// Samples generated but not written when the worker stopped.
    pub unsent_at_shutdown: u64,
    /// Completion tokens generated.
    pub tokens: u64,
    /// Prompts the worker has taken from its claimed blocks (one group each once generated).
    #[serde(default)]
    pub taken: u64,
    /// When these counters were written (Unix milliseconds): a worker rewrites them at least
    /// every second while it runs, so old ones mean it is gone.
    #[serde(default)]
    pub heartbeat_ms: u64,
    /// Whether the worker has stopped (these are its final counts).
    pub finished: bool,
}

/// How long a running worker's counters may go unwritten before others count it gone.
pub const GONE_AFTER_MS: u64 = 10_000;

/// The time now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl WorkerCounters {
    /// Whether the worker is still at work at `now` (Unix ms): not finished, and heard from in
    /// the last [`GONE_AFTER_MS`].
    pub fn running(&self, now: u64) -> bool {
        !self.finished && now.saturating_sub(self.heartbeat_ms) < GONE_AFTER_MS
    }
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("plain counters serialise")
}

/// Writes the trainer's progress.
pub fn put_trainer(store: &Store, progress: &TrainerProgress) -> Result<(), StoreError> {
    store.put(TRAINER_PROGRESS, json(progress))
}

/// The trainer's progress (zero before it has written any; unreadable JSON counts as none yet).
pub fn get_trainer(store: &Store) -> Result<TrainerProgress, StoreError> {
    Ok(store
        .get(TRAINER_PROGRESS)?
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default())
}

/// Writes the trainer's heartbeat, stamped now.
pub fn put_trainer_heartbeat(store: &Store) -> Result<(), StoreError> {
    let beat = TrainerHeartbeat {
        heartbeat_ms: now_ms(),
    };
    store.put(TRAINER_HEARTBEAT, json(&beat))
}

/// When the trainer's heartbeat was last written (Unix ms), if it ever was.
pub fn trainer_heartbeat(store: &Store) -> Result<Option<u64>, StoreError> {
    Ok(store
        .get(TRAINER_HEARTBEAT)?
        .and_then(|b| serde_json::from_slice::<TrainerHeartbeat>(&b).ok())
        .map(|h| h.heartbeat_ms))
}

/// Writes `worker`'s counters.
pub fn put_worker(store: &Store, worker: &str, c: &WorkerCounters) -> Result<(), StoreError> {
    store.put(&worker_key(worker), json(c))
}

/// Every worker's counters, by worker id. Unreadable ones are skipped with a warning.
pub fn get_workers(store: &Store) -> Result<Vec<(String, WorkerCounters)>, StoreError> {
    let mut out = Vec::new();
    for key in store.list(WORKERS)? {
        let Some(id) = key
            .strip_prefix(WORKERS)
            .and_then(|k| k.strip_suffix(".json"))
        else {
            continue;
        };
        let Some(bytes) = store.get(&key)? else {
            continue;
        };
        match serde_json::from_slice(&bytes) {
            Ok(c) => out.push((id.to_string(), c)),
            Err(e) => {
                tracing::warn!(key = %store.location(&key), "unreadable worker counters: {e}")
            }
        }
    }
    Ok(out)
}
