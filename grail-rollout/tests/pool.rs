//! The pool and the trainer meeting only through channels: groups flow one way, versioned
//! weights the other; failures are counted; the accounting identity holds at shutdown.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use burn::module::Module;
use burn::tensor::Device;
use grail_core::model::CausalLm;
use grail_protocol::{PoolMessage, SyncMode, WireDtype};
use grail_rollout::generate::GenerationConfig;
use grail_rollout::{Completion, Environment, Prompt, Reward};
use grail_rollout::{PoolConfig, PoolReport, RolloutPool, spawn_pool};
use grail_trainer::channel::{ChannelRun, RunEvent, RunStats};
use grail_trainer::config::TrainerConfig;
use grail_trainer::trainer::GrpoTrainer;
use grail_trainer::{PoolFeedback, WeightPublisher};

use common::tiny_config;

/// Prompts `[i % 50, 1, 2]`; reward: share of completion tokens equal to 7. Prompts with id
/// divisible by `panic_every` make the second reward panic.
struct Sevens {
    rewards: Vec<Reward>,
    limit: u64,
}

impl Sevens {
    fn new(limit: u64, panic_every: Option<u64>) -> Self {
        let rewards = vec![
            Reward::new("sevens", 1.0, |_p: &Prompt, c: &Completion| {
                c.ids.iter().filter(|&&t| t == 7).count() as f32 / c.ids.len().max(1) as f32
            }),
            Reward::new("fragile", 0.5, move |p: &Prompt, _c: &Completion| {
                if let Some(k) = panic_every
                    && p.id.is_multiple_of(k)
                {
                    panic!("cannot score prompt {}", p.id);
                }
                0.0
            }),
        ];
        Self { rewards, limit }
    }
}

impl Environment for Sevens {
    fn prompt(&self, index: u64) -> grail_core::Result<Option<Prompt>> {
        Ok((index < self.limit).then(|| Prompt {
            id: index,
            text: String::new(),
            ids: Arc::new(vec![(index % 50) as u32, 1, 2]),
            answer: String::new(),
            metadata: serde_json::Value::Null,
        }))
    }
    fn rewards(&self) -> &[Reward] {
        &self.rewards
    }
    fn decode(&self, ids: &[u32]) -> String {
        format!("{ids:?}")
    }
}

fn pool_config(workers: usize) -> PoolConfig {
    PoolConfig {
        workers,
        num_generations: 4,
        prompts_per_batch: 2,
        generation: GenerationConfig {
            max_completion_length: 6,
            max_batch: 8,
            seed: 3,
            ..GenerationConfig::default()
        },
        channel_capacity: 2,
        ..PoolConfig::default()
    }
}

/// A trainer for the `Sevens` rewards (two reward functions).
fn trainer(policy: CausalLm) -> GrpoTrainer {
    let cfg = TrainerConfig {
        learning_rate: 1e-3,
        reward_weights: vec![1.0, 0.5],
        ..TrainerConfig::default()
    };
    GrpoTrainer::new(policy, None, cfg).unwrap()
}

/// Every sample is accounted for: generated = sent + failed + unsent; sent = received + left in
/// the channel; received = trained + stale + filtered + unused.
fn assert_accounted(report: &PoolReport, run: &RunStats, left: usize) {
    assert_eq!(
        report.generated,
        report.sent + report.failed + report.unsent_at_shutdown
    );
    assert_eq!(report.sent, run.received + left);
    assert_eq!(
        run.received,
        run.trained + run.dropped_stale + run.dropped_filtered + run.unused_at_close
    );
}

/// The trainer's feedback to `pool`: bf16 deltas from the trainer's current weights.
fn feedback(pool: &RolloutPool, trainer: &GrpoTrainer) -> PoolFeedback {
    PoolFeedback::new(
        pool.feedback.clone(),
        WeightPublisher::new(SyncMode::Delta, WireDtype::Bf16, trainer.model(), 0),
    )
}

