//! The rollout pool: N worker threads turn prompts into scored [`Group`]s on a bounded channel,
//! and pick up new weights between generation batches.
//!
//! Each worker owns a copy of the model. A batch is `prompts_per_batch` prompts × `num_generations`
//! samples, generated with continuous batching; as soon as all samples of a prompt are done, their
//! rewards run on rayon and the group is sent. Sending blocks when the trainer is behind
//! (backpressure). By default a worker checks for newer weights only between batches, so no
//! completion mixes two policy versions; with `in_flight_weight_updates` it also checks between
//! decode steps, re-prefills its KV caches with the new weights, and each token records the version
//! that sampled it (PipelineRL / AReaL in-flight updates).
//!
//! Nothing is lost silently: every generated sample ends up `sent`, `failed` (a reward panicked or
//! returned NaN/∞; the group is dropped and the reason logged) or `unsent_at_shutdown`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::RolloutError;
use grail_core::model::CausalLm;
use grail_protocol::{Group, PolicyVersion, PoolMessage, Sample, WireDtype};
use rayon::prelude::*;

use crate::environment::{Completion, Environment, Prompt, score};
use crate::generate::{
    FinishReason, Generated, GenerationConfig, GenerationRequest, Policy, generate_in_flight,
};
use crate::prompt_cursor::{Counter, PromptCursor};
use crate::prompt_limits::{PromptLimits, PromptTruncation};
use crate::weight_state::WeightState;

/// Pool settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// Worker threads (each with its own model copy).
    pub workers: usize,
    /// Completions per prompt (the GRPO group size).
    pub num_generations: usize,
    /// Prompts a worker generates together.
    pub prompts_per_batch: usize,
    /// Generation and sampling.
    pub generation: GenerationConfig,
    /// Capacity of the group channel (groups).
    pub channel_capacity: usize,
    /// How far ahead of the trainer the pool may run, in batches of `groups_per_step` groups: a
    /// worker starts a new batch only while the prompts taken since the pool started are fewer
    /// than `settled + (max_ahead + 1) × groups_per_step`, where `settled` counts the groups the
    /// trainer reported consumed (trained, filtered or dropped as stale) plus the groups the
    /// pool failed itself. Counting what was consumed, not optimizer steps, keeps the pool going
    /// through batches that train nothing. `None`: only the bounded channel holds it back.
    pub max_ahead: Option<u64>,
    /// Groups the trainer consumes per step (for `max_ahead`).
    pub groups_per_step: usize,
    /// The version of the weights the pool is spawned with: 0 for a new run, the checkpoint's
    /// version on resume (so the trainer does not find every group stale).
    pub start_version: PolicyVersion,
    /// Index of the first prompt to take from the environment (the prompt cursor on resume).
    pub first_prompt: u64,
    /// The dtype the trainer publishes weights in: the pool starts from its initial weights
    /// rounded to it, so that its weights at any version depend on that version alone. Default
    /// f32 (the initial weights exactly).
    pub weight_wire: WireDtype,
    /// Switch to new weights between decode steps, mid-completion (off: only between batches).
    pub in_flight_weight_updates: bool,
    /// Longest prompt in tokens; `None`: only the model's context bounds it (every prompt plus
    /// `max_completion_length` must fit `max_position_embeddings`, or the run stops with an error
    /// naming the prompt).
    pub max_prompt_length: Option<usize>,
    /// What happens to a prompt longer than `max_prompt_length`.
    pub prompt_truncation: PromptTruncation,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            workers: 1,
            num_generations: 8,
            prompts_per_batch: 2,
            generation: GenerationConfig::default(),
            channel_capacity: 8,
            max_ahead: None,
            groups_per_step: 1,
            start_version: 0,
            first_prompt: 0,
            weight_wire: WireDtype::F32,
            in_flight_weight_updates: false,
            max_prompt_length: None,
            prompt_truncation: PromptTruncation::Left,
        }
    }
}

