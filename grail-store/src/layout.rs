//! Where a run's weights live in the store, and the READY marker that makes a version visible.
//!
//! ```text
//! <run>/weights/000000000010/full-<h>.safetensors   an anchor: every tensor at the wire dtype
//! <run>/weights/000000000011/delta-<h>.bin          changed values since version 10
//! <run>/weights/000000000011/READY                  written last; names the payload
//! ```
//!
//! Version folders are zero-padded so that keys sort in version order. A payload's name holds
//! the xxh3-64 of its bytes (`<h>`, 16 hex digits), so an object never changes once written:
//! two writers racing for a version write two payloads, and the READY marker that wins the
//! conditional create names its own.

use grail_protocol::{PolicyVersion, WireDtype};

/// The folder of every weight version.
pub const WEIGHTS: &str = "weights/";

/// Marker file name.
pub const READY_FILE: &str = "READY";

/// `weights/<version, 12 digits>/<file>`.
pub fn weight_key(version: PolicyVersion, file: &str) -> String {
    format!("{WEIGHTS}{version:012}/{file}")
}

/// The version and file name of a key under [`WEIGHTS`], if it is one.
pub fn parse_weight_key(key: &str) -> Option<(PolicyVersion, &str)> {
    let rest = key.strip_prefix(WEIGHTS)?;
    let (dir, file) = rest.split_once('/')?;
    if dir.len() != 12 || !dir.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((dir.parse().ok()?, file))
}

/// Whether a version is a whole copy of the weights or the changes since the previous one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionKind {
    /// Every tensor (`full-<h>.safetensors`).
    Full,
    /// Changed values since `base` (`delta-<h>.bin`).
    Delta,
}

impl VersionKind {
    /// The payload's file name: `full-<h>.safetensors` or `delta-<h>.bin`, `<h>` the xxh3-64 of
    /// `bytes`.
    pub fn payload_name(self, bytes: &[u8]) -> String {
        let h = xxhash_rust::xxh3::xxh3_64(bytes);
        match self {
            VersionKind::Full => format!("full-{h:016x}.safetensors"),
            VersionKind::Delta => format!("delta-{h:016x}.bin"),
        }
    }
}

/// The READY marker of a version: written after its payload, so a reader that sees it can read
/// the payload whole; it carries what the reader checks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ready {
    /// The version.
    pub version: PolicyVersion,
    /// Anchor or delta.
    pub kind: VersionKind,
    /// For a delta, the version it applies to (the previous one).
    pub base: Option<PolicyVersion>,
    /// The anchor this version's chain of deltas starts from (itself for an anchor).
    pub anchor: PolicyVersion,
    /// The payload's file name in the version's folder.
    pub payload: String,
    /// The dtype the values travel at.
    pub wire: WireDtype,
    /// xxh3-128 of the weights at this version (`grail_protocol::weights_hash`), 32 hex digits.
    pub hash: String,
    /// Payload size in bytes.
    pub bytes: u64,
    /// When the writer finished the payload (Unix ms; absent in markers of older writers): a
    /// reader's clock minus this is how long the version took to reach it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_ms: Option<u64>,
}

/// A hash as the marker writes it.
pub fn hash_hex(hash: u128) -> String {
    format!("{hash:032x}")
}

/// The folder of every rollout object: `rollouts/<worker id>/<sequence, 12 digits>.parquet`.
pub const ROLLOUTS: &str = "rollouts/";

/// The `seq`-th rollout object of `worker`.
pub fn rollout_key(worker: &str, seq: u64) -> String {
    format!("{ROLLOUTS}{worker}/{seq:012}.parquet")
}

/// The worker whose folder holds the rollout object at `key` (`rollouts/<worker>/<seq>.parquet`).
pub fn rollout_worker(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(ROLLOUTS)?;
    let (worker, _) = rest.split_once('/')?;
    Some(worker)
}

/// A worker id must be one path segment of letters, digits, `-`, `_` and `.` (not first).
pub fn check_worker_id(worker: &str) -> Result<(), crate::StoreError> {
    let valid = !worker.is_empty()
        && worker
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !worker.starts_with('.');
    if valid {
        Ok(())
    } else {
        Err(crate::StoreError::WorkerId(worker.to_string()))
    }
}

/// The folder of prompt-block claims: `prompts/<block, 12 digits>` holds the claiming worker's id.
pub const PROMPTS: &str = "prompts/";

/// The claim of prompt block `block`.
pub fn claim_key(block: u64) -> String {
    format!("{PROMPTS}{block:012}")
}

/// The block number of a claim key, if it is one.
pub fn parse_claim_key(key: &str) -> Option<u64> {
    let digits = key.strip_prefix(PROMPTS)?;
    (digits.len() == 12 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The folder of the run's manifest, written by the trainer before its first weights: the
/// tokenizer's files (`run/tokenizer/`), the model's Hugging Face config (`run/config.json`)
/// and, last, the job config (`run/config.toml`); rollout workers start from these alone.
pub const RUN: &str = "run/";

/// Created (conditionally) by the trainer first: one trainer per run.
pub const TRAINER_CLAIM: &str = "run/TRAINER";

/// Written by the trainer when its GRPO phase ends (finished, stopped or failed); rollout
/// workers exit when they see it.
pub const FINISHED: &str = "run/FINISHED";

/// The trainer's progress (JSON): groups consumed and refused in all, the newest version.
pub const TRAINER_PROGRESS: &str = "trainer/progress.json";

/// The trainer's heartbeat (JSON), rewritten every second while it reads rollouts.
pub const TRAINER_HEARTBEAT: &str = "trainer/heartbeat.json";

/// The folder of the workers' counters: `workers/<worker id>.json`.
pub const WORKERS: &str = "workers/";

/// Where `worker` publishes its counters.
pub fn worker_key(worker: &str) -> String {
    format!("{WORKERS}{worker}.json")
}
