//! Training from the rollout pool's channel: batches of groups in, optimizer steps out, with the
//! staleness filter, the feedback that keeps the pool going, and a watchdog that turns a stalled
//! run into an error saying why.
//!
//! Every group taken off the channel is settled exactly once: trained on, filtered out (zero
//! reward spread), dropped as stale, or left unused when the channel closes mid-batch; the
//! trainer reports each settled group back to the pool ([`Feedback::consumed`]), which is
//! what frees the pool to take new prompts. A batch that trains nothing therefore never stalls
//! the pool; what can still stall a run (a pool that sends nothing, a reward that never
//! discriminates) is caught by the watchdog.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use grail_protocol::Group;

use crate::error::{Result, TrainerError};
use crate::feedback::Feedback;
use crate::metrics::StepMetrics;
use crate::step::StepOutcome;
use crate::trainer::GrpoTrainer;

/// How to train from a channel.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelRun {
    /// Groups per optimizer step (TRL: `per_device_train_batch_size × … / num_generations`).
    pub groups_per_step: usize,
    /// Groups whose oldest sample is more than this many versions behind are dropped.
    pub max_staleness: u64,
    /// Optimizer steps this call takes at most.
    pub max_steps: usize,
    /// The watchdog: the run stops with [`TrainerError::Stalled`] when it has taken no optimizer
    /// step for this long and, in that time, either no group arrived for this long or some
    /// batches were filtered or groups dropped as stale (the run is not learning). Time spent
    /// inside a step does not count. `None`: never.
    pub stall_timeout: Option<Duration>,
}

impl ChannelRun {
    /// `max_steps` steps of `groups_per_step` groups, dropping groups more than `max_staleness`
    /// versions old, without a watchdog.
    pub fn new(groups_per_step: usize, max_staleness: u64, max_steps: usize) -> Self {
        Self {
            groups_per_step,
            max_staleness,
            max_steps,
            stall_timeout: None,
        }
    }
}

/// Sample accounting of [`GrpoTrainer::run_from_channel`]:
/// `received = trained + dropped_stale + dropped_filtered + unused_at_close`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RunStats {
    /// Samples received from the channel.
    pub received: usize,
    /// Samples trained on.
    pub trained: usize,
    /// Samples dropped as too stale.
    pub dropped_stale: usize,
    /// Samples in groups filtered out for zero reward spread.
    pub dropped_filtered: usize,
    /// Samples received but not trained on because the channel closed mid-batch.
    pub unused_at_close: usize,
    /// Groups settled (trained on, filtered or dropped as stale) and reported to the pool.
    pub groups_settled: usize,
    /// Groups taken off the channel: the settled ones and those of the batch the run stopped
    /// in (counted in `unused_at_close`). Always a prefix of what the channel delivered.
    pub groups_received: usize,
}

/// What [`GrpoTrainer::run_from_channel`] shows its caller.
#[derive(Debug)]
pub enum RunEvent<'a> {
    /// An optimizer step finished and its weights were published.
    Step {
        /// The step's metrics.
        metrics: &'a StepMetrics,
        /// The accounting so far.
        stats: &'a RunStats,
    },
    /// No step yet: nothing arrived for a second, or a batch trained nothing (every group had
    /// zero reward spread). A chance to show progress or to stop.
    Waiting {
        /// Time since the last optimizer step (or the start), not counting time in steps.
        since_step: Duration,
    },
}

/// How often the loop wakes while waiting for groups.
const POLL: Duration = Duration::from_secs(1);

/// What happened since the last optimizer step, for the watchdog and its message.
struct SinceStep {
    waited: Duration,
    last_arrival: Instant,
    groups: usize,
    filtered_batches: usize,
    stale_groups: usize,
}

impl SinceStep {
    fn new() -> Self {
        Self {
            waited: Duration::ZERO,
            last_arrival: Instant::now(),
            groups: 0,
            filtered_batches: 0,
            stale_groups: 0,
        }
    }

    /// The reason to stop, if the run is stalled under `timeout`.
    fn stalled(&self, timeout: Duration, run: &ChannelRun) -> Option<String> {
        let silent = self.last_arrival.elapsed();
        let not_learning = self.filtered_batches > 0 || self.stale_groups > 0;
        if self.waited < timeout || !(silent >= timeout || not_learning) {
            return None;
        }
        let head = format!(
            "no optimizer step for {:.0} s (stall_timeout {:.0} s)",
            self.waited.as_secs_f64(),
            timeout.as_secs_f64()
        );
        Some(if self.filtered_batches > 0 {
            format!(
                "{head}: {} consecutive batches had zero reward spread (every completion of every \
                 group scored the same): check the temperature and the reward functions, or the \
                 policy has saturated the reward",
                self.filtered_batches
            )
        } else if self.stale_groups > 0 {
            format!(
                "{head}: {} groups arrived more than max_staleness = {} versions old: raise \
                 max_staleness or lower max_ahead",
                self.stale_groups, run.max_staleness
            )
        } else if self.groups > 0 {
            format!(
                "{head}: only {} of the {} groups of a batch arrived, none for {:.0} s",
                self.groups,
                run.groups_per_step,
                silent.as_secs_f64()
            )
        } else {
            format!(
                "{head}: no group arrived from the rollout pool for {:.0} s",
                silent.as_secs_f64()
            )
        })
    }
}