/// Live counters of a pool (samples unless named otherwise).
#[derive(Debug, Default)]
pub struct PoolCounters {
    /// Samples generated.
    pub generated: AtomicUsize,
    /// Samples sent to the trainer.
    pub sent: AtomicUsize,
    /// Samples in groups whose rewards failed.
    pub failed: AtomicUsize,
    /// Samples generated but not sent because the pool was shutting down or the trainer left.
    pub unsent_at_shutdown: AtomicUsize,
    /// Completion tokens generated.
    pub tokens: AtomicUsize,
    /// Groups whose rewards failed.
    pub failed_groups: AtomicUsize,
    /// Prompts cut to `max_prompt_length` (from the left).
    pub truncated_prompts: AtomicUsize,
    /// Prompt tokens samples took from their group's one prefill instead of computing them.
    pub shared_prompt_tokens: AtomicUsize,
    /// Sequences preempted for KV-cache room (re-prefilled later, never dropped).
    pub preemptions: AtomicUsize,
}

/// Final accounting of a pool: `generated = sent + failed + unsent_at_shutdown`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PoolReport {
    /// Samples generated.
    pub generated: usize,
    /// Samples sent.
    pub sent: usize,
    /// Samples in failed groups.
    pub failed: usize,
    /// Samples not sent at shutdown.
    pub unsent_at_shutdown: usize,
    /// Groups whose rewards failed.
    pub failed_groups: usize,
    /// Completion tokens generated.
    pub tokens: usize,
    /// Prompt tokens shared from a group's one prefill.
    pub shared_prompt_tokens: usize,
    /// Sequences preempted for KV-cache room.
    pub preemptions: usize,
}

/// A running pool: the trainer's ends of the channels and the handle to stop it.
pub struct RolloutPool {
    /// Scored groups, in the order they finish.
    pub groups: flume::Receiver<Group>,
    /// Where the trainer sends new weights and its consumption count
    /// (the trainer's `grail_trainer::feedback::PoolFeedback`).
    pub feedback: flume::Sender<PoolMessage>,
    shutdown: Arc<AtomicBool>,
    counters: Arc<PoolCounters>,
    workers: Vec<JoinHandle<Result<(), RolloutError>>>,
    forwarder: Option<JoinHandle<()>>,
}

impl RolloutPool {
    /// Live counters.
    pub fn counters(&self) -> &PoolCounters {
        &self.counters
    }

    /// Stops the pool: workers finish (or count) their current batch and exit. Returns the
    /// accounting, or the first worker error.
    pub fn shutdown(mut self) -> Result<PoolReport, RolloutError> {
        self.shutdown.store(true, Ordering::SeqCst);
        let mut first_error = None;
        for w in self.workers.drain(..) {
            match w.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert(RolloutError::WorkerPanicked);
                }
            }
        }
        // Closing our feedback sender ends the forwarder once the trainer's clones are gone too.
        drop(self.forwarder.take());
        let c = &self.counters;
        let report = PoolReport {
            generated: c.generated.load(Ordering::SeqCst),
            sent: c.sent.load(Ordering::SeqCst),
            failed: c.failed.load(Ordering::SeqCst),
            unsent_at_shutdown: c.unsent_at_shutdown.load(Ordering::SeqCst),
            failed_groups: c.failed_groups.load(Ordering::SeqCst),
            tokens: c.tokens.load(Ordering::SeqCst),
            shared_prompt_tokens: c.shared_prompt_tokens.load(Ordering::SeqCst),
            preemptions: c.preemptions.load(Ordering::SeqCst),
        };
        match first_error {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }
}

