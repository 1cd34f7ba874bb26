//! Run checkpoints: `output_dir/checkpoint-<step>/` holds everything a run needs to continue as
//! if it had never stopped, and is written as a whole (a temporary directory, synced, renamed
//! into place), so a crash at any moment leaves every earlier checkpoint intact.
//!
//! Files: the policy in Hugging Face layout (`model.safetensors`, `config.json`) with its
//! tokenizer (`tokenizer.json`, `tokenizer_config.json`), so the directory is also a model
//! transformers and `[model] path` load; `optimizer.bpk` and `trainer_state.json` (step, policy
//! version, trainer config; see `grail_trainer::state`); `reference/` when the loss has a KL
//! term; and `run_state.json` ([`RunState`]), written last.
//!
//! With a store, each checkpoint is also uploaded to it with the run's `metrics.jsonl` (see
//! `grail_store::checkpoints`), and a trainer resumed without its `output_dir` (another
//! machine) takes the newest one from there.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use grail_core::atomic;
use grail_core::tokenizer::Tokenizer;
use grail_store::{Store, checkpoints};
use grail_trainer::trainer::GrpoTrainer;
use serde::{Deserialize, Serialize};

use crate::output::METRICS_FILE;

const RUN_STATE: &str = "run_state.json";
const PREFIX: &str = "checkpoint-";

/// Where every sample of a run went. `generated = trained + dropped_stale + dropped_filtered +
/// unused_at_close + left_in_channel + failed + unsent_at_shutdown + rejected` and `sent =
/// received + left_in_channel + rejected`, summed over the run's attempts when it was resumed.
/// With a store, the rollout side's counts are the workers' own, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accounting {
    /// Samples the rollout pool generated.
    pub generated: usize,
    /// Samples the pool sent to the trainer.
    pub sent: usize,
    /// Samples in groups whose rewards failed.
    pub failed: usize,
    /// Samples generated but not sent when the pool shut down.
    pub unsent_at_shutdown: usize,
    /// Samples the trainer took off the channel.
    pub received: usize,
    /// Samples trained on.
    pub trained: usize,
    /// Samples dropped as too stale.
    pub dropped_stale: usize,
    /// Samples in groups filtered out for zero reward spread.
    pub dropped_filtered: usize,
    /// Samples received but not trained on when the run stopped mid-batch.
    pub unused_at_close: usize,
    /// Samples still in transit when the run stopped: in the channel, or (with a store) in
    /// rollout objects not read yet.
    pub left_in_channel: usize,
    /// Samples the trainer refused (with a store: in rollout objects that were torn, corrupt or
    /// failed its checks).
    #[serde(default)]
    pub rejected: usize,
}

impl Accounting {
    /// Whether every generated sample is accounted for.
    pub fn identity_holds(&self) -> bool {
        self.generated
            == self.trained
                + self.dropped_stale
                + self.dropped_filtered
                + self.unused_at_close
                + self.left_in_channel
                + self.failed
                + self.unsent_at_shutdown
                + self.rejected
            && self.sent == self.received + self.left_in_channel + self.rejected
    }

    /// The sum of two attempts' accounting.
    pub fn plus(&self, o: &Accounting) -> Accounting {
        Accounting {
            generated: self.generated + o.generated,
            sent: self.sent + o.sent,
            failed: self.failed + o.failed,
            unsent_at_shutdown: self.unsent_at_shutdown + o.unsent_at_shutdown,
            received: self.received + o.received,
            trained: self.trained + o.trained,
            dropped_stale: self.dropped_stale + o.dropped_stale,
            dropped_filtered: self.dropped_filtered + o.dropped_filtered,
            unused_at_close: self.unused_at_close + o.unused_at_close,
            left_in_channel: self.left_in_channel + o.left_in_channel,
            rejected: self.rejected + o.rejected,
        }
    }

    /// The trainer's side of two attempts summed, with the rollout side (generated, sent,
    /// failed, unsent, left in transit, rejected) of `later` alone: for rollout counts that are
    /// already the whole run's (a store's workers count from the run's start).
    pub fn then(&self, later: &Accounting) -> Accounting {
        Accounting {
            generated: later.generated,
            sent: later.sent,
            failed: later.failed,
            unsent_at_shutdown: later.unsent_at_shutdown,
            left_in_channel: later.left_in_channel,
            rejected: later.rejected,
            ..self.plus(later)
        }
    }

    /// As JSON, with `identity_holds`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("serialisable");
        v["identity_holds"] = self.identity_holds().into();
        v
    }
}

