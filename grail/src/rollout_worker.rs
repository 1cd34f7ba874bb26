//! A rollout worker process (`role = "rollout"`): given only the store URL and the run id, it
//! takes the job config, tokenizer, model config and newest weights from the store, generates
//! and scores groups from the prompt blocks it claims, writes them as rollout objects, follows
//! the trainer's weight versions, and exits by itself once the trainer has marked the run
//! finished. Workers can join and leave at any time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use grail_core::device::parse_device;
use grail_core::model::{CausalLm, ModelConfig, NamedTensorSource};
use grail_core::tokenizer::Tokenizer;
use grail_protocol::{Group, PoolMessage, WeightPayload, WeightUpdate, WireDtype};
use grail_rollout::pool::PoolCounters;
use grail_rollout::{PromptCursor, RolloutPool, spawn_pool_with};
use grail_store::progress::{self, WorkerCounters};
use grail_store::{RolloutWriter, Store, WeightReader, layout};
use serde::Serialize;

use crate::async_grpo::pool_config;
use crate::claimed_prompts::ClaimedPrompts;
use crate::config::{GrpoConfig, Role};
use crate::evaluate::{generation_config, prompt_limits};
use crate::progress::Progress;
use crate::rollout_verification::read_sketch_seed;
use crate::setup::{Source, environments};

/// How often the worker looks for new weights and the end of the run.
const POLL: Duration = Duration::from_millis(50);
/// The longest a running worker leaves its counters unwritten (see `WorkerCounters::running`).
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Longest wait before the groups finished so far are written as one object.
const FLUSH_AFTER: Duration = Duration::from_secs(1);

/// What a rollout worker did (its last stdout line, as JSON).
#[derive(Debug, Clone, Serialize)]
pub struct WorkerSummary {
    /// The worker's id in the store.
    pub worker_id: String,
    /// The store and run it worked for.
    pub store: String,
    /// Its counters: `generated = sent + failed + unsent_at_shutdown`.
    pub counters: WorkerCounters,
    /// The newest weights version it generated with.
    pub version: u64,
    /// How long the versions published while it worked took to reach it (from the trainer's
    /// READY marker to the pool's update; clocks of different machines add their offset).
    pub version_lag: VersionLag,
    /// Wall time.
    pub seconds: f64,
}

/// The time from a version's publication to its arrival at the worker, over the versions it
/// followed.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct VersionLag {
    /// Versions received after the first.
    pub versions: u64,
    /// Mean seconds from publication to arrival.
    pub mean_s: f64,
    /// The longest.
    pub max_s: f64,
}

impl VersionLag {
    fn add(&mut self, seconds: f64) {
        self.versions += 1;
        self.mean_s += (seconds - self.mean_s) / self.versions as f64;
        self.max_s = self.max_s.max(seconds);
    }
}

