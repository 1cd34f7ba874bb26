//! The trainer's side of a run spread over processes (`role = "trainer"`): it publishes the run
//! (manifest, then weights) to the store, an inbox thread turns the rollout objects workers write
//! into groups on the channel the trainer reads, and at the end it marks the run finished and
//! accounts for every sample the workers report.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use grail_core::model::{CausalLm, named_tensors};
use grail_core::tokenizer::Tokenizer;
use grail_protocol::{Group, PolicyVersion, WireDtype};
use grail_rollout::pool::PoolCounters;
use grail_store::progress::{self, TrainerProgress, WorkerCounters};
use grail_store::{RolloutCheck, RolloutReader, Store, WeightWriter, WeightWriterConfig, layout};
use grail_trainer::{Feedback, TrainerError};

use crate::checkpoint::Accounting;
use crate::config::GrpoConfig;

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
    progress: TrainerProgress,
    newest: Arc<AtomicU64>,
    refused_groups: Arc<AtomicU64>,
}

impl StoreFeedback {
    /// Publishes `model` as `version` (the run's first weights) and returns the feedback.
    pub(crate) fn start(
        store: &Store,
        cfg: &GrpoConfig,
        model: &CausalLm,
        version: PolicyVersion,
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
            progress: TrainerProgress::default(),
            newest: Arc::new(AtomicU64::new(version)),
            refused_groups: Arc::new(AtomicU64::new(0)),
        };
        feedback.publish(version, model)?;
        Ok(feedback)
    }
}

impl StoreFeedback {
    fn put_progress(&mut self) -> grail_trainer::Result<()> {
        self.progress.refused_groups = self.refused_groups.load(Ordering::SeqCst);
        progress::put_trainer(&self.store, &self.progress).map_err(store_error)
    }
}

fn store_error(e: grail_store::StoreError) -> TrainerError {
    TrainerError::Feedback(e.to_string())
}

impl Feedback for StoreFeedback {
    fn publish(&mut self, version: PolicyVersion, model: &CausalLm) -> grail_trainer::Result<()> {
        let tensors = named_tensors(model, WIRE);
        // Known before its READY marker can be seen, so no group sampled from it is refused.
        self.newest.store(version, Ordering::SeqCst);
        self.writer
            .publish(version, &tensors)
            .map_err(store_error)?;
        self.progress.version = version;
        self.put_progress()
    }

    fn consumed(&mut self, groups: usize) -> grail_trainer::Result<()> {
        self.progress.consumed_groups += groups as u64;
        self.put_progress()
    }
}

/// What the inbox has seen, by worker.
#[derive(Debug, Default)]
struct Seen {
    /// Samples in each worker's objects that could be decoded.
    decoded: HashMap<String, u64>,
    /// Samples in objects refused by the check.
    refused: u64,
    /// Objects refused (unreadable or failing the check).
    faults: u64,
    /// Samples decoded and accepted but not handed to the trainer when it stopped.
    held: u64,
}

/// The rollouts the trainer reads from the store: groups arrive on `groups` like the pool's.
pub(crate) struct StoreInbox {
    /// Accepted groups, oldest objects first.
    pub groups: flume::Receiver<Group>,
    /// The workers' counters, summed (for the metrics lines).
    pub counters: Arc<PoolCounters>,
    store: Store,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(RolloutReader, Seen)>>>,
}

impl StoreInbox {
    /// Starts reading rollout objects, checking each against `check` and the newest version
    /// `feedback` published.
    pub(crate) fn start(
        store: &Store,
        check: RolloutCheck,
        feedback: &StoreFeedback,
        capacity: usize,
    ) -> Result<Self> {
        let (tx, rx) = flume::bounded(capacity);
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(PoolCounters::default());
        let mut inbox = Inbox {
            reader: RolloutReader::new(store.clone()),
            store: store.clone(),
            check,
            newest: feedback.newest.clone(),
            refused_groups: feedback.refused_groups.clone(),
            tx,
            stop: stop.clone(),
            counters: counters.clone(),
            seen: Seen::default(),
        };
        let thread = std::thread::Builder::new()
            .name("grail-inbox".into())
            .spawn(move || {
                inbox.run()?;
                Ok((inbox.reader, inbox.seen))
            })?;
        Ok(Self {
            groups: rx,
            counters,
            store: store.clone(),
            stop,
            thread: Some(thread),
        })
    }