/// Starts a pool generating from `env` with copies of `model` (a no-grad model; its config is
/// used to rebuild weights from updates), prompts from `cfg.first_prompt` on. Returns the
/// trainer's channel ends and the handle.
pub fn spawn_pool(
    model: &CausalLm,
    env: Arc<dyn Environment>,
    cfg: PoolConfig,
) -> Result<RolloutPool, RolloutError> {
    let prompts = Arc::new(Counter::new(cfg.first_prompt));
    spawn_pool_with(model, env, cfg, prompts)
}

/// [`spawn_pool`] taking its prompt indices from `prompts` (`cfg.first_prompt` is then unused).
pub fn spawn_pool_with(
    model: &CausalLm,
    env: Arc<dyn Environment>,
    cfg: PoolConfig,
    prompts: Arc<dyn PromptCursor>,
) -> Result<RolloutPool, RolloutError> {
    if cfg.workers == 0
        || cfg.num_generations == 0
        || cfg.prompts_per_batch == 0
        || cfg.channel_capacity == 0
    {
        return Err(RolloutError::config(
            "rollout",
            format!("{cfg:?}"),
            "rollout_workers, num_generations, prompts_per_batch and channel capacity must be positive",
        ));
    }
    cfg.generation
        .sampling
        .validate()
        .map_err(|m| RolloutError::config("sampling", m, "invalid sampling parameter"))?;
    let (group_tx, group_rx) = flume::bounded(cfg.channel_capacity);
    let (feedback_tx, feedback_rx) = flume::unbounded::<PoolMessage>();
    let shutdown = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(PoolCounters::default());
    // Every worker gets every message, in order (deltas only make sense applied in sequence).
    let (worker_txs, worker_rxs): (Vec<_>, Vec<_>) = (0..cfg.workers)
        .map(|_| flume::unbounded::<Arc<PoolMessage>>())
        .unzip();
    let forwarder = std::thread::Builder::new()
        .name("grail-feedback".into())
        .spawn(move || {
            for message in feedback_rx.iter() {
                let message = Arc::new(message);
                for tx in &worker_txs {
                    let _ = tx.send(message.clone());
                }
            }
        })
        .map_err(RolloutError::Spawn)?;
    let initial = WeightState::new(model, cfg.start_version, cfg.weight_wire);
    let start_model = initial.build_model(&model.config, &model.device())?;
    let mut workers = Vec::with_capacity(cfg.workers);
    for (w, updates) in worker_rxs.into_iter().enumerate() {
        let worker = Worker {
            weights: WorkerWeights {
                policy: Policy {
                    model: start_model.clone(),
                    version: initial.version(),
                },
                state: initial.clone(),
                updates,
                consumed: 0,
            },
            ctx: WorkerContext {
                env: env.clone(),
                cfg: cfg.clone(),
                tx: group_tx.clone(),
                shutdown: shutdown.clone(),
                counters: counters.clone(),
                prompts: prompts.clone(),
            },
        };
        let handle = std::thread::Builder::new()
            .name(format!("grail-rollout-{w}"))
            .spawn(move || worker.run())
            .map_err(RolloutError::Spawn)?;
        workers.push(handle);
    }
    Ok(RolloutPool {
        groups: group_rx,
        feedback: feedback_tx,
        shutdown,
        counters,
        workers,
        forwarder: Some(forwarder),
    })
}

/// A worker's weights: the model it samples with, the state updates apply to, where they come
/// from, and the trainer's consumption count that came with them.
struct WorkerWeights {
    policy: Policy,
    state: WeightState,
    updates: flume::Receiver<Arc<PoolMessage>>,
    consumed: u64,
}

impl WorkerWeights {
    /// Applies every message sent since the last call, in order, and rebuilds the model once.
    /// Returns whether the weights changed.
    fn refresh(&mut self) -> Result<bool, RolloutError> {
        let mut changed = false;
        for message in self.updates.try_iter() {
            match message.as_ref() {
                PoolMessage::Weights(update) => {
                    self.state.apply(update)?;
                    changed = true;
                }
                PoolMessage::Consumed(total) => self.consumed = self.consumed.max(*total),
            }
        }
        if changed {
            let model = &self.policy.model;
            self.policy.model = self.state.build_model(&model.config, &model.device())?;
            self.policy.version = self.state.version();
            tracing::debug!(
                version = self.policy.version,
                "rollout worker picked up new weights"
            );
        }
        Ok(changed)
    }
}

