//! The trainer's side of a run spread over processes (`role = "trainer"`): it publishes the run
//! (manifest, then weights) to the store, an inbox thread turns the rollout objects workers write
//! into groups on the channel the trainer reads, and at the end it marks the run finished and
//! accounts for every sample the workers report.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use grail_core::model::{CausalLm, named_tensors};
use grail_core::tokenizer::Tokenizer;
use grail_protocol::{Group, PolicyVersion, WireDtype};
use grail_rollout::pool::PoolCounters;
use grail_store::progress::{self, TrainerProgress, WorkerCounters};
use grail_store::rollout_batch::decode;
use grail_store::{
    RolloutBatch, RolloutCheck, RolloutReader, Store, WeightWriter, WeightWriterConfig, layout,
};
use grail_trainer::{Feedback, TrainerError};

use crate::checkpoint::{Accounting, RolloutCursor};
use crate::config::GrpoConfig;
use crate::rollout_ledger::Ledger;
use crate::rollout_verification::{RecentPolicies, Refusal, RunRules, Verification, sketch_seed};

/// The dtype weights travel in.
const WIRE: WireDtype = WireDtype::Bf16;
/// How often the inbox looks for new rollout objects.
const POLL: Duration = Duration::from_millis(50);
/// How long the trainer waits, once finished, for running workers to report their final counts.
const FINISH_WAIT: Duration = Duration::from_secs(30);

/// Writes the run's manifest — the job config, the tokenizer, the model's config — so that a
/// rollout worker needs only the store URL and run id.
pub(crate) fn publish_manifest(
    store: &Store,
    cfg: &GrpoConfig,
    tokenizer: &Tokenizer,
    model: &CausalLm,
) -> Result<()> {
    let scratch = tempfile::tempdir().context("a temporary folder for the run manifest")?;
    tokenizer.save(scratch.path())?;
    for entry in std::fs::read_dir(scratch.path())? {
        let path = entry?.path();
        let name = path
            .file_name()
            .expect("a file")
            .to_string_lossy()
            .to_string();
        store.put(
            &format!("{}tokenizer/{name}", layout::RUN),
            std::fs::read(&path)?,
        )?;
    }
    let model_config = model.config.to_hf_json("bfloat16");
    store.put(
        &format!("{}config.json", layout::RUN),
        serde_json::to_vec_pretty(&model_config)?,
    )?;
    if cfg.grpo.verify_rollouts {
        crate::rollout_verification::sketch_seed(store)?;
    }
    // Written last: a worker that finds the job config finds everything else.
    store.put(
        &format!("{}config.toml", layout::RUN),
        toml::to_string(cfg)?.into_bytes(),
    )?;
    Ok(())
}

/// The trainer's news for the workers, through the store: each version's weights (anchor or
/// delta, READY last) and the consumed count.
pub(crate) struct StoreFeedback {
    store: Store,
    writer: WeightWriter,
    /// Shared with the inbox, which publishes its refusals too (the workers' admission bound
    /// counts refused groups: unpublished, they would hold the workers back).
    progress: Arc<Mutex<TrainerProgress>>,
    newest: Arc<AtomicU64>,
    ledger: Arc<Mutex<Ledger>>,
    /// The weights the inbox verifies with (when it verifies), and how many versions back.
    policies: Option<(RecentPolicies, u64)>,
}

impl StoreFeedback {
    /// Publishes `model` as `version` (this attempt's first weights) and returns the feedback;
    /// `ledger` holds the consumed and refused counts of earlier attempts.
    pub(crate) fn start(
        store: &Store,
        cfg: &GrpoConfig,
        model: &CausalLm,
        version: PolicyVersion,
        ledger: &Arc<Mutex<Ledger>>,
    ) -> Result<Self> {
        let writer = WeightWriter::new(
            store.clone(),
            WeightWriterConfig {
                wire: WIRE,
                anchor_interval: cfg.grpo.weight_anchor_interval,
                ..WeightWriterConfig::default()
            },
        );
        let mut feedback = Self {
            store: store.clone(),
            writer,
            progress: Arc::new(Mutex::new(TrainerProgress {
                consumed_groups: lock(ledger).consumed_groups(0),
                ..TrainerProgress::default()
            })),
            newest: Arc::new(AtomicU64::new(version)),
            ledger: ledger.clone(),
            policies: (cfg.grpo.verify_rollouts)
                .then(|| (RecentPolicies::default(), cfg.grpo.max_staleness + 1)),
        };
        feedback.publish(version, model)?;
        Ok(feedback)
    }
}

impl StoreFeedback {
    /// Publishes the trainer's progress after `change`.
    fn put_progress(
        &mut self,
        change: impl FnOnce(&mut TrainerProgress),
    ) -> grail_trainer::Result<()> {
        put_progress(&self.store, &self.progress, &self.ledger, change).map_err(store_error)
    }
}

