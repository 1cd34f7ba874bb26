//! The asynchronous GRPO phase of a run: the rollout side generates while the trainer trains,
//! and they meet only through channels — to a pool in this process, or to an inbox reading the
//! rollout objects that workers in other processes write to a store. Each step is logged
//! (metrics line, curve, progress) and checkpointed every `save_steps`; at the end the rollout
//! side is stopped and every sample accounted for.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use burn::module::Module;
use grail_core::tokenizer::Tokenizer;
use grail_protocol::{Group, WireDtype};
use grail_rollout::generate::GenerationConfig;
use grail_rollout::pool::PoolCounters;
use grail_rollout::{Environment, PoolConfig, PromptLimits, RolloutPool, spawn_pool};
use grail_store::weight_writer::newest_version;
use grail_store::{RolloutCheck, Store};
use grail_trainer::{
    ChannelRun, Feedback, GrpoTrainer, PoolFeedback, RunEvent, RunStats, StepMetrics, TrainerError,
    WeightPublisher,
};
use serde_json::json;

use crate::checkpoint::{self, Accounting, RolloutCursor, RunState};
use crate::config::GrpoConfig;
use crate::evaluate::HeldOut;
use crate::output::MetricsLog;
use crate::progress::Progress;
use crate::rollout_ledger::Ledger;
use crate::rollout_verification::RunRules;
use crate::store_trainer::{StoreFeedback, StoreInbox, publish_manifest};

/// The dtype weights travel to the rollout workers in.
const WIRE: WireDtype = WireDtype::Bf16;

/// Reward (per step) and held-out accuracy (where measured) for the plot.
pub(crate) type Curve = Vec<(usize, f64, Option<f64>)>;

/// What the phase needs from the run.
pub(crate) struct Phase<'a> {
    pub cfg: &'a GrpoConfig,
    pub train_env: &'a Arc<dyn Environment>,
    pub tokenizer: &'a Tokenizer,
    pub generation: &'a GenerationConfig,
    pub limits: &'a PromptLimits,
    pub held_out: &'a HeldOut<'a>,
    /// Where this process starts (a fresh run's state after the warm-up, or a checkpoint's).
    pub state: &'a RunState,
    pub resumed: bool,
    pub stop: &'a AtomicBool,
    /// The store rollout workers in other processes meet the trainer in (`role = "trainer"`);
    /// `None`: a pool in this process.
    pub store: Option<&'a Store>,
}

/// What the phase leaves behind.
pub(crate) struct PhaseEnd {
    /// The run's state after the phase.
    pub state: RunState,
    pub curve: Curve,
    pub metrics: PathBuf,
}