/// Runs a rollout worker for the run in `local.store` until the trainer finishes it or `stop`
/// is set. `source` supplies the task when it is not the config's `[env]`.
pub(crate) fn run_worker(
    local: &GrpoConfig,
    source: &Source,
    stop: Arc<AtomicBool>,
) -> Result<WorkerSummary> {
    let start = Instant::now();
    let (store, worker) = join(local)?;
    let mut summary = WorkerSummary {
        worker_id: worker.clone(),
        store: store.location(""),
        counters: WorkerCounters {
            finished: true,
            ..WorkerCounters::default()
        },
        version: 0,
        version_lag: VersionLag::default(),
        seconds: 0.0,
    };
    let progress = Progress::new(0, "rollout");
    progress.update(format!("waiting for the trainer of {}", store.location("")));
    if let Some(run) = Run::wait(&store, local, &stop)? {
        let (counters, version, lag) = run.work(source, &worker, &stop, progress)?;
        summary.counters = counters;
        summary.version = version;
        summary.version_lag = lag;
    }
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// Opens the store and takes the worker's id (one no earlier worker of the run has used).
fn join(local: &GrpoConfig) -> Result<(Store, String)> {
    let url = local
        .store
        .as_deref()
        .context("a rollout worker needs `store`")?;
    let store = Store::open(url, &local.run_id)?;
    let worker = local.worker_id.clone().unwrap_or_else(default_worker_id);
    // A worker's counters are its own: a second process under the same id would overwrite them.
    if store.get(&layout::worker_key(&worker))?.is_some() {
        bail!(
            "worker id `{worker}` has already worked for {} (its counters are in the store): \
             choose another id, or leave `worker_id` unset for a fresh one",
            store.location("")
        );
    }
    Ok((store, worker))
}

/// What a worker takes from the store before it can generate: the run's manifest and its
/// newest weights.
struct Run {
    store: Store,
    cfg: GrpoConfig,
    tokenizer: Arc<Tokenizer>,
    model_config: ModelConfig,
    reader: WeightReader,
}

impl Run {
    /// The run, once the trainer has published its manifest and first weights (`None` when
    /// stopped or the run finished first).
    fn wait(store: &Store, local: &GrpoConfig, stop: &AtomicBool) -> Result<Option<Self>> {
        let Some(cfg_text) = wait_for(store, &format!("{}config.toml", layout::RUN), stop)? else {
            return Ok(None);
        };
        let cfg = run_config(local, &cfg_text)?;
        let tokenizer = Arc::new(download_tokenizer(store)?);
        let model_config = store
            .get(&format!("{}config.json", layout::RUN))?
            .context("the run manifest has no config.json")?;
        let model_config = ModelConfig::from_hf_json(serde_json::from_slice(&model_config)?)?;
        let mut reader = WeightReader::new(store.clone(), WireDtype::Bf16);
        while reader.version().is_none() {
            if stop.load(Ordering::SeqCst) || finished(store)? {
                return Ok(None);
            }
            report_faults(reader.catch_up()?.faults);
            std::thread::sleep(POLL);
        }
        Ok(Some(Self {
            store: store.clone(),
            cfg,
            tokenizer,
            model_config,
            reader,
        }))
    }

    /// Generates for the run until it finishes (or `stop`): the pool over the worker's claimed
    /// prompt blocks, an outbox writing its groups, a follower bringing new weights. Returns the
    /// worker's final counters (also written to the store), the newest version it had and how
    /// long versions took to reach it.
    fn work(
        self,
        source: &Source,
        worker: &str,
        stop: &Arc<AtomicBool>,
        progress: Progress,
    ) -> Result<(WorkerCounters, u64, VersionLag)> {
        let Run {
            store,
            cfg,
            tokenizer,
            model_config,
            reader,
        } = self;
        let device = parse_device(&cfg.device)?;
        let version = reader.version().expect("waited for");
        let model = CausalLm::build(
            &model_config,
            &mut NamedTensorSource::new(reader.tensors().expect("waited for"), &device),
        )?;
        let (train_env, _) = environments(&cfg, source, &tokenizer)?;
        let mut generation = generation_config(&cfg, &tokenizer.eos_token_ids);
        if cfg.grpo.verify_rollouts {
            generation.sketch_seed = Some(read_sketch_seed(&store)?);
        }
        let limits = prompt_limits(&cfg, &model);
        let mut pool_cfg = pool_config(&cfg, &generation, &limits);
        // The bound across processes is the cursor's (see `claimed_prompts`), not the pool's.
        pool_cfg.max_ahead = None;
        pool_cfg.start_version = version;
        let block = pool_cfg.prompts_per_batch as u64;
        let end = Arc::new(AtomicBool::new(false));
        let room = cfg
            .grpo
            .max_ahead
            .map(|a| (a + 1) * cfg.grpo.prompts_per_step as u64);
        let cursor = Arc::new(ClaimedPrompts::new(
            store.clone(),
            worker,
            block,
            room,
            end.clone(),
        )?);
        let reward_names = train_env.rewards().iter().map(|r| r.name.clone()).collect();
        let writer = RolloutWriter::new(store.clone(), worker, reward_names)?;
        let pool = spawn_pool_with(&model, train_env.clone(), pool_cfg, cursor.clone())?;
        drop(model);
        tracing::info!(worker = %worker, version, store = %store.location(""), "rollout worker started");
        let mut outbox = Outbox {
            writer,
            store: store.clone(),
            worker: worker.to_string(),
            cursor,
            counters: WorkerCounters::default(),
            batch_groups: block as usize,
            written_at: Instant::now(),
        };
        let newest = Arc::new(AtomicU64::new(version));
        let follower = {
            let follower = Follower {
                reader,
                store: store.clone(),
                feedback: pool.feedback.clone(),
                end: end.clone(),
                stop: stop.clone(),
                newest: newest.clone(),
                trainer_timeout: (cfg.grpo.stall_timeout > 0)
                    .then(|| Duration::from_secs(cfg.grpo.stall_timeout)),
            };
            std::thread::Builder::new()
                .name("grail-follow".into())
                .spawn(move || {
                    let end = follower.end.clone();
                    let followed = follower.run();
                    // However it ends (a store error included), the outbox must stop too.
                    end.store(true, Ordering::SeqCst);
                    followed
                })?
        };
        let written = outbox.run(&pool, &end, stop, &progress);
        progress.finish();
        end.store(true, Ordering::SeqCst);
        let live = Live::of(pool.counters());
        let report = pool.shutdown();
        let followed = follower
            .join()
            .map_err(|_| anyhow::anyhow!("the weight follower thread panicked"));
        // The final counters are written whatever went wrong, so the trainer need not wait for
        // them.
        let live = match &report {
            Ok(r) => Live {
                generated: r.generated as u64,
                failed: r.failed as u64,
                failed_groups: r.failed_groups as u64,
                tokens: r.tokens as u64,
            },
            Err(_) => live,
        };
        let mut c = outbox.counters;
        live.fill(&mut c);
        c.taken = outbox.cursor.taken();
        c.heartbeat_ms = progress::now_ms();
        // Groups generated and not written (in the channel, or cut off by the end) are unsent.
        c.unsent_at_shutdown = c.generated.saturating_sub(c.sent + c.failed);
        c.finished = true;
        progress::put_worker(&store, worker, &c)?;
        report?;
        written?;
        let lag = followed??;
        Ok((c, newest.load(Ordering::SeqCst), lag))
    }
}

/// The job config from the manifest, with this process's own `device`, `output_dir` and store
/// settings (the trainer's model and tokenizer paths mean nothing here: they come from the store).
fn run_config(local: &GrpoConfig, manifest: &str) -> Result<GrpoConfig> {
    let mut cfg: GrpoConfig = toml::from_str(manifest)
        .map_err(|e| anyhow::anyhow!("the run manifest's config.toml: {e}"))?;
    cfg.role = Role::Rollout;
    cfg.store = local.store.clone();
    cfg.run_id = local.run_id.clone();
    cfg.worker_id = local.worker_id.clone();
    cfg.device = local.device.clone();
    cfg.output_dir = local.output_dir.clone();
    cfg.model.path = None;
    cfg.tokenizer.path = None;
    cfg.validate().context("the run manifest's config.toml")?;
    Ok(cfg)
}

/// The run's tokenizer, copied from `run/tokenizer/` into a temporary folder and loaded.
fn download_tokenizer(store: &Store) -> Result<Tokenizer> {
    let dir = tempfile::tempdir()?;
    let prefix = format!("{}tokenizer/", layout::RUN);
    for key in store.list(&prefix)? {
        let bytes = store.get(&key)?.context("a tokenizer file vanished")?;
        std::fs::write(dir.path().join(&key[prefix.len()..]), bytes)?;
    }
    Ok(Tokenizer::from_dir(dir.path())?)
}

/// The object at `key` once it exists (`None` when stopped or the run finished first).
fn wait_for(store: &Store, key: &str, stop: &AtomicBool) -> Result<Option<String>> {
    loop {
        if let Some(bytes) = store.get(key)? {
            return Ok(Some(
                String::from_utf8(bytes.to_vec()).context(key.to_string())?,
            ));
        }
        if stop.load(Ordering::SeqCst) || finished(store)? {
            return Ok(None);
        }
        std::thread::sleep(POLL);
    }
}

fn finished(store: &Store) -> Result<bool> {
    Ok(store.get(layout::FINISHED)?.is_some())
}

fn report_faults(faults: Vec<grail_store::WeightFault>) {
    for f in faults {
        tracing::warn!("weights refused: {f}");
    }
}

/// `<host>-<pid>-<start time>`, in the characters a worker id allows.
fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "worker".into());
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{host}-{}-{time:x}", std::process::id())
}