/// Counts `groups` more settled groups and tells the pool (if there is one).
fn settle(
    stats: &mut RunStats,
    feedback: &mut Option<&mut dyn Feedback>,
    groups: usize,
) -> Result<()> {
    stats.groups_settled += groups;
    match feedback.as_deref_mut() {
        Some(f) => f.consumed(groups),
        None => Ok(()),
    }
}

/// Samples in `groups`.
fn samples_in(groups: &[Group]) -> usize {
    groups.iter().map(|g| g.samples.len()).sum()
}

impl GrpoTrainer {
    /// No step this time (a second without groups, or a batch that trained nothing): the
    /// watchdog, then the caller's chance to show progress or stop.
    fn idle(
        &self,
        since: &SinceStep,
        run: &ChannelRun,
        on_event: &mut impl FnMut(&GrpoTrainer, RunEvent<'_>) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>> {
        if let Some(reason) = run.stall_timeout.and_then(|t| since.stalled(t, run)) {
            return Err(TrainerError::Stalled(reason));
        }
        Ok(on_event(
            self,
            RunEvent::Waiting {
                since_step: since.waited,
            },
        ))
    }

    /// Trains from a channel of groups: each step takes `run.groups_per_step` groups, drops (and
    /// counts) groups whose oldest sample is more than `run.max_staleness` versions behind,
    /// trains, publishes the new weights and reports every settled group through `feedback` (if
    /// given). Stops after `run.max_steps` optimizer steps, when the channel closes, when
    /// `on_event` returns `ControlFlow::Break` (after a step, or while waiting), or with
    /// [`TrainerError::Stalled`] when the watchdog fires.
    pub fn run_from_channel(
        &mut self,
        groups: &flume::Receiver<Group>,
        mut feedback: Option<&mut dyn Feedback>,
        run: &ChannelRun,
        mut on_event: impl FnMut(&GrpoTrainer, RunEvent<'_>) -> ControlFlow<()>,
    ) -> Result<RunStats> {
        let mut stats = RunStats::default();
        let mut since = SinceStep::new();
        let start_step = self.step();
        while self.step() - start_step < run.max_steps {
            let mut batch: Vec<Group> = Vec::with_capacity(run.groups_per_step);
            while batch.len() < run.groups_per_step {
                let waiting = Instant::now();
                let received = groups.recv_timeout(POLL);
                since.waited += waiting.elapsed();
                let group = match received {
                    Ok(group) => group,
                    Err(flume::RecvTimeoutError::Disconnected) => {
                        stats.unused_at_close += samples_in(&batch);
                        return Ok(stats);
                    }
                    Err(flume::RecvTimeoutError::Timeout) => {
                        if self.idle(&since, run, &mut on_event)?.is_break() {
                            stats.unused_at_close += samples_in(&batch);
                            return Ok(stats);
                        }
                        continue;
                    }
                };
                since.last_arrival = Instant::now();
                since.groups += 1;
                stats.received += group.samples.len();
                stats.groups_received += 1;
                let age = self.version().saturating_sub(group.oldest_version());
                if age > run.max_staleness {
                    since.stale_groups += 1;
                    tracing::warn!(
                        prompt = group.prompt_id,
                        age,
                        max_staleness = run.max_staleness,
                        stale_since_last_step = since.stale_groups,
                        "dropped a stale group"
                    );
                    stats.dropped_stale += group.samples.len();
                    settle(&mut stats, &mut feedback, 1)?;
                    continue;
                }
                batch.push(group);
            }
            let batch_samples = samples_in(&batch);
            let metrics = match self.train_step(&batch)? {
                StepOutcome::Trained(metrics) => metrics,
                StepOutcome::NothingToTrain { groups, samples } => {
                    since.filtered_batches += 1;
                    // Logged at 1, 2, 4, 8, … in a row: news without a flood.
                    if since.filtered_batches.is_power_of_two() {
                        tracing::warn!(
                            groups,
                            in_a_row = since.filtered_batches,
                            "every group of the batch had zero reward spread; nothing to train on"
                        );
                    }
                    stats.dropped_filtered += samples;
                    settle(&mut stats, &mut feedback, batch.len())?;
                    if self.idle(&since, run, &mut on_event)?.is_break() {
                        return Ok(stats);
                    }
                    continue;
                }
            };
            let filtered: usize = metrics.first().map_or(0, |m| m.dropped_zero_std_samples);
            stats.dropped_filtered += filtered;
            stats.trained += batch_samples - filtered;
            since = SinceStep::new();
            if let Some(f) = feedback.as_deref_mut() {
                f.publish(self.version(), self.model())?;
            }
            settle(&mut stats, &mut feedback, batch.len())?;
            let mut stop = false;
            for m in &metrics {
                let event = RunEvent::Step {
                    metrics: m,
                    stats: &stats,
                };
                stop |= on_event(self, event).is_break();
            }
            if stop {
                break;
            }
        }
        Ok(stats)
    }
}