#[test]
fn pool_and_trainer_meet_through_channels_and_account_for_everything() {
    let device = Device::flex();
    let policy = CausalLm::init(&tiny_config(64), 1, &device.clone().autodiff());
    let pool = spawn_pool(
        &policy.valid(),
        Arc::new(Sevens::new(10_000, None)),
        pool_config(2),
    )
    .unwrap();
    let mut trainer = trainer(policy);
    // Sparse bf16 deltas: every worker must apply each one, in order.
    let mut publisher = WeightPublisher::new(SyncMode::Delta, WireDtype::Bf16, trainer.model(), 0);
    let mut versions_seen = Vec::new();
    for _ in 0..4 {
        let batch: Vec<_> = (0..2).map(|_| pool.groups.recv().unwrap()).collect();
        versions_seen.extend(batch.iter().map(|g| g.oldest_version()));
        trainer.train_step(&batch).unwrap();
        pool.feedback
            .send(publisher.publish(trainer.version(), trainer.model()).into())
            .unwrap();
    }
    // Later groups were generated with published weights.
    for _ in 0..40 {
        let g = pool.groups.recv().unwrap();
        versions_seen.push(g.oldest_version());
        if g.oldest_version() > 0 {
            break;
        }
    }
    assert!(
        versions_seen.iter().any(|&v| v > 0),
        "workers never picked up new weights: {versions_seen:?}"
    );
    let consumed: usize = 4 * 2 * 4 + (versions_seen.len() - 8) * 4;
    let groups = pool.groups.clone();
    let report = pool.shutdown().unwrap();
    let left_in_channel: usize = groups.drain().map(|g| g.samples.len()).sum();
    assert_eq!(
        report.generated,
        report.sent + report.failed + report.unsent_at_shutdown
    );
    assert_eq!(report.sent, consumed + left_in_channel, "{report:?}");
    assert_eq!(report.failed, 0);
}

#[test]
fn a_panicking_reward_fails_its_group_and_the_pool_keeps_going() {
    let device = Device::flex();
    let model = CausalLm::init(&tiny_config(64), 2, &device);
    let pool = spawn_pool(&model, Arc::new(Sevens::new(12, Some(3))), pool_config(1)).unwrap();
    let received: Vec<_> = pool.groups.iter().take_while(|_| true).collect::<Vec<_>>();
    // The environment has 12 prompts; ids 0, 3, 6, 9 fail.
    let ids: Vec<u64> = received.iter().map(|g| g.prompt_id).collect();
    assert_eq!(ids.len(), 8, "{ids:?}");
    assert!(ids.iter().all(|id| id % 3 != 0));
    let counters = pool.counters();
    assert_eq!(counters.failed_groups.load(Ordering::SeqCst), 4);
    let report = pool.shutdown().unwrap();
    assert_eq!(report.failed, 16);
    assert_eq!(
        report.generated,
        report.sent + report.failed + report.unsent_at_shutdown
    );
    assert!(received.iter().all(|g| {
        g.samples
            .iter()
            .all(|s| s.rewards.len() == 2 && s.behaviour_logps.len() == s.completion_ids.len())
    }));
}

#[test]
fn a_slow_trainer_drops_stale_samples_and_the_accounting_is_exact() {
    let device = Device::flex();
    let policy = CausalLm::init(&tiny_config(64), 4, &device.clone().autodiff());
    let pool = spawn_pool(
        &policy.valid(),
        Arc::new(Sevens::new(10_000, None)),
        pool_config(1),
    )
    .unwrap();
    let mut trainer = trainer(policy);
    let mut feedback = feedback(&pool, &trainer);
    // Staleness 0 and a trainer that dawdles after every step: groups made before the last
    // update arrive stale and are dropped.
    let run = trainer
        .run_from_channel(
            &pool.groups.clone(),
            Some(&mut feedback),
            &ChannelRun::new(2, 0, 5),
            |_, _| {
                std::thread::sleep(std::time::Duration::from_millis(60));
                std::ops::ControlFlow::Continue(())
            },
        )
        .unwrap();
    assert_eq!(trainer.step(), 5);
    assert!(run.dropped_stale > 0, "{run:?}");
    // Shut down mid-generation: every sample is still accounted for.
    let groups = pool.groups.clone();
    let report = pool.shutdown().unwrap();
    let left: usize = groups.drain().map(|g| g.samples.len()).sum();
    assert_accounted(&report, &run, left);
}