/// Follows the trainer: new weight versions go to the pool as full updates; `end` is set once
/// the run is finished (or `stop` is), and the worker gives up with an error when the trainer
/// has been silent (no heartbeat) for `trainer_timeout`.
struct Follower {
    reader: WeightReader,
    store: Store,
    feedback: flume::Sender<PoolMessage>,
    end: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    newest: Arc<AtomicU64>,
    trainer_timeout: Option<Duration>,
}

impl Follower {
    fn run(mut self) -> Result<VersionLag> {
        let mut checked = Instant::now();
        let mut trainer = TrainerWatch {
            beat: None,
            heard: Instant::now(),
            warned: false,
        };
        let mut lag = VersionLag::default();
        while !self.end.load(Ordering::SeqCst) {
            if self.stop.load(Ordering::SeqCst) {
                self.end.store(true, Ordering::SeqCst);
                break;
            }
            let caught = self.reader.catch_up()?;
            report_faults(caught.faults);
            if caught.changed {
                let version = self.reader.version().expect("changed");
                let tensors = self.reader.tensors().expect("changed").to_vec();
                if let Some(published) = self.reader.marker().and_then(|m| m.published_ms) {
                    lag.add(progress::now_ms().saturating_sub(published) as f64 / 1e3);
                }
                self.newest.store(version, Ordering::SeqCst);
                let update = WeightUpdate {
                    version,
                    payload: WeightPayload::Full(Arc::new(tensors)),
                };
                let _ = self.feedback.send(PoolMessage::Weights(update));
            }
            if checked.elapsed() > Duration::from_secs(1) {
                checked = Instant::now();
                if finished(&self.store)? {
                    tracing::info!("the trainer finished the run");
                    self.end.store(true, Ordering::SeqCst);
                } else {
                    self.check_trainer(&mut trainer)?;
                }
            }
            std::thread::sleep(POLL);
        }
        Ok(lag)
    }