/// Trains `trainer` from a rollout pool until `max_steps`, a stop request or an error.
pub(crate) fn train(phase: &Phase, trainer: &mut GrpoTrainer) -> Result<PhaseEnd> {
    let (cfg, g) = (phase.cfg, &phase.cfg.grpo);
    let start = Instant::now();
    let (metrics_log, kept) =
        MetricsLog::open(&cfg.output_dir, phase.resumed.then_some(phase.state.step))?;
    let curve = kept
        .iter()
        .map(|l| {
            (
                l["step"].as_u64().unwrap_or(0) as usize,
                l["reward_mean"].as_f64().unwrap_or(0.0),
                l["eval_accuracy"].as_f64(),
            )
        })
        .collect();
    let (rollouts, mut feedback) = match phase.store {
        None => {
            let pool = spawn_local_pool(phase, trainer)?;
            let feedback: Box<dyn Feedback> = Box::new(PoolFeedback::new(
                pool.feedback.clone(),
                WeightPublisher::new(g.weight_sync, WIRE, trainer.model(), trainer.version()),
            ));
            (Rollouts::Pool(pool), feedback)
        }
        Some(store) => {
            if phase.resumed && phase.state.rollouts.is_none() {
                anyhow::bail!(
                    "the checkpoint resumed from was written by a run without a store (it has \
                     no rollout cursor): resume it without `store`, or start a new run_id"
                );
            }
            let ledger = Arc::new(Mutex::new(Ledger::resume(phase.state.rollouts.clone())));
            if phase.resumed {
                // Workers that come now must not take the earlier attempt's end for this one's.
                store.delete(grail_store::layout::FINISHED)?;
                // Versions published after the checkpoint (by the attempt that was stopped or
                // killed) keep their numbers: this attempt's weights come after them.
                if let Some(newest) = newest_version(store)? {
                    trainer.continue_versions_from(newest + 1);
                }
            }
            publish_manifest(store, cfg, phase.tokenizer, trainer.model())?;
            let feedback =
                StoreFeedback::start(store, cfg, trainer.model(), trainer.version(), &ledger)?;
            let check = RolloutCheck {
                vocab_size: trainer.model().vocab_size(),
                num_generations: g.num_generations,
                max_completion_length: g.max_completion_length,
                reward_names: phase
                    .train_env
                    .rewards()
                    .iter()
                    .map(|r| r.name.clone())
                    .collect(),
            };
            let rules = RunRules {
                env: phase.train_env.clone(),
                limits: *phase.limits,
                generation: phase.generation.clone(),
                claim_block: pool_config(cfg, phase.generation, phase.limits).prompts_per_batch
                    as u64,
                quarantine_after: g.quarantine_after,
                verify_fraction: g.verify_fraction,
            };
            let inbox = StoreInbox::start(store, check, &feedback, g.prompts_per_step * 2, rules)?;
            tracing::info!(store = %store.location(""), "waiting for rollout workers");
            (
                Rollouts::Store(inbox),
                Box::new(feedback) as Box<dyn Feedback>,
            )
        }
    };
    let channel_run = ChannelRun {
        groups_per_step: g.prompts_per_step,
        max_staleness: g.max_staleness,
        max_steps: g.max_steps.saturating_sub(trainer.step()),
        stall_timeout: (g.stall_timeout > 0).then(|| Duration::from_secs(g.stall_timeout)),
    };
    let mut log = StepLog::new(phase, &rollouts, metrics_log, curve, trainer.step(), start);
    let go_on = || {
        if phase.stop.load(Ordering::SeqCst) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let result = trainer.run_from_channel(
        &rollouts.groups().clone(),
        Some(feedback.as_mut()),
        &channel_run,
        |t, event| match event {
            RunEvent::Waiting { since_step } => {
                log.waiting(since_step);
                go_on()
            }
            RunEvent::Step { metrics, stats } => match log.step(t, metrics, stats) {
                Ok(()) => go_on(),
                Err(e) => {
                    log.error = Some(e);
                    ControlFlow::Break(())
                }
            },
        },
    );
    let StepLog {
        metrics_log,
        curve,
        overlapped,
        error,
        progress,
        ..
    } = log;
    progress.finish();
    let failed_groups = rollouts.counters().failed_groups.load(Ordering::SeqCst);
    let end = rollouts.finish(result.as_ref().map_or(0, |r| r.groups_received));
    let run = match result {
        Ok(run) => run,
        Err(e @ TrainerError::Stalled(_)) => {
            // With a store the rollout pool is whatever workers were started, or none.
            let workers = match (phase.store, &phase.cfg.store) {
                (Some(_), Some(url)) => format!(
                    "; the rollouts come from workers started with `--role rollout --store {url} \
                     --run-id {}`",
                    phase.cfg.run_id
                ),
                _ => String::new(),
            };
            return Err(anyhow::Error::new(e).context(format!(
                "GRPO stopped at step {} ({failed_groups} groups failed in the reward \
                 functions{workers})",
                trainer.step()
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let end = end?;
    if let Some(e) = error {
        return Err(e);
    }
    let segment = Accounting {
        received: run.received,
        trained: run.trained,
        dropped_stale: run.dropped_stale,
        dropped_filtered: run.dropped_filtered,
        unused_at_close: run.unused_at_close,
        ..end.accounting
    };
    let state = phase.state;
    // With a store the workers' counters are the whole run's: the rollout side of the
    // accounting is the final one, the trainer's side adds up over the attempts.
    let accounting = match end.cursor {
        Some(_) => state.accounting.then(&segment),
        None => state.accounting.plus(&segment),
    };
    Ok(PhaseEnd {
        state: RunState {
            step: trainer.step(),
            prompt_cursor: state.prompt_cursor + (run.groups_settled + end.failed_groups) as u64,
            grpo_seconds: state.grpo_seconds + start.elapsed().as_secs_f64(),
            overlapped_steps: state.overlapped_steps + overlapped,
            accounting,
            rollouts: end.cursor,
            ..state.clone()
        },
        curve,
        metrics: metrics_log.path().to_path_buf(),
    })
}

/// A pool in this process, generating from the trainer's current weights.
fn spawn_local_pool(phase: &Phase, trainer: &GrpoTrainer) -> Result<RolloutPool> {
    let mut pool = pool_config(phase.cfg, phase.generation, phase.limits);
    pool.start_version = trainer.version();
    pool.first_prompt = phase.state.prompt_cursor;
    Ok(spawn_pool(
        &trainer.model().valid(),
        phase.train_env.clone(),
        pool,
    )?)
}

/// The pool settings a run's config implies (for this process's pool or a rollout worker's),
/// starting at version 0 and prompt 0.
pub(crate) fn pool_config(
    cfg: &GrpoConfig,
    generation: &GenerationConfig,
    limits: &PromptLimits,
) -> PoolConfig {
    let g = &cfg.grpo;
    PoolConfig {
        workers: g.rollout_workers,
        num_generations: g.num_generations,
        prompts_per_batch: g.prompts_per_step.div_ceil(g.rollout_workers),
        generation: GenerationConfig {
            max_batch: g.num_generations * g.prompts_per_step,
            ..generation.clone()
        },
        channel_capacity: g.prompts_per_step * 2,
        max_ahead: g.max_ahead,
        groups_per_step: g.prompts_per_step,
        start_version: 0,
        first_prompt: 0,
        weight_wire: WIRE,
        in_flight_weight_updates: g.in_flight_weight_updates,
        max_prompt_length: limits.max_prompt_length,
        prompt_truncation: limits.truncation,
    }
}

/// Where the trainer's groups come from.
enum Rollouts {
    /// A pool in this process.
    Pool(RolloutPool),
    /// Rollout workers elsewhere, through a store.
    Store(StoreInbox),
}

/// What the rollout side reports at the end.
struct RolloutEnd {
    /// Its side of the accounting (generated, sent, failed, unsent, left in transit, rejected).
    accounting: Accounting,
    /// Groups it failed itself (their prompts count as settled).
    failed_groups: usize,
    /// With a store: the trainer's place in the rollout objects.
    cursor: Option<RolloutCursor>,
}

impl Rollouts {
    fn groups(&self) -> &flume::Receiver<Group> {
        match self {
            Rollouts::Pool(pool) => &pool.groups,
            Rollouts::Store(inbox) => &inbox.groups,
        }
    }

    fn counters(&self) -> &PoolCounters {
        match self {
            Rollouts::Pool(pool) => pool.counters(),
            Rollouts::Store(inbox) => &inbox.counters,
        }
    }

    /// Stops the rollout side and accounts for what it generated; the trainer settled
    /// `settled` groups.
    fn finish(self, settled: usize) -> Result<RolloutEnd> {
        match self {
            Rollouts::Pool(pool) => {
                let groups = pool.groups.clone();
                let report = pool.shutdown()?;
                Ok(RolloutEnd {
                    accounting: Accounting {
                        generated: report.generated,
                        sent: report.sent,
                        failed: report.failed,
                        unsent_at_shutdown: report.unsent_at_shutdown,
                        left_in_channel: groups.drain().map(|g| g.samples.len()).sum(),
                        ..Accounting::default()
                    },
                    failed_groups: report.failed_groups,
                    cursor: None,
                })
            }
            Rollouts::Store(inbox) => {
                let (accounting, cursor) = inbox.finish(settled)?;
                Ok(RolloutEnd {
                    accounting,
                    failed_groups: 0,
                    cursor: Some(cursor),
                })
            }
        }
    }
}

/// The bookkeeping of each step: the metrics line, the curve, progress, and the checkpoints due.
struct StepLog<'a> {
    phase: &'a Phase<'a>,
    counters: &'a PoolCounters,
    /// With a store, the inbox whose cursor checkpoints save.
    inbox: Option<&'a StoreInbox>,
    metrics_log: MetricsLog,
    curve: Curve,
    progress: Progress,
    start: Instant,
    /// Steps during which the pool generated.
    overlapped: usize,
    last_generated: usize,
    last_tokens: usize,
    last_time: Instant,
    next_save: usize,
    /// A metrics line or checkpoint that could not be written: it stops the run.
    error: Option<anyhow::Error>,
}

impl<'a> StepLog<'a> {
    fn new(
        phase: &'a Phase<'a>,
        rollouts: &'a Rollouts,
        metrics_log: MetricsLog,
        curve: Curve,
        step: usize,
        start: Instant,
    ) -> Self {
        let progress = Progress::new(phase.cfg.grpo.max_steps as u64, "grpo");
        progress.set_position(step as u64);
        let counters = rollouts.counters();
        Self {
            phase,
            counters,
            inbox: match rollouts {
                Rollouts::Store(inbox) => Some(inbox),
                Rollouts::Pool(_) => None,
            },
            metrics_log,
            curve,
            progress,
            start,
            overlapped: 0,
            last_generated: counters.generated.load(Ordering::SeqCst),
            last_tokens: counters.tokens.load(Ordering::SeqCst),
            last_time: Instant::now(),
            next_save: next_save_after(step, phase.cfg.save_steps),
            error: None,
        }
    }

    fn waiting(&self, since_step: Duration) {
        self.progress.update(format!(
            "waiting for rollouts ({:.0} s since the last step; {} groups failed)",
            since_step.as_secs_f64(),
            self.counters.failed_groups.load(Ordering::SeqCst)
        ));
    }

    fn step(&mut self, t: &GrpoTrainer, m: &StepMetrics, stats: &RunStats) -> Result<()> {
        let (cfg, counters) = (self.phase.cfg, self.counters);
        let generated = counters.generated.load(Ordering::SeqCst);
        let during = generated - self.last_generated;
        self.last_generated = generated;
        if during > 0 {
            self.overlapped += 1;
        }
        let tokens = counters.tokens.load(Ordering::SeqCst);
        let rollout_tokens_per_s =
            (tokens - self.last_tokens) as f64 / self.last_time.elapsed().as_secs_f64().max(1e-9);
        self.last_tokens = tokens;
        self.last_time = Instant::now();
        let acc = (cfg.eval.every > 0 && m.step.is_multiple_of(cfg.eval.every))
            .then(|| {
                self.phase
                    .held_out
                    .accuracy(t.model(), self.phase.limits)
                    .ok()
            })
            .flatten();
        let mut line = serde_json::to_value(m).expect("metrics serialise");
        for (reward, v) in self.phase.train_env.rewards().iter().zip(&m.reward_means) {
            line[format!("reward/{}", reward.name)] = json!(v);
        }
        line["eval_accuracy"] = json!(acc);
        line["pool_generated_during_step"] = json!(during);
        line["rollout_tokens_per_s"] = json!(rollout_tokens_per_s);
        line["pool_failed"] = json!(counters.failed.load(Ordering::SeqCst));
        if let Some(inbox) = self.inbox {
            // Samples in refused rollout objects so far, by worker and reason.
            line["rollouts_refused"] = json!(inbox.refused_by());
        }
        line["elapsed_s"] = json!(self.grpo_seconds());
        self.metrics_log.append(&line)?;
        self.curve.push((m.step, m.reward_mean, acc));
        self.progress.step(format!(
            "reward {:.3} acc {} is-masked {}",
            m.reward_mean,
            acc.map_or("-".into(), |a| format!("{a:.2}")),
            m.importance_sampling_masked_fraction
                .map_or("-".into(), |f| format!("{:.1}%", 100.0 * f))
        ));
        // A batch of μ iterations reports μ steps; the trainer is at the last of them.
        if m.step == t.step() && t.step() >= self.next_save {
            self.next_save = next_save_after(t.step(), cfg.save_steps);
            self.checkpoint(t, stats)?;
        }
        Ok(())
    }

    /// A checkpoint of what is settled so far (samples in flight are left out: a resumed pool
    /// regenerates their prompts).
    fn checkpoint(&self, t: &GrpoTrainer, stats: &RunStats) -> Result<()> {
        let state = self.phase.state;
        let failed_groups = self.counters.failed_groups.load(Ordering::SeqCst);
        let failed_samples = self.counters.failed.load(Ordering::SeqCst);
        let snapshot = RunState {
            step: t.step(),
            prompt_cursor: state.prompt_cursor + (stats.groups_settled + failed_groups) as u64,
            grpo_seconds: self.grpo_seconds(),
            overlapped_steps: state.overlapped_steps + self.overlapped,
            accounting: match self.inbox {
                // The workers count failures from the run's start.
                Some(_) => {
                    let mut a = state.accounting.plus(&settled(stats, 0));
                    a.failed = failed_samples;
                    a.generated = a.received + failed_samples;
                    a
                }
                None => state.accounting.plus(&settled(stats, failed_samples)),
            },
            // At a step the next batch is still empty: every group taken is settled.
            rollouts: self.inbox.map(|inbox| inbox.cursor(stats.groups_received)),
            ..state.clone()
        };
        let cfg = self.phase.cfg;
        checkpoint::save(
            &cfg.output_dir,
            t,
            self.phase.tokenizer,
            &snapshot,
            cfg.save_total_limit,
            self.phase.store,
        )?;
        Ok(())
    }

    /// GRPO wall time over every attempt of the run, this one up to now included.
    fn grpo_seconds(&self) -> f64 {
        self.phase.state.grpo_seconds + self.start.elapsed().as_secs_f64()
    }
}

/// The first step after `step` at which a checkpoint is due (never, for `save_steps` 0).
fn next_save_after(step: usize, save_steps: usize) -> usize {
    step.checked_div(save_steps)
        .map_or(usize::MAX, |done| (done + 1) * save_steps)
}

/// The accounting of what a run settled so far (its in-flight samples left out).
fn settled(stats: &RunStats, failed_samples: usize) -> Accounting {
    let received = stats.trained + stats.dropped_stale + stats.dropped_filtered;
    Accounting {
        generated: received + failed_samples,
        sent: received,
        failed: failed_samples,
        received,
        trained: stats.trained,
        dropped_stale: stats.dropped_stale,
        dropped_filtered: stats.dropped_filtered,
        ..Accounting::default()
    }
}