#[test]
fn the_pool_pauses_when_too_far_ahead_and_resumes_with_new_weights() {
    let device = Device::flex();
    let model = CausalLm::init(&tiny_config(64), 6, &device);
    let cfg = PoolConfig {
        max_ahead: Some(0),
        groups_per_step: 2,
        channel_capacity: 16,
        ..pool_config(1)
    };
    let pool = spawn_pool(&model, Arc::new(Sevens::new(10_000, None)), cfg).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(400));
    // Nothing consumed, zero steps ahead: one step's worth of prompts (2 groups × 4 samples), then
    // a pause.
    assert_eq!(pool.counters().generated.load(Ordering::SeqCst), 8);
    // New weights alone do not free the pool: only consumed groups do.
    let mut publisher = WeightPublisher::new(SyncMode::Full, WireDtype::F32, &model, 0);
    pool.feedback
        .send(publisher.publish(1, &model).into())
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert_eq!(pool.counters().generated.load(Ordering::SeqCst), 8);
    pool.feedback.send(PoolMessage::Consumed(2)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert_eq!(
        pool.counters().generated.load(Ordering::SeqCst),
        16,
        "one more step's worth once the trainer consumed the first"
    );
    // A batch the trainer filtered out (no optimizer step, no new weights) frees it just the
    // same: a run whose batches all have zero reward spread cannot stall the pool.
    pool.feedback.send(PoolMessage::Consumed(4)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert_eq!(pool.counters().generated.load(Ordering::SeqCst), 24);
    let report = pool.shutdown().unwrap();
    assert_eq!(report.generated, 24);
}

#[test]
fn stop_strings_end_completions_through_the_decoder() {
    use grail_rollout::generate::{
        FinishReason, GenerationRequest, generate, generate_with_decoder,
    };
    let model = CausalLm::init(&tiny_config(64), 7, &Device::flex());
    let decode = |ids: &[u32]| ids.iter().map(|t| format!("<{t}>")).collect::<String>();
    let request = GenerationRequest {
        prompt_id: 0,
        sample_index: 0,
        prompt: Arc::new(vec![1, 2, 3]),
    };
    let mut cfg = GenerationConfig {
        max_completion_length: 30,
        seed: 1,
        ..GenerationConfig::default()
    };
    let mut free = Vec::new();
    generate(&model, &cfg, [request.clone()], |g| free.push(g)).unwrap();
    // Stop at the text of the third sampled token.
    let third = format!("<{}>", free[0].ids[2]);
    let first_at = free[0]
        .ids
        .iter()
        .position(|t| format!("<{t}>") == third)
        .unwrap();
    cfg.stop_strings = vec![third];
    let mut stopped = Vec::new();
    generate_with_decoder(&model, &cfg, Some(&decode), [request.clone()], |g| {
        stopped.push(g)
    })
    .unwrap();
    assert_eq!(stopped[0].finish, FinishReason::Stop);
    assert_eq!(stopped[0].ids, free[0].ids[..=first_at]);
    assert!(
        generate(&model, &cfg, [request], |_| {}).is_err(),
        "stop strings without a decoder"
    );
}

#[test]
fn behaviour_logprobs_sampled_with_top_p_match_the_trainers_recomputation() {
    let device = Device::flex();
    let policy = CausalLm::init(&tiny_config(64), 8, &device.clone().autodiff());
    let mut cfg = pool_config(1);
    cfg.generation.sampling.temperature = 0.7;
    cfg.generation.sampling.top_p = 0.7;
    let pool = spawn_pool(&policy.valid(), Arc::new(Sevens::new(10_000, None)), cfg).unwrap();
    let mut t_cfg = TrainerConfig {
        reward_weights: vec![1.0, 0.5],
        ..TrainerConfig::default()
    };
    t_cfg.loss.temperature = 0.7;
    let mut trainer = GrpoTrainer::new(policy, None, t_cfg).unwrap();
    let batch: Vec<_> = (0..2).map(|_| pool.groups.recv().unwrap()).collect();
    pool.shutdown().unwrap();
    // Same weights (version 0) on both sides: the trainer's full-distribution log-probs equal the
    // recorded ones, so the default sequence_mask correction keeps everything at ratio ≈ 1.
    let m = trainer.train_step(&batch).unwrap().into_metrics().remove(0);
    let diff = m.behaviour_logp_diff_max.unwrap();
    assert!(diff <= 1e-4, "max |log π_prox − log π_behav| = {diff:e}");
    assert_eq!(m.importance_sampling_masked_fraction, Some(0.0));
    for r in [
        m.importance_sampling_ratio_min,
        m.importance_sampling_ratio_max,
    ] {
        assert!((r.unwrap() - 1.0).abs() < 1e-3, "{m:?}");
    }
}

#[test]
fn an_async_run_with_in_flight_updates_learns_and_logs_is_metrics_every_step() {
    let device = Device::flex();
    let policy = CausalLm::init(&tiny_config(64), 9, &device.clone().autodiff());
    let mut cfg = pool_config(1);
    cfg.in_flight_weight_updates = true;
    cfg.channel_capacity = 1;
    cfg.generation.max_completion_length = 16;
    // Several end tokens make completions finish at different steps, so some are still decoding
    // when new weights arrive.
    cfg.generation.eos_token_ids = vec![0, 10, 20, 30, 40, 50];
    let pool = spawn_pool(&policy.valid(), Arc::new(Sevens::new(100_000, None)), cfg).unwrap();
    let t_cfg = TrainerConfig {
        learning_rate: 1e-2,
        reward_weights: vec![1.0, 0.5],
        ..TrainerConfig::default()
    };
    let mut trainer = GrpoTrainer::new(policy, None, t_cfg).unwrap();
    let mut feedback = feedback(&pool, &trainer);
    let mut metrics = Vec::new();
    let steps = 30;
    let run = trainer
        .run_from_channel(
            &pool.groups.clone(),
            Some(&mut feedback),
            &ChannelRun::new(2, 2, steps),
            |_, e| {
                if let RunEvent::Step { metrics: m, .. } = e {
                    metrics.push(m.clone());
                }
                std::ops::ControlFlow::Continue(())
            },
        )
        .unwrap();
    let groups = pool.groups.clone();
    let report = pool.shutdown().unwrap();
    let left: usize = groups.drain().map(|g| g.samples.len()).sum();

    assert_eq!(metrics.len(), steps);
    for m in &metrics {
        assert!(
            m.importance_sampling_ratio_mean.is_some()
                && m.importance_sampling_masked_fraction.is_some()
                && m.behaviour_logp_diff_mean.is_some(),
            "IS metrics missing at step {}",
            m.step
        );
        assert!(m.token_staleness_histogram.len() <= 3, "max_staleness 2");
    }
    // How many completions spanned versions depends on timing here (the deterministic check is
    // `an_in_flight_update_splits_a_completion_between_versions`).
    let mixed: usize = metrics.iter().map(|m| m.mixed_version_samples).sum();
    let mean = |ms: &[grail_trainer::StepMetrics]| {
        ms.iter().map(|m| m.reward_means[0]).sum::<f64>() / ms.len() as f64
    };
    let (first, last) = (mean(&metrics[..5]), mean(&metrics[steps - 5..]));
    let masked: f64 = metrics
        .iter()
        .filter_map(|m| m.importance_sampling_masked_fraction)
        .sum::<f64>()
        / steps as f64;
    eprintln!(
        "reward {first:.3} → {last:.3}; {mixed} mixed-version samples; mean masked fraction {masked:.3}; {run:?}"
    );
    assert!(
        last > first + 0.1,
        "reward did not rise: {first:.3} → {last:.3}"
    );
    // Nothing vanished.
    assert_accounted(&report, &run, left);
}

/// `Sevens` whose `decode` (called every decode step for stop strings) stops once, when the
/// completions are 3 tokens long, until the test releases it: a window to publish weights in.
struct Gated {
    inner: Sevens,
    armed: std::sync::atomic::AtomicBool,
    reached: flume::Sender<()>,
    release: flume::Receiver<()>,
}

impl Environment for Gated {
    fn prompt(&self, index: u64) -> grail_core::Result<Option<Prompt>> {
        self.inner.prompt(index)
    }
    fn rewards(&self) -> &[Reward] {
        self.inner.rewards()
    }
    fn decode(&self, ids: &[u32]) -> String {
        if ids.len() == 3 && self.armed.swap(false, Ordering::SeqCst) {
            self.reached.send(()).unwrap();
            self.release.recv().unwrap();
        }
        format!("{ids:?}")
    }
}

#[test]
fn an_in_flight_update_splits_a_completion_between_versions() {
    let device = Device::flex();
    let old = CausalLm::init(&tiny_config(64), 10, &device);
    let new = CausalLm::init(&tiny_config(64), 11, &device);
    let (reached_tx, reached) = flume::unbounded();
    let (release, release_rx) = flume::unbounded();
    let env = Gated {
        inner: Sevens::new(1, None),
        armed: std::sync::atomic::AtomicBool::new(true),
        reached: reached_tx,
        release: release_rx,
    };
    let mut cfg = pool_config(1);
    cfg.in_flight_weight_updates = true;
    cfg.prompts_per_batch = 1;
    cfg.generation.max_completion_length = 24;
    cfg.generation.stop_strings = vec!["never printed".into()];
    cfg.generation.sketch_seed = Some([5; 32]);
    let pool = spawn_pool(&old, Arc::new(env), cfg).unwrap();
    // Mid-completion (3 tokens in), version 1 arrives.
    reached.recv().unwrap();
    let mut publisher = WeightPublisher::new(SyncMode::Full, WireDtype::F32, &old, 0);
    pool.feedback
        .send(publisher.publish(1, &new).into())
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    release.send(()).unwrap();
    let group = pool.groups.recv().unwrap();
    let report = pool.shutdown().unwrap();
    assert_eq!(
        report.generated,
        report.sent + report.failed + report.unsent_at_shutdown
    );
    assert_eq!(report.sent, 4);

    for s in &group.samples {
        assert!(s.spans_versions(), "{:?}", s.token_versions);
        assert_eq!(
            s.policy_version, 0,
            "a sample is as old as its oldest token"
        );
        // The commitments travel with the sample (generation.rs checks what they commit to).
        assert_eq!(s.sketches.len(), s.completion_ids.len());
        let k = s.token_versions.iter().position(|&v| v == 1).unwrap();
        assert!(k >= 3 && s.token_versions[k..].iter().all(|&v| v == 1));
        // Tokens before the switch carry the old weights' log-probs; after it, the log-probs of a
        // fresh prefill of prompt + tokens so far with the new weights (the cache was recomputed).
        let ids = &s.completion_ids;
        let before = old
            .completion_logprobs(&group.prompt_ids, &ids[..k], 1.0)
            .unwrap();
        let prefix: Vec<u32> = group.prompt_ids.iter().chain(&ids[..k]).copied().collect();
        let after = new.completion_logprobs(&prefix, &ids[k..], 1.0).unwrap();
        let max = before
            .iter()
            .chain(&after)
            .zip(&s.behaviour_logps)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max <= 1e-4, "max |Δ| {max:e}");
    }
}