    /// Warns once the trainer has not been heard from (its heartbeat unchanged, missing or
    /// unreadable) for [`progress::GONE_AFTER_MS`], and fails once that lasts `trainer_timeout`:
    /// a trainer killed for good must not keep its workers forever, while one restarted with
    /// `--resume` within the timeout finds them still there. Silence is measured on this
    /// worker's clock from the last change it saw (or its own start), so neither the clocks of
    /// two machines nor a beat left by an earlier attempt decide it.
    fn check_trainer(&self, watch: &mut TrainerWatch) -> Result<()> {
        let beat = progress::trainer_heartbeat(&self.store)?;
        if beat.is_some() && beat != watch.beat {
            watch.beat = beat;
            watch.heard = Instant::now();
            watch.warned = false;
            return Ok(());
        }
        let silent = watch.heard.elapsed();
        if silent < Duration::from_millis(progress::GONE_AFTER_MS) {
            return Ok(());
        }
        if !watch.warned {
            watch.warned = true;
            tracing::warn!(
                silent_s = silent.as_secs(),
                "the trainer has gone silent (killed, or its machine is down?); waiting for it to \
                 be restarted with --resume"
            );
        }
        if let Some(timeout) = self.trainer_timeout
            && silent > timeout
        {
            bail!(
                "the trainer of {} has been silent for {} s (stall_timeout = {} s): giving up. \
                 Restart the trainer with --resume, then start workers again",
                self.store.location(""),
                silent.as_secs(),
                timeout.as_secs()
            );
        }
        Ok(())
    }
}