/// Applies `change` to the trainer's progress, takes the refused groups from `ledger` and writes
/// it to the store, all under the progress lock (the publisher and the inbox both write it).
fn put_progress(
    store: &Store,
    progress: &Mutex<TrainerProgress>,
    ledger: &Mutex<Ledger>,
    change: impl FnOnce(&mut TrainerProgress),
) -> Result<(), grail_store::StoreError> {
    let mut p = progress.lock().unwrap_or_else(|p| p.into_inner());
    change(&mut p);
    p.refused_groups = lock(ledger).refused_groups;
    progress::put_trainer(store, &p)
}

fn store_error(e: grail_store::StoreError) -> TrainerError {
    TrainerError::Feedback(e.to_string())
}

impl Feedback for StoreFeedback {
    fn publish(&mut self, version: PolicyVersion, model: &CausalLm) -> grail_trainer::Result<()> {
        let tensors = named_tensors(model, WIRE);
        if let Some((policies, keep)) = &self.policies {
            policies
                .add(version, model, &tensors, *keep)
                .map_err(|e| TrainerError::Feedback(format!("{e:#}")))?;
        }
        // Known before its READY marker can be seen, so no group sampled from it is refused.
        self.newest.store(version, Ordering::SeqCst);
        self.writer
            .publish(version, &tensors)
            .map_err(store_error)?;
        self.put_progress(|p| p.version = version)
    }

    fn consumed(&mut self, groups: usize) -> grail_trainer::Result<()> {
        self.put_progress(|p| p.consumed_groups += groups as u64)
    }
}

/// The trainer's heartbeat (`trainer/heartbeat.json`), written every second by a thread of its
/// own for as long as this value lives: from the trainer's start, through SFT, resume, steps,
/// checkpoints and evaluations alike, so that workers hear from a live trainer whatever it does.
pub(crate) struct Heartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    /// Starts beating into `store` (the first beat before returning).
    pub(crate) fn start(store: &Store) -> Result<Self> {
        progress::put_trainer_heartbeat(store)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::Builder::new()
                .name("grail-heartbeat".into())
                .spawn(move || {
                    let mut beat = Instant::now();
                    while !stop.load(Ordering::SeqCst) {
                        std::thread::sleep(POLL);
                        if beat.elapsed() >= Duration::from_secs(1) {
                            beat = Instant::now();
                            // Workers give up only after `stall_timeout`: a failed write is
                            // retried a second later.
                            if let Err(e) = progress::put_trainer_heartbeat(&store) {
                                tracing::warn!("writing the trainer's heartbeat: {e}");
                            }
                        }
                    }
                })?
        };
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The rollouts the trainer reads from the store: groups arrive on `groups` like the pool's.
pub(crate) struct StoreInbox {
    /// Accepted groups, oldest objects first.
    pub groups: flume::Receiver<Group>,
    /// The workers' counters, summed (for the metrics lines).
    pub counters: Arc<PoolCounters>,
    store: Store,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
    thread: Option<JoinHandle<Result<RolloutReader>>>,
}