/// Trains from `pool` as `run` says, with feedback, until it ends.
fn train_from(
    pool: &RolloutPool,
    trainer: &mut GrpoTrainer,
    run: &ChannelRun,
) -> Result<RunStats, grail_trainer::TrainerError> {
    let mut feedback = feedback(pool, trainer);
    trainer.run_from_channel(&pool.groups.clone(), Some(&mut feedback), run, |_, _| {
        std::ops::ControlFlow::Continue(())
    })
}

/// Runs `f` on a thread and fails the test if it has not returned within `limit`: a hang becomes
/// a failure instead of a test that never ends.
fn within<T: Send + 'static>(
    limit: std::time::Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = flume::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("still running after {limit:?}: the run hung"))
}

/// Liveness: a pool bounded by `max_ahead`, whose every group has zero reward spread (so no batch
/// trains and the weights never change), keeps generating because the trainer reports what it
/// consumed; the watchdog then ends the run with the reason instead of a silent hang.
#[test]
fn zero_spread_batches_neither_stall_the_pool_nor_hang_the_run() {
    let (err, generated) = within(std::time::Duration::from_secs(120), || {
        let device = Device::flex();
        let policy = CausalLm::init(&tiny_config(64), 12, &device.clone().autodiff());
        let mut env = Sevens::new(10_000, None);
        env.rewards = vec![
            Reward::new("flat", 1.0, |_p: &Prompt, _c: &Completion| 1.0),
            Reward::new("flat_too", 0.5, |_p: &Prompt, _c: &Completion| 0.0),
        ];
        let cfg = PoolConfig {
            max_ahead: Some(0),
            groups_per_step: 2,
            ..pool_config(1)
        };
        let pool = spawn_pool(&policy.valid(), Arc::new(env), cfg).unwrap();
        let t_cfg = TrainerConfig {
            reward_weights: vec![1.0, 0.5],
            filter_zero_std_groups: true,
            ..TrainerConfig::default()
        };
        let mut trainer = GrpoTrainer::new(policy, None, t_cfg).unwrap();
        let run = ChannelRun {
            stall_timeout: Some(std::time::Duration::from_secs(2)),
            ..ChannelRun::new(2, 1, 5)
        };
        let err = train_from(&pool, &mut trainer, &run).unwrap_err();
        let generated = pool.counters().generated.load(Ordering::SeqCst);
        pool.shutdown().unwrap();
        (err.to_string(), generated)
    });
    assert!(
        err.contains("zero reward spread") && err.contains("consecutive batches"),
        "{err}"
    );
    // Far more than the one batch (2 groups × 4 samples) the old bound allowed at version 0.
    assert!(generated > 8 * 4, "the pool stalled at {generated} samples");
}