struct Worker {
    weights: WorkerWeights,
    ctx: WorkerContext,
}

/// What a worker shares with the pool: environment, settings, channel, flags and counters.
struct WorkerContext {
    env: Arc<dyn Environment>,
    cfg: PoolConfig,
    tx: flume::Sender<Group>,
    shutdown: Arc<AtomicBool>,
    counters: Arc<PoolCounters>,
    prompts: Arc<dyn PromptCursor>,
}

impl Worker {
    /// Generates until shutdown or the end of the prompts. An error stops the whole pool (so the
    /// trainer's channel closes and the run ends with it) and comes back from `shutdown`.
    fn run(mut self) -> Result<(), RolloutError> {
        let result = self.work();
        if result.is_err() {
            self.ctx.shutdown.store(true, Ordering::SeqCst);
        }
        result
    }

    fn work(&mut self) -> Result<(), RolloutError> {
        while !self.ctx.shutdown.load(Ordering::SeqCst) {
            self.weights.refresh()?;
            if self.too_far_ahead() {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            let prompts = self.ctx.take_prompts(&self.weights.policy.model)?;
            if prompts.is_empty() {
                break; // the environment is exhausted
            }
            self.ctx.generate_batch(&mut self.weights, &prompts)?;
        }
        Ok(())
    }

    /// Whether starting another batch would put the pool more than `max_ahead` batches ahead
    /// of what the trainer has consumed (see [`PoolConfig::max_ahead`]).
    fn too_far_ahead(&self) -> bool {
        let Some(ahead) = self.ctx.cfg.max_ahead else {
            return false;
        };
        let settled =
            self.weights.consumed + self.ctx.counters.failed_groups.load(Ordering::SeqCst) as u64;
        let allowed = settled + (ahead + 1) * self.ctx.cfg.groups_per_step as u64;
        self.ctx.prompts.taken() >= allowed
    }
}

impl WorkerContext {
    /// The next batch of prompts, within the limits (fewer when the environment runs out).
    fn take_prompts(&self, model: &CausalLm) -> Result<Vec<Prompt>, RolloutError> {
        let limits = PromptLimits {
            max_prompt_length: self.cfg.max_prompt_length,
            truncation: self.cfg.prompt_truncation,
            max_completion_length: self.cfg.generation.max_completion_length,
            max_positions: model.config.max_position_embeddings,
        };
        let mut prompts = Vec::with_capacity(self.cfg.prompts_per_batch);
        for _ in 0..self.cfg.prompts_per_batch {
            let Some(index) = self.prompts.next()? else {
                break;
            };
            let prompt = match self.env.prompt(index) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    return Err(RolloutError::prompt(
                        index,
                        format!("the environment failed: {e}"),
                    ));
                }
            };
            let (prompt, truncated) = limits.apply(prompt)?;
            if truncated
                && self
                    .counters
                    .truncated_prompts
                    .fetch_add(1, Ordering::SeqCst)
                    == 0
            {
                tracing::warn!(
                    prompt = index,
                    max_prompt_length = self.cfg.max_prompt_length,
                    "prompt cut from the left to max_prompt_length (counted in truncated_prompts; \
                     logged once)"
                );
            }
            prompts.push(prompt);
        }
        Ok(prompts)
    }

    fn generate_batch(
        &self,
        weights: &mut WorkerWeights,
        prompts: &[Prompt],
    ) -> Result<(), RolloutError> {
        let g = self.cfg.num_generations;
        let by_id: HashMap<u64, &Prompt> = prompts.iter().map(|p| (p.id, p)).collect();
        let requests = prompts.iter().flat_map(|p| {
            (0..g).map(move |s| GenerationRequest {
                prompt_id: p.id,
                sample_index: s,
                prompt: p.ids.clone(),
            })
        });
        let mut pending: HashMap<u64, Vec<Generated>> = HashMap::new();
        let mut first_error = None;
        let decode = |ids: &[u32]| self.env.decode(ids);
        let in_flight = self.cfg.in_flight_weight_updates;
        let mut policy = weights.policy.clone();
        let stats = generate_in_flight(
            &mut policy,
            &self.cfg.generation,
            Some(&decode),
            requests,
            |policy| {
                if !in_flight || !weights.refresh()? {
                    return Ok(false);
                }
                *policy = weights.policy.clone();
                Ok(true)
            },
            |done| {
                self.counters.generated.fetch_add(1, Ordering::SeqCst);
                self.counters
                    .tokens
                    .fetch_add(done.ids.len(), Ordering::SeqCst);
                let id = done.request.prompt_id;
                let list = pending.entry(id).or_default();
                list.push(done);
                if list.len() == g {
                    let mut list = pending.remove(&id).expect("just filled");
                    list.sort_by_key(|d| d.request.sample_index);
                    if let Err(e) = self.score_and_send(by_id[&id], list) {
                        first_error.get_or_insert(e);
                    }
                }
            },
        )?;
        let c = &self.counters;
        c.shared_prompt_tokens
            .fetch_add(stats.shared_prompt_tokens, Ordering::SeqCst);
        c.preemptions.fetch_add(stats.preemptions, Ordering::SeqCst);
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Runs the rewards on rayon and sends the group; a failing reward fails (and counts) the group.
    fn score_and_send(&self, prompt: &Prompt, done: Vec<Generated>) -> Result<(), RolloutError> {
        let n = done.len();
        let scored: Vec<Result<Vec<f32>, String>> = done
            .par_iter()
            .map(|d| {
                let completion = Completion {
                    ids: d.ids.clone(),
                    text: self.env.decode(&d.ids),
                    finished: d.finish != FinishReason::Length,
                };
                score(self.env.as_ref(), prompt, &completion)
            })
            .collect();
        if let Some(Err(reason)) = scored.iter().find(|r| r.is_err()) {
            tracing::warn!(prompt = prompt.id, %reason, "group failed");
            self.counters.failed.fetch_add(n, Ordering::SeqCst);
            self.counters.failed_groups.fetch_add(1, Ordering::SeqCst);
            return Ok(());
        }
        let samples = done
            .into_iter()
            .zip(scored)
            .map(|(d, r)| Sample {
                policy_version: d.versions.iter().copied().min().unwrap_or_default(),
                completion_ids: d.ids,
                behaviour_logps: d.logps,
                rewards: r.expect("checked"),
                token_versions: d.versions,
                sketches: d.sketches,
            })
            .collect();
        let mut group = Group {
            prompt_id: prompt.id,
            prompt_ids: prompt.ids.clone(),
            samples,
        };
        // Block while the trainer is behind, but keep an eye on shutdown.
        loop {
            if self.shutdown.load(Ordering::SeqCst) {
                self.counters
                    .unsent_at_shutdown
                    .fetch_add(n, Ordering::SeqCst);
                return Ok(());
            }
            match self.tx.send_timeout(group, Duration::from_millis(20)) {
                Ok(()) => {
                    self.counters.sent.fetch_add(n, Ordering::SeqCst);
                    return Ok(());
                }
                Err(flume::SendTimeoutError::Timeout(g)) => group = g,
                Err(flume::SendTimeoutError::Disconnected(_)) => {
                    self.counters
                        .unsent_at_shutdown
                        .fetch_add(n, Ordering::SeqCst);
                    self.shutdown.store(true, Ordering::SeqCst);
                    return Ok(());
                }
            }
        }
    }
}