impl StoreInbox {
    /// Starts reading the rollout objects `feedback`'s ledger has not settled, checking each
    /// against `check` and the newest version `feedback` published, and, when `feedback` keeps
    /// the weights for it, verifying each against the run's `rules`.
    pub(crate) fn start(
        store: &Store,
        check: RolloutCheck,
        feedback: &StoreFeedback,
        capacity: usize,
        rules: RunRules,
    ) -> Result<Self> {
        let verification = match &feedback.policies {
            Some((policies, _)) => Some(Verification::new(
                store.clone(),
                sketch_seed(store)?,
                policies.clone(),
                rules,
            )),
            None => None,
        };
        let (tx, rx) = flume::bounded(capacity);
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(PoolCounters::default());
        let ledger = feedback.ledger.clone();
        let settled: Vec<String> = lock(&ledger).not_to_list().collect();
        let mut inbox = Inbox {
            reader: RolloutReader::after(store.clone(), settled),
            store: store.clone(),
            check,
            verification,
            progress: feedback.progress.clone(),
            newest: feedback.newest.clone(),
            tx,
            stop: stop.clone(),
            counters: counters.clone(),
            ledger: ledger.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("grail-inbox".into())
            .spawn(move || {
                inbox.run()?;
                Ok(inbox.reader)
            })?;
        Ok(Self {
            groups: rx,
            counters,
            store: store.clone(),
            stop,
            ledger,
            thread: Some(thread),
        })
    }

    /// Samples in refused objects so far, by worker and reason (over every attempt).
    pub(crate) fn refused_by(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        lock(&self.ledger).refused_by.clone()
    }

    /// The cursor a checkpoint saves once the trainer has settled `settled` groups of this
    /// attempt.
    pub(crate) fn cursor(&self, settled: usize) -> RolloutCursor {
        lock(&self.ledger).cursor(settled)
    }

    /// Marks the run finished, stops reading, waits (up to [`FINISH_WAIT`]) for running workers'
    /// final counts and returns the transport's side of the accounting: what the workers
    /// generated, sent, failed and did not send, and what was left in the channel or the store
    /// or refused, over every attempt of the run (the workers' counters are the run's). The
    /// trainer's own counts are added by the caller. Also returns the cursor after the last of
    /// `settled` groups of this attempt.
    pub(crate) fn finish(mut self, settled: usize) -> Result<(Accounting, RolloutCursor)> {
        self.stop.store(true, Ordering::SeqCst);
        self.store.put(layout::FINISHED, b"finished\n".to_vec())?;
        let reader = self
            .thread
            .take()
            .expect("joined once")
            .join()
            .map_err(|_| anyhow::anyhow!("the rollout inbox thread panicked"))??;
        let cursor = self.cursor(settled);
        let mut seen = lock(&self.ledger);
        let in_channel: u64 = self.groups.drain().map(|g| g.samples.len() as u64).sum();
        let workers = wait_for_workers(&self.store)?;
        // Objects written before the workers saw FINISHED and not read: left in the store.
        let mut left_in_store = 0;
        for key in reader.unread()? {
            let Some(bytes) = self.store.get(&key)? else {
                continue;
            };
            if let Ok(batch) = decode(bytes) {
                let n = batch
                    .groups
                    .iter()
                    .map(|g| g.samples.len() as u64)
                    .sum::<u64>();
                let folder = layout::rollout_worker(&key).unwrap_or_default();
                *seen.decoded.entry(folder.to_string()).or_default() += n;
                left_in_store += n;
            }
        }
        let mut acc = Accounting {
            left_in_channel: (in_channel + seen.held + left_in_store) as usize,
            rejected: seen.refused_samples as usize,
            ..Accounting::default()
        };
        // Every worker with counters or objects: one killed before its first counters still
        // sent what its objects hold.
        let mut workers: std::collections::BTreeMap<String, WorkerCounters> =
            workers.into_iter().collect();
        for id in seen.decoded.keys() {
            workers.entry(id.clone()).or_default();
        }
        for (id, c) in workers {
            let decoded = seen.decoded.get(&id).copied().unwrap_or(0);
            // A worker killed between writing an object and its counters: the object counts.
            let sent = c.sent.max(decoded);
            let generated = c.generated.max(sent + c.failed);
            let unsent = generated - sent - c.failed;
            acc.generated += generated as usize;
            acc.sent += sent as usize;
            acc.failed += c.failed as usize;
            acc.unsent_at_shutdown += unsent as usize;
            // Samples the worker wrote that no decodable object holds (torn or corrupt objects).
            acc.rejected += (sent - decoded) as usize;
            if !c.finished {
                tracing::warn!(
                    worker = %id,
                    unsent,
                    "worker did not report its end (killed, or still busy): its last counts are used"
                );
            }
        }
        if seen.faults > 0 {
            tracing::warn!(
                objects = seen.faults,
                "rollout objects were refused (each logged with its key)"
            );
        }
        Ok((acc, cursor))
    }
}

/// Every worker's counters once none is running (each has reported its end, or gone silent), or
/// after [`FINISH_WAIT`].
fn wait_for_workers(store: &Store) -> Result<Vec<(String, WorkerCounters)>> {
    let start = Instant::now();
    loop {
        let workers = progress::get_workers(store)?;
        let now = progress::now_ms();
        if workers.iter().all(|(_, c)| !c.running(now)) || start.elapsed() > FINISH_WAIT {
            return Ok(workers);
        }
        std::thread::sleep(POLL);
    }
}

/// The inbox thread's state.
struct Inbox {
    reader: RolloutReader,
    store: Store,
    check: RolloutCheck,
    verification: Option<Verification>,
    progress: Arc<Mutex<TrainerProgress>>,
    newest: Arc<AtomicU64>,
    tx: flume::Sender<Group>,
    stop: Arc<AtomicBool>,
    counters: Arc<PoolCounters>,
    ledger: Arc<Mutex<Ledger>>,
}

impl Inbox {
    fn run(&mut self) -> Result<()> {
        // The object in progress at a resume comes first: its remaining groups are the next
        // ones the checkpoint's cursor expects.
        let in_progress = lock(&self.ledger).in_progress();
        if let Some(key) = in_progress {
            let batch = match self.store.get(&key)? {
                Some(bytes) => decode(bytes),
                None => Err("the object is gone".to_string()),
            };
            self.take(key, batch);
        }
        let mut last_counters = Instant::now() - Duration::from_secs(60);
        while !self.stop.load(Ordering::SeqCst) {
            if last_counters.elapsed() > Duration::from_secs(1) {
                // Only the metrics lines read these: a failed read waits for the next one.
                if let Err(e) = self.sum_counters() {
                    tracing::warn!("reading the workers' counters: {e}");
                }
                last_counters = Instant::now();
            }
            let arrivals = self.reader.poll(4)?;
            if arrivals.is_empty() {
                std::thread::sleep(POLL);
            }
            for arrival in arrivals {
                self.take(arrival.key, arrival.batch);
            }
        }
        Ok(())
    }