/// What a worker last heard from the trainer.
struct TrainerWatch {
    /// The last heartbeat read.
    beat: Option<u64>,
    /// When it changed (or the watch began).
    heard: Instant,
    /// Whether the silence has been reported.
    warned: bool,
}

/// A snapshot of a pool's counters.
struct Live {
    generated: u64,
    failed: u64,
    failed_groups: u64,
    tokens: u64,
}

impl Live {
    /// Reads failures before generations: a sample is counted generated before it can fail, so
    /// the snapshot never shows more failed than generated.
    fn of(c: &PoolCounters) -> Self {
        let failed = c.failed.load(Ordering::SeqCst) as u64;
        let failed_groups = c.failed_groups.load(Ordering::SeqCst) as u64;
        Self {
            failed,
            failed_groups,
            generated: c.generated.load(Ordering::SeqCst) as u64,
            tokens: c.tokens.load(Ordering::SeqCst) as u64,
        }
    }

    fn fill(&self, c: &mut WorkerCounters) {
        c.generated = self.generated;
        c.failed = self.failed;
        c.failed_groups = self.failed_groups;
        c.tokens = self.tokens;
    }
}

/// Writes the pool's groups to the store, a batch per object, and the worker's counters.
struct Outbox {
    writer: RolloutWriter,
    store: Store,
    worker: String,
    cursor: Arc<ClaimedPrompts>,
    counters: WorkerCounters,
    batch_groups: usize,
    /// When the counters were last written (they are rewritten at least every second).
    written_at: Instant,
}

impl Outbox {
    fn run(
        &mut self,
        pool: &RolloutPool,
        end: &AtomicBool,
        stop: &AtomicBool,
        progress: &Progress,
    ) -> Result<()> {
        let mut batch: Vec<Group> = Vec::new();
        let mut since = Instant::now();
        while !end.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
            match pool.groups.recv_timeout(POLL) {
                Ok(group) => {
                    if batch.is_empty() {
                        since = Instant::now();
                    }
                    batch.push(group);
                }
                Err(flume::RecvTimeoutError::Timeout) => {}
                Err(flume::RecvTimeoutError::Disconnected) => break,
            }
            let due = batch.len() >= self.batch_groups
                || (!batch.is_empty() && since.elapsed() > FLUSH_AFTER);
            if due {
                self.write(std::mem::take(&mut batch), pool.counters())?;
                let c = &self.counters;
                progress.update(format!(
                    "{} samples written, {} generated, {} failed",
                    c.sent, c.generated, c.failed
                ));
            } else if self.written_at.elapsed() > HEARTBEAT {
                self.put_counters(pool.counters())?;
            }
        }
        // Groups not written: counted as unsent by the caller (generated − sent − failed).
        Ok(())
    }

    /// The worker's counters, with the pool's `live` ones and the time, to the store.
    fn put_counters(&mut self, live: &PoolCounters) -> Result<()> {
        Live::of(live).fill(&mut self.counters);
        self.counters.taken = self.cursor.taken();
        self.counters.heartbeat_ms = progress::now_ms();
        progress::put_worker(&self.store, &self.worker, &self.counters)?;
        self.written_at = Instant::now();
        Ok(())
    }

    /// Writes `groups` as one object, then the counters (with the pool's `live` ones).
    fn write(&mut self, groups: Vec<Group>, live: &PoolCounters) -> Result<()> {
        let samples: u64 = groups.iter().map(|g| g.samples.len() as u64).sum();
        let n = groups.len() as u64;
        let key = self.writer.write(groups)?;
        self.counters.sent += samples;
        self.counters.sent_groups += n;
        self.put_counters(live)?;
        tracing::debug!(key, samples, "rollouts written");
        Ok(())
    }
}