/// The run's own state at a checkpoint (the trainer's is in `trainer_state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// GRPO optimizer steps taken.
    pub step: usize,
    /// The index of the first prompt a resumed pool takes.
    pub prompt_cursor: u64,
    /// Held-out accuracy after the SFT warm-up.
    pub baseline_accuracy: f64,
    /// Wall time of the SFT warm-up.
    pub sft_seconds: f64,
    /// Wall time spent in GRPO so far, over every attempt.
    pub grpo_seconds: f64,
    /// Steps during which the pool generated while the trainer trained, so far.
    pub overlapped_steps: usize,
    /// Where the samples settled so far went (samples still in flight are not counted: a
    /// resumed pool regenerates their prompts).
    pub accounting: Accounting,
    /// With a store: which rollout objects the trainer had settled, so a resumed trainer
    /// neither trains on them again nor skips what it had not settled.
    #[serde(default)]
    pub rollouts: Option<RolloutCursor>,
}

/// The trainer's place in a store's rollout objects at a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutCursor {
    /// Objects done with: every group settled, or the object refused.
    pub settled: Vec<String>,
    /// The object in progress and how many of its groups (in order) were settled.
    pub partial: Option<(String, usize)>,
    /// Samples in the decodable settled objects, by worker (for the accounting of objects
    /// that could not be decoded).
    pub decoded: std::collections::BTreeMap<String, u64>,
    /// Samples in refused objects.
    pub refused_samples: u64,
    /// Groups in refused objects.
    pub refused_groups: u64,
    /// Samples in refused objects, by worker and reason.
    #[serde(default)]
    pub refused_by: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
    /// Groups settled by the trainer since the run began (`trainer/progress.json`).
    pub consumed_groups: u64,
}

/// The directory of the checkpoint at `step`.
pub fn checkpoint_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!("{PREFIX}{step}"))
}