/// Liveness: groups whose rewards fail (here every third prompt) count as settled, so a pool
/// bounded by `max_ahead` keeps the trainer fed and the accounting identity holds.
#[test]
fn failed_reward_groups_do_not_stall_a_bounded_pool() {
    let (run, report, left, steps) = within(std::time::Duration::from_secs(120), || {
        let device = Device::flex();
        let policy = CausalLm::init(&tiny_config(64), 13, &device.clone().autodiff());
        let cfg = PoolConfig {
            max_ahead: Some(0),
            groups_per_step: 2,
            ..pool_config(1)
        };
        let pool =
            spawn_pool(&policy.valid(), Arc::new(Sevens::new(10_000, Some(3))), cfg).unwrap();
        let mut trainer = trainer(policy);
        let run = train_from(&pool, &mut trainer, &ChannelRun::new(2, 1, 6)).unwrap();
        let groups = pool.groups.clone();
        let report = pool.shutdown().unwrap();
        let left: usize = groups.drain().map(|g| g.samples.len()).sum();
        (run, report, left, trainer.step())
    });
    assert_eq!(steps, 6);
    assert!(report.failed_groups > 0, "{report:?}");
    assert_accounted(&report, &run, left);
}

/// `Sevens` whose prompt `at` cannot be produced (as when a tokenizer fails on its text).
struct FailsAt {
    inner: Sevens,
    at: u64,
}