    /// Checks the object at `key` and hands its groups to the trainer (after those settled
    /// before a resume), or records why it is refused.
    fn take(&mut self, key: String, batch: Result<RolloutBatch, String>) {
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(why) => {
                tracing::warn!(key = %key, "rollout object refused: {why}");
                lock(&self.ledger).undecodable(key);
                return;
            }
        };
        let samples = batch
            .groups
            .iter()
            .map(|g| g.samples.len() as u64)
            .sum::<u64>();
        let newest = self.newest.load(Ordering::SeqCst);
        // The folder is the worker's identity (what the store lets it write); the id inside
        // the object is only its claim.
        let folder = layout::rollout_worker(&key).unwrap_or_default().to_string();
        let mut checked = if folder == batch.worker_id {
            let schema = self.check.check(&batch, newest);
            schema.map_err(|message| Refusal::new("schema", message))
        } else {
            Err(Refusal::new(
                "identity",
                format!("the object claims worker `{}`", batch.worker_id),
            ))
        };
        if let (Ok(()), Some(v)) = (&checked, &mut self.verification) {
            checked = v.check(&mut batch);
        }
        let skipped = lock(&self.ledger).skip(&key).min(batch.groups.len());
        if let Err(why) = checked {
            tracing::warn!(
                key = %self.store.location(&key),
                "rollout object refused ({}): {}",
                why.reason,
                why.message
            );
            // Groups settled before a resume (the object was in progress) are counted as
            // consumed already: only the rest are refused.
            let rest = &batch.groups[skipped..];
            let refused = rest.iter().map(|g| g.samples.len() as u64).sum();
            let mut ledger = lock(&self.ledger);
            ledger.refused(key, folder, why.reason, rest.len(), samples, refused);
            drop(ledger);
            if let Err(e) = put_progress(&self.store, &self.progress, &self.ledger, |_| {}) {
                // The next version or consumed count publishes it again.
                tracing::warn!("publishing the refused groups: {e}");
            }
            return;
        }
        let groups: Vec<Group> = batch.groups.drain(skipped..).collect();
        lock(&self.ledger).handed(key, batch.worker_id, groups.len(), skipped, samples);
        self.hand_over(groups);
    }

    /// Sends `groups` to the trainer, waiting while its channel is full; what is left when the
    /// trainer stops is counted as held.
    fn hand_over(&mut self, groups: Vec<Group>) {
        let mut groups = groups.into_iter();
        while let Some(mut group) = groups.next() {
            loop {
                if self.stop.load(Ordering::SeqCst) {
                    let rest: u64 = groups.map(|g| g.samples.len() as u64).sum();
                    lock(&self.ledger).held += group.samples.len() as u64 + rest;
                    return;
                }
                match self.tx.send_timeout(group, POLL) {
                    Ok(()) => break,
                    Err(flume::SendTimeoutError::Timeout(g)) => group = g,
                    Err(flume::SendTimeoutError::Disconnected(g)) => {
                        let rest: u64 = groups.map(|g| g.samples.len() as u64).sum();
                        lock(&self.ledger).held += g.samples.len() as u64 + rest;
                        return;
                    }
                }
            }
        }
    }

    /// The workers' counters, summed into the live counters the step log reads.
    fn sum_counters(&self) -> Result<()> {
        let workers = progress::get_workers(&self.store)?;
        let sum = |f: fn(&WorkerCounters) -> u64| -> usize {
            workers.iter().map(|(_, c)| f(c)).sum::<u64>() as usize
        };
        let c = &self.counters;
        let set = |a: &AtomicUsize, v: usize| a.store(v, Ordering::SeqCst);
        set(&c.generated, sum(|c| c.generated));
        set(&c.sent, sum(|c| c.sent));
        set(&c.failed, sum(|c| c.failed));
        set(&c.failed_groups, sum(|c| c.failed_groups));
        set(&c.tokens, sum(|c| c.tokens));
        Ok(())
    }
}

/// The ledger, whatever a panicking holder left in it (its counts stay usable).
fn lock(ledger: &Mutex<Ledger>) -> MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(|p| p.into_inner())
}