/// Every complete checkpoint in `output_dir` (one with its `run_state.json`), oldest first.
pub fn checkpoints(output_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(output_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("reading {}", output_dir.display())),
    };
    for entry in entries {
        let path = entry
            .with_context(|| format!("reading {}", output_dir.display()))?
            .path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|n| n.parse::<usize>().ok());
        if let Some(step) = step
            && path.join(RUN_STATE).is_file()
        {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Writes the checkpoint at the trainer's step as a whole, uploads it to `store` if there is
/// one, then removes the oldest ones beyond `keep` (in both places). Returns its directory.
pub fn save(
    output_dir: &Path,
    trainer: &GrpoTrainer,
    tokenizer: &Tokenizer,
    state: &RunState,
    keep: Option<usize>,
    store: Option<&Store>,
) -> Result<PathBuf> {
    let dir = checkpoint_dir(output_dir, trainer.step());
    atomic::write_dir(&dir, |tmp| -> Result<()> {
        trainer.write_state(tmp)?;
        tokenizer.save(tmp)?;
        let json = serde_json::to_string_pretty(state).expect("serialisable");
        atomic::write_file(&tmp.join(RUN_STATE), json.as_bytes())?;
        Ok(())
    })
    .with_context(|| format!("writing checkpoint {}", dir.display()))?;
    if let Some(keep) = keep {
        let all = checkpoints(output_dir)?;
        for (_, old) in &all[..all.len().saturating_sub(keep)] {
            std::fs::remove_dir_all(old)
                .with_context(|| format!("removing old checkpoint {}", old.display()))?;
        }
    }
    if let Some(store) = store {
        upload(store, output_dir, trainer.step(), &dir, keep)?;
    }
    Ok(dir)
}

/// Uploads the checkpoint in `dir` with the run's metrics so far. The local checkpoint is
/// already safe, so a store that keeps failing (three tries) is a warning, not the run's end.
fn upload(
    store: &Store,
    output_dir: &Path,
    step: usize,
    dir: &Path,
    keep: Option<usize>,
) -> Result<()> {
    let start = std::time::Instant::now();
    let mut files = checkpoints::files_under(dir)?;
    let metrics = output_dir.join(METRICS_FILE);
    if metrics.is_file() {
        files.push((METRICS_FILE.to_string(), metrics));
    }
    let at = store.location(&checkpoints::checkpoint_key(step as u64, ""));
    for attempt in 1..=3 {
        match checkpoints::upload(store, step as u64, &files, keep) {
            Ok(bytes) => {
                tracing::info!(
                    step,
                    megabytes = bytes as f64 / 1e6,
                    seconds = start.elapsed().as_secs_f64(),
                    at,
                    "checkpoint uploaded"
                );
                return Ok(());
            }
            Err(e) if attempt < 3 => {
                tracing::warn!(
                    step,
                    attempt,
                    "uploading the checkpoint failed, retrying: {e}"
                );
                std::thread::sleep(std::time::Duration::from_secs(1 << attempt));
            }
            Err(e) => tracing::warn!(
                step,
                local = %dir.display(),
                "the checkpoint is not in the store (three uploads failed; a resume on another \
                 machine would start from an older one): {e}"
            ),
        }
    }
    Ok(())
}

/// Copies the newest checkpoint in `store` into `output_dir` when it is newer than every
/// checkpoint there (a trainer resumed on a machine without the run's `output_dir`, or whose
/// copy is behind), with the run's `metrics.jsonl` up to it. A stored checkpoint found corrupt
/// is reported, discarded and the next older one tried; a store that cannot be read is an
/// error.
pub fn fetch_from_store(store: &Store, output_dir: &Path) -> Result<()> {
    let local = checkpoints(output_dir)?
        .last()
        .map(|(step, _)| *step as u64);
    for step in checkpoints::stored(store)?.into_iter().rev() {
        if local.is_some_and(|l| l >= step) {
            return Ok(());
        }
        let dir = checkpoint_dir(output_dir, step as usize);
        let fetched = atomic::write_dir(&dir, |tmp| -> Result<()> {
            checkpoints::download(store, step, tmp)?;
            // The stored metrics are the run's up to this checkpoint; local ones, if any, are
            // from an older place in the run.
            let stored = tmp.join(METRICS_FILE);
            if stored.is_file() {
                atomic::write_file(&output_dir.join(METRICS_FILE), &std::fs::read(&stored)?)?;
                std::fs::remove_file(&stored)?;
            }
            Ok(())
        });
        match fetched {
            Ok(()) => {
                tracing::info!(step, dir = %dir.display(), "checkpoint taken from the store");
                return Ok(());
            }
            Err(e)
                if matches!(
                    e.downcast_ref::<grail_store::StoreError>(),
                    Some(grail_store::StoreError::Corrupt { .. })
                ) =>
            {
                tracing::warn!(
                    step,
                    "stored checkpoint corrupt, discarded; trying an older one: {e:#}"
                );
                checkpoints::discard(store, step)?;
            }
            Err(e) => {
                return Err(e.context(format!("taking checkpoint {step} from the store")));
            }
        }
    }
    Ok(())
}

/// Reads a checkpoint's run state, checking the checkpoint is complete.
pub fn load_run_state(dir: &Path) -> Result<RunState> {
    let path = dir.join(RUN_STATE);
    if !path.is_file() {
        bail!(
            "{} is not a grail checkpoint (no {RUN_STATE}; checkpoints are the checkpoint-<step> directories of a run's output_dir)",
            dir.display()
        );
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint folder as `checkpoints` recognises it, and its files for the store.
    fn stored_checkpoint(store: &Store, step: u64, metrics: &str) {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("ckpt");
        std::fs::create_dir(&ckpt).unwrap();
        std::fs::write(ckpt.join(RUN_STATE), format!("{{\"step\": {step}}}")).unwrap();
        std::fs::write(ckpt.join("model.safetensors"), b"weights").unwrap();
        std::fs::write(dir.path().join(METRICS_FILE), metrics).unwrap();
        let mut files = checkpoints::files_under(&ckpt).unwrap();
        files.push((METRICS_FILE.into(), dir.path().join(METRICS_FILE)));
        checkpoints::upload(store, step, &files, None).unwrap();
    }

    fn local_steps(output_dir: &Path) -> Vec<usize> {
        let local = checkpoints(output_dir).unwrap();
        local.iter().map(|(step, _)| *step).collect()
    }

    #[test]
    fn a_resume_elsewhere_takes_the_newest_sound_stored_checkpoint_and_its_metrics() {
        let store = Store::open("memory://", "run").unwrap();
        stored_checkpoint(&store, 2, "step 1\nstep 2\n");
        stored_checkpoint(&store, 4, "step 1\nstep 2\nstep 3\nstep 4\n");
        store
            .put(
                &checkpoints::checkpoint_key(4, "model.safetensors"),
                b"torn".to_vec(),
            )
            .unwrap();
        let out = tempfile::tempdir().unwrap();
        fetch_from_store(&store, out.path()).unwrap();
        assert_eq!(
            local_steps(out.path()),
            [2],
            "the corrupt step 4 is skipped"
        );
        assert_eq!(checkpoints::stored(&store).unwrap(), [2], "and discarded");
        let metrics = std::fs::read_to_string(out.path().join(METRICS_FILE)).unwrap();
        assert_eq!(metrics, "step 1\nstep 2\n");
        assert!(!checkpoint_dir(out.path(), 2).join(METRICS_FILE).exists());

        // A machine whose copy is behind takes the newer one, and its metrics with it.
        stored_checkpoint(&store, 6, "step 1 to 6\n");
        fetch_from_store(&store, out.path()).unwrap();
        assert_eq!(local_steps(out.path()), [2, 6]);
        let metrics = std::fs::read_to_string(out.path().join(METRICS_FILE)).unwrap();
        assert_eq!(metrics, "step 1 to 6\n");
        // Nothing newer in the store: nothing changes.
        fetch_from_store(&store, out.path()).unwrap();
        assert_eq!(local_steps(out.path()), [2, 6]);
    }
}