impl Environment for FailsAt {
    fn prompt(&self, index: u64) -> grail_core::Result<Option<Prompt>> {
        if index == self.at {
            return Err(grail_core::GrailError::Tokenizer(
                "encode: no token for 'ß'".into(),
            ));
        }
        self.inner.prompt(index)
    }
    fn rewards(&self) -> &[Reward] {
        self.inner.rewards()
    }
    fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids)
    }
}

/// A prompt the environment cannot produce stops every worker, so the trainer's channel closes,
/// and the error names the prompt and the cause (it used to read as "no more prompts").
#[test]
fn an_environment_error_stops_the_run_naming_the_prompt() {
    let err = within(std::time::Duration::from_secs(120), || {
        let device = Device::flex();
        let policy = CausalLm::init(&tiny_config(64), 14, &device.clone().autodiff());
        let env = FailsAt {
            inner: Sevens::new(10_000, None),
            at: 5,
        };
        let pool = spawn_pool(&policy.valid(), Arc::new(env), pool_config(2)).unwrap();
        let mut trainer = trainer(policy);
        let run = train_from(&pool, &mut trainer, &ChannelRun::new(2, 4, 1_000)).unwrap();
        assert!(trainer.step() < 1_000, "the run went on: {run:?}");
        pool.shutdown().unwrap_err().to_string()
    });
    assert!(
        err.contains("prompt 5") && err.contains("no token for"),
        "{err}"
    );
}

#[test]
fn long_prompts_are_cut_from_the_left_or_stop_the_run_by_name() {
    let device = Device::flex();
    let model = CausalLm::init(&tiny_config(64), 15, &device);
    let cfg = PoolConfig {
        max_prompt_length: Some(2),
        ..pool_config(1)
    };
    let pool = spawn_pool(&model, Arc::new(Sevens::new(4, None)), cfg.clone()).unwrap();
    let group = pool.groups.recv().unwrap();
    assert_eq!(
        *group.prompt_ids,
        vec![1, 2],
        "the last max_prompt_length tokens"
    );
    assert!(pool.counters().truncated_prompts.load(Ordering::SeqCst) >= 1);
    pool.shutdown().unwrap();

    let strict = PoolConfig {
        prompt_truncation: grail_rollout::PromptTruncation::Error,
        ..cfg
    };
    let pool = spawn_pool(&model, Arc::new(Sevens::new(4, None)), strict).unwrap();
    assert!(
        pool.groups.recv().is_err(),
        "no group from a prompt over the limit"
    );
    let err = pool.shutdown().unwrap_err().to_string();
    assert!(
        err.contains("prompt 0: 3 tokens") && err.contains("max_prompt_length = 2"),
        "{err}"
    );

    // Prompt + completion beyond the model's context (64 positions) is an error too.
    let long = PoolConfig {
        generation: GenerationConfig {
            max_completion_length: 62,
            ..pool_config(1).generation
        },
        ..pool_config(1)
    };
    let pool = spawn_pool(&model, Arc::new(Sevens::new(4, None)), long).unwrap();
    assert!(pool.groups.recv().is_err());
    let err = pool.shutdown().unwrap_err().to_string();
    assert!(err.contains("max_position_embeddings 64"), "{err}");
}