    /// Marks the run finished, stops reading, waits (up to [`FINISH_WAIT`]) for running workers'
    /// final counts and returns the transport's side of the accounting: what the workers
    /// generated, sent, failed and did not send, and what was left in the channel or the store
    /// or refused. The trainer's own counts are added by the caller.
    pub(crate) fn finish(mut self) -> Result<Accounting> {
        self.stop.store(true, Ordering::SeqCst);
        self.store.put(layout::FINISHED, b"finished\n".to_vec())?;
        let (reader, mut seen) = self
            .thread
            .take()
            .expect("joined once")
            .join()
            .map_err(|_| anyhow::anyhow!("the rollout inbox thread panicked"))??;
        let in_channel: u64 = self.groups.drain().map(|g| g.samples.len() as u64).sum();
        let workers = wait_for_workers(&self.store)?;
        // Objects written before the workers saw FINISHED and not read: left in the store.
        let mut left_in_store = 0;
        for key in reader.unread()? {
            let Some(bytes) = self.store.get(&key)? else {
                continue;
            };
            if let Ok(batch) = grail_store::rollout_batch::decode(bytes) {
                let n = batch
                    .groups
                    .iter()
                    .map(|g| g.samples.len() as u64)
                    .sum::<u64>();
                *seen.decoded.entry(batch.worker_id).or_default() += n;
                left_in_store += n;
            }
        }
        let mut acc = Accounting {
            left_in_channel: (in_channel + seen.held + left_in_store) as usize,
            rejected: seen.refused as usize,
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
        Ok(acc)
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
    newest: Arc<AtomicU64>,
    tx: flume::Sender<Group>,
    stop: Arc<AtomicBool>,
    counters: Arc<PoolCounters>,
    /// Groups in objects refused by the check (shared with the feedback, which publishes them).
    refused_groups: Arc<AtomicU64>,
    seen: Seen,
}

impl Inbox {
    fn run(&mut self) -> Result<()> {
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
                let batch = match arrival.batch {
                    Ok(batch) => batch,
                    Err(why) => {
                        self.seen.faults += 1;
                        tracing::warn!(key = %arrival.key, "rollout object refused: {why}");
                        continue;
                    }
                };
                let samples = batch
                    .groups
                    .iter()
                    .map(|g| g.samples.len() as u64)
                    .sum::<u64>();
                *self
                    .seen
                    .decoded
                    .entry(batch.worker_id.clone())
                    .or_default() += samples;
                let newest = self.newest.load(Ordering::SeqCst);
                if let Err(why) = self.check.check(&batch, newest) {
                    self.seen.faults += 1;
                    self.seen.refused += samples;
                    self.refused_groups
                        .fetch_add(batch.groups.len() as u64, Ordering::SeqCst);
                    tracing::warn!(
                        key = %self.store.location(&arrival.key),
                        "rollout object refused: {why}"
                    );
                    continue;
                }
                self.hand_over(batch.groups);
            }
        }
        Ok(())
    }

    /// Sends `groups` to the trainer, waiting while its channel is full; what is left when the
    /// trainer stops is counted as held.
    fn hand_over(&mut self, groups: Vec<Group>) {
        let mut groups = groups.into_iter();
        while let Some(mut group) = groups.next() {
            loop {
                if self.stop.load(Ordering::SeqCst) {
                    let rest: u64 = groups.map(|g| g.samples.len() as u64).sum();
                    self.seen.held += group.samples.len() as u64 + rest;
                    return;
                }
                match self.tx.send_timeout(group, POLL) {
                    Ok(()) => break,
                    Err(flume::SendTimeoutError::Timeout(g)) => group = g,
                    Err(flume::SendTimeoutError::Disconnected(g)) => {
                        let rest: u64 = groups.map(|g| g.samples.len() as u64).sum();
                        self.seen.held += g.samples.len() as u64 + rest;
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
