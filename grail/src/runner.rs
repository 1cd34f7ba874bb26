//! The RL job: tokenizer → model → SFT warm-up → baseline eval → async GRPO (pool + trainer over
//! channels) → final eval → checkpoint, metrics, plot, summary.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::Device;
use grail_core::checkpoint::load_model;
use grail_core::device::parse_device;
use grail_core::model::{CausalLm, ModelConfig};
use grail_core::tokenizer::Tokenizer;
use grail_protocol::WireDtype;
use grail_rollout::generate::{FinishReason, GenerationConfig, GenerationRequest, generate};
use grail_rollout::sampling::SamplingConfig;
use grail_rollout::{Completion, Environment, PoolConfig, Prompt, PromptLimits, Split, spawn_pool};
use grail_trainer::channel::{ChannelRun, RunEvent, RunStats};
use grail_trainer::config::TrainerConfig;
use grail_trainer::flops::measure_peak_flops;
use grail_trainer::sft::SftExample;
use grail_trainer::trainer::GrpoTrainer;
use grail_trainer::{PoolFeedback, TrainerError, WeightPublisher};
use serde_json::json;

use crate::checkpoint::{self, Accounting, RunState};
use crate::config::{EnvSection, GrpoConfig};
use crate::output::{self, MetricsLog};
use crate::progress::Progress;
use crate::task::Task;
use crate::tasks::{Arithmetic, Countdown, arithmetic_task, countdown_task, open_jsonl};

/// The dtype weights travel to the rollout workers in.
const WIRE: WireDtype = WireDtype::Bf16;

/// End-of-sequence marker of trained tokenizers.
pub const EOS: &str = "<|endoftext|>";

/// What a run produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSummary {
    /// Held-out accuracy after the SFT warm-up, before GRPO.
    pub baseline_accuracy: f64,
    /// Held-out accuracy after GRPO.
    pub final_accuracy: f64,
    /// GRPO optimizer steps taken.
    pub steps: usize,
    /// Wall time of this process's part of the run.
    pub seconds: f64,
    /// Wall time of the SFT warm-up.
    pub sft_seconds: f64,
    /// Wall time of GRPO, over every attempt of a resumed run.
    pub grpo_seconds: f64,
    /// The seed.
    pub seed: u64,
    /// The checkpoint this run resumed from, if any.
    pub resumed_from: Option<PathBuf>,
    /// The final checkpoint (`checkpoint-<step>`: HF layout + tokenizer + train state).
    pub checkpoint: PathBuf,
    /// Per-step metrics (JSONL).
    pub metrics: PathBuf,
    /// Reward and accuracy plot (PNG), when a font was available to draw it.
    pub plot: Option<PathBuf>,
    /// Steps during which the pool generated samples while the trainer trained (overlap).
    pub overlapped_steps: usize,
    /// Pool and trainer sample accounting ([`Accounting`] with `identity_holds`), over every
    /// attempt of a resumed run.
    pub accounting: serde_json::Value,
}

/// The prompt limits of a run on `model`.
fn prompt_limits(cfg: &GrpoConfig, model: &CausalLm) -> PromptLimits {
    PromptLimits {
        max_prompt_length: Some(cfg.grpo.max_prompt_length),
        truncation: cfg.grpo.prompt_truncation,
        max_completion_length: cfg.grpo.max_completion_length,
        max_positions: model.config.max_position_embeddings,
    }
}

/// Prompt `index` of `env` within `limits`; `None` past the end; an error naming the prompt.
fn prompt_at(env: &dyn Environment, index: u64, limits: &PromptLimits) -> Result<Option<Prompt>> {
    let prompt = env
        .prompt(index)
        .with_context(|| format!("the environment failed on prompt {index}"))?;
    Ok(match prompt {
        Some(p) => Some(limits.apply(p)?.0),
        None => None,
    })
}

/// Texts a BPE for this task is trained on.
fn tokenizer_corpus(cfg: &GrpoConfig) -> Vec<String> {
    let mut out = Vec::new();
    match &cfg.env {
        EnvSection::Countdown(c) => {
            for i in 0..3000 {
                let t = countdown_task(c, cfg.seed, Split::Train, i);
                out.push(format!("{} {}", t.prompt(), t.solution));
            }
        }
        EnvSection::Arithmetic(a) => {
            for i in 0..3000 {
                let (q, ans) = arithmetic_task(a, cfg.seed, Split::Train, i);
                out.push(format!("{q} #### {ans}"));
            }
        }
        EnvSection::Jsonl { path } => {
            if let Ok(text) = std::fs::read_to_string(path) {
                out.extend(text.lines().map(str::to_string));
            }
        }
    }
    out
}

fn make_env(cfg: &GrpoConfig, split: Split, tok: Arc<Tokenizer>) -> Result<Arc<dyn Environment>> {
    Ok(match &cfg.env {
        EnvSection::Countdown(c) => Arc::new(Countdown::new(c.clone(), cfg.seed, split, tok)?),
        EnvSection::Arithmetic(a) => Arc::new(Arithmetic::new(a.clone(), cfg.seed, split, tok)?),
        EnvSection::Jsonl { path } => Arc::new(open_jsonl(path, split, tok)?),
    })
}

/// Held-out accuracy: greedy completions of the first `n` held-out prompts (within `limits`),
/// scored by the environment's `correct` reward (or its last reward).
pub fn evaluate(
    model: &CausalLm,
    env: &dyn Environment,
    n: usize,
    generation: &GenerationConfig,
    limits: &PromptLimits,
) -> Result<f64> {
    let mut prompts = Vec::with_capacity(n);
    for i in 0..n as u64 {
        match prompt_at(env, i, limits)? {
            Some(p) => prompts.push(p),
            None => break,
        }
    }
    if prompts.is_empty() {
        bail!("the held-out split has no prompts");
    }
    let correct_idx = env
        .rewards()
        .iter()
        .position(|r| r.name == "correct")
        .unwrap_or(env.rewards().len() - 1);
    let cfg = GenerationConfig {
        sampling: SamplingConfig {
            temperature: 0.0,
            ..SamplingConfig::default()
        },
        ..generation.clone()
    };
    let requests = prompts.iter().map(|p| GenerationRequest {
        prompt_id: p.id,
        sample_index: 0,
        prompt: p.ids.clone(),
    });
    let mut score = 0.0;
    generate(model, &cfg, requests, |g| {
        let p = &prompts[g.request.prompt_id as usize];
        let c = Completion {
            text: env.decode(&g.ids),
            finished: g.finish != FinishReason::Length,
            ids: g.ids,
        };
        score += (env.rewards()[correct_idx].func)(p, &c) as f64;
    })?;
    Ok(score / prompts.len() as f64)
}

/// The tokenizer of a new run: the one named in the config, the model's own, or (for a model
/// built from scratch) a byte-level BPE trained now on the task's text.
fn new_tokenizer(cfg: &GrpoConfig, source: &Source) -> Result<Tokenizer> {
    match (&cfg.tokenizer.path, &cfg.model.path) {
        (Some(dir), _) => return Ok(Tokenizer::from_dir(dir)?),
        (None, Some(model)) if model.join("tokenizer.json").is_file() => {
            return Ok(Tokenizer::from_dir(model)?);
        }
        // A pretrained model speaks its own vocabulary: a BPE trained now would be nonsense to it.
        (None, Some(model)) => bail!(
            "config key `model.path` = {}: the model has no tokenizer.json (set `tokenizer.path` \
             to the directory of its tokenizer, or pass one with Grpo::tokenizer)",
            model.display()
        ),
        (None, None) => {}
    }
    let corpus: Vec<String> = match source {
        Source::Config => tokenizer_corpus(cfg),
        Source::Task(task) => task.texts().collect(),
        Source::Environments { .. } => bail!(
            "a model built from scratch with environments of your own needs a tokenizer: pass \
             one with Grpo::tokenizer (or set `tokenizer.path`)"
        ),
    };
    Ok(Tokenizer::train_bpe(
        corpus.iter().map(String::as_str),
        cfg.tokenizer.vocab_size,
        &[EOS],
    )?)
}

/// The trainer of a new run: the policy loaded from `[model] path` or built from scratch, on an
/// autodiff device, with a frozen copy as reference when the loss has a KL term.
fn new_trainer(
    cfg: &GrpoConfig,
    tokenizer: &Tokenizer,
    device: &Device,
    tcfg: TrainerConfig,
    peak: f64,
) -> Result<GrpoTrainer> {
    let ad = device.clone().autodiff();
    let policy = match &cfg.model.path {
        Some(path) => load_model(path, &ad)?,
        None => {
            let m = &cfg.model;
            let mc = ModelConfig::builder()
                .vocab_size(tokenizer.vocab_size())
                .hidden_size(m.hidden_size)
                .intermediate_size(m.intermediate_size)
                .num_hidden_layers(m.num_hidden_layers)
                .num_attention_heads(m.num_attention_heads)
                .num_key_value_heads(m.num_key_value_heads)
                .max_position_embeddings(512)
                .tie_word_embeddings(true)
                .eos_token_ids(tokenizer.eos_token_ids.clone())
                .build()?;
            CausalLm::init(&mc, cfg.seed, &ad)
        }
    };
    // Checked before anything runs: a token id past the embedding would fail deep in a kernel.
    if policy.vocab_size() < tokenizer.vocab_size() {
        bail!(
            "the model's vocabulary ({}) is smaller than the tokenizer's ({})",
            policy.vocab_size(),
            tokenizer.vocab_size()
        );
    }
    let reference = (cfg.grpo.beta != 0.0).then(|| policy.valid());
    Ok(GrpoTrainer::new(policy, reference, tcfg)?.with_peak_flops(peak))
}

/// The SFT warm-up on the task's reference completions; returns its wall time. A signal stops
/// the run here, before GRPO starts.
fn sft_warm_up(
    cfg: &GrpoConfig,
    trainer: &mut GrpoTrainer,
    env: &dyn Environment,
    tokenizer: &Tokenizer,
    limits: &PromptLimits,
    stop: &AtomicBool,
) -> Result<f64> {
    let start = Instant::now();
    let eos = tokenizer.eos_token_ids[0];
    let progress = Progress::new(cfg.sft.steps as u64, "sft");
    let mut next = 0u64;
    for step in 0..cfg.sft.steps {
        if stop.load(Ordering::SeqCst) {
            bail!(
                "stopped by a signal during the SFT warm-up (after {step} of {} steps), before GRPO started; nothing was saved",
                cfg.sft.steps
            );
        }
        let mut batch = Vec::with_capacity(cfg.sft.batch_size);
        while batch.len() < cfg.sft.batch_size {
            let Some(p) = prompt_at(env, next, limits)? else {
                if next == 0 {
                    bail!("the environment has no training prompts");
                }
                next = 0;
                continue;
            };
            let Some(text) = env.reference_completion(&p) else {
                bail!(
                    "sft.steps = {} but the task has no reference completion for prompt {next} \
                     to imitate: set sft.steps = 0",
                    cfg.sft.steps
                );
            };
            next += 1;
            let mut completion = tokenizer.encode(&text, false)?;
            completion.push(eos);
            batch.push(SftExample {
                prompt: p.ids.to_vec(),
                completion,
            });
        }
        let m = trainer.sft_step(&batch, cfg.sft.learning_rate)?;
        progress.step(format!("loss {:.3}", m.loss));
    }
    progress.finish();
    Ok(start.elapsed().as_secs_f64())
}

/// Generation settings of the run (the pool's sampling; evaluation makes them greedy).
fn generation_config(cfg: &GrpoConfig, eos: &[u32]) -> GenerationConfig {
    GenerationConfig {
        sampling: SamplingConfig {
            temperature: cfg.grpo.temperature,
            top_p: cfg.grpo.top_p,
            top_k: cfg.grpo.top_k,
            min_p: cfg.grpo.min_p,
            repetition_penalty: 1.0,
        },
        max_completion_length: cfg.grpo.max_completion_length,
        max_batch: 64,
        eos_token_ids: eos.to_vec(),
        stop_sequences: Vec::new(),
        stop_strings: Vec::new(),
        seed: cfg.seed,
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

/// Where a run's prompts and rewards come from.
enum Source {
    /// The config's `[env]` section.
    Config,
    /// Rows and reward closures.
    Task(Task),
    /// Environments of the caller's own.
    Environments {
        train: Arc<dyn Environment>,
        eval: Arc<dyn Environment>,
    },
}

/// A GRPO run, put together in one chain and started with [`Grpo::run`]:
///
/// ```no_run
/// use grail::prelude::*;
///
/// # fn main() -> anyhow::Result<()> {
/// let task = Task::from_rows([("2 + 2 =", "4"), ("3 + 5 =", "8")])
///     .reward("correct", 1.0, |p, c| (c.text.trim() == p.answer) as u8 as f32);
/// let summary = Grpo::new(GrpoConfig::default())
///     .model("path/to/hf-model")?
///     .task(task)
///     .run()?;
/// # Ok(())
/// # }
/// ```
///
/// Everything the loop needs is derived from the one config: the reward weights from the task,
/// the loss temperature from the sampling temperature, groups per step for the pool and the
/// trainer, the pool's starting weights and version from the trainer's.
pub struct Grpo {
    config: GrpoConfig,
    tokenizer: Option<Tokenizer>,
    source: Source,
    stop: Option<Arc<AtomicBool>>,
}

impl Grpo {
    /// A run of `config` (its `[env]` is the task unless [`task`](Self::task) or
    /// [`environments`](Self::environments) says otherwise).
    pub fn new(config: GrpoConfig) -> Self {
        Self {
            config,
            tokenizer: None,
            source: Source::Config,
            stop: None,
        }
    }

    /// Trains the Hugging Face model in `dir` (config.json + safetensors, and its tokenizer.json
    /// unless [`tokenizer`](Self::tokenizer) gives one). Sets `model.path`.
    pub fn model(mut self, dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        if !dir.join("config.json").is_file() {
            bail!(
                "model directory {}: no config.json (a Hugging Face model directory is expected)",
                dir.display()
            );
        }
        self.config.model.path = Some(dir);
        Ok(self)
    }

    /// Uses `tokenizer` instead of the model's own (or of one trained at start).
    pub fn tokenizer(mut self, tokenizer: Tokenizer) -> Self {
        self.tokenizer = Some(tokenizer);
        self
    }

    /// Trains on `task` (rows and reward closures) instead of the config's `[env]`.
    pub fn task(mut self, task: Task) -> Self {
        self.source = Source::Task(task);
        self
    }

    /// Trains on environments of your own (anything richer than rows and closures):
    /// `train` feeds the rollout pool, `eval` the held-out accuracy (its `correct` reward, or
    /// its last one).
    pub fn environments(mut self, train: Arc<dyn Environment>, eval: Arc<dyn Environment>) -> Self {
        self.source = Source::Environments { train, eval };
        self
    }

    /// Stops the run after the current step once `flag` is set. Default: SIGINT and SIGTERM
    /// ([`stop_on_signals`](crate::signals::stop_on_signals)).
    pub fn stop_when(mut self, flag: Arc<AtomicBool>) -> Self {
        self.stop = Some(flag);
        self
    }

    /// Runs GRPO, from scratch or from a checkpoint: tokenizer and model, SFT warm-up, baseline
    /// evaluation, then the rollout pool and the trainer at the same time, checkpoints every
    /// `save_steps`, and at the end (or when stopped) a final checkpoint, the final evaluation,
    /// the plot and the summary, whose sample accounting is checked.
    pub fn run(self) -> Result<RunSummary> {
        let stop = self
            .stop
            .clone()
            .unwrap_or_else(crate::signals::stop_on_signals);
        let summary = run_grpo(&self, stop)?;
        if summary.accounting["identity_holds"] != true {
            bail!(
                "the sample accounting does not add up: {}",
                summary.accounting
            );
        }
        Ok(summary)
    }
}

/// Runs `cfg` with its own `[env]`, stopping when `stop` is set: `Grpo::new(cfg).stop_when(stop).run()`.
pub fn run(cfg: &GrpoConfig, stop: Arc<AtomicBool>) -> Result<RunSummary> {
    Grpo::new(cfg.clone()).stop_when(stop).run()
}

fn run_grpo(grpo: &Grpo, stop: Arc<AtomicBool>) -> Result<RunSummary> {
    let start = Instant::now();
    let cfg = &grpo.config;
    cfg.validate()?;
    let device = parse_device(&cfg.device)?;
    let resume = output::claim(cfg)?;
    let tokenizer = Arc::new(match (&resume, &grpo.tokenizer) {
        (Some(dir), _) => Tokenizer::from_dir(dir)?,
        (None, Some(given)) => given.clone(),
        (None, None) => new_tokenizer(cfg, &grpo.source)?,
    });
    if tokenizer.eos_token_ids.is_empty() {
        bail!("the tokenizer has no end-of-sequence token");
    }
    let (train_env, eval_env) = match &grpo.source {
        Source::Config => (
            make_env(cfg, Split::Train, tokenizer.clone())?,
            make_env(cfg, Split::Eval, tokenizer.clone())?,
        ),
        Source::Task(task) => (
            task.environment(Split::Train, tokenizer.clone())?,
            task.environment(Split::Eval, tokenizer.clone())?,
        ),
        Source::Environments { train, eval } => (train.clone(), eval.clone()),
    };
    let generation = generation_config(cfg, &tokenizer.eos_token_ids);
    let held_out = |model: &CausalLm, limits: &PromptLimits| {
        evaluate(
            &model.valid(),
            eval_env.as_ref(),
            cfg.eval.prompts,
            &generation,
            limits,
        )
    };
    let mut tcfg = cfg.trainer_config();
    tcfg.reward_weights = train_env.rewards().iter().map(|r| r.weight).collect();
    let peak = measure_peak_flops(&device, 1024);

    let (mut trainer, state) = match &resume {
        Some(dir) => {
            let state = checkpoint::load_run_state(dir)?;
            let trainer = GrpoTrainer::load_state(dir, &device, Some(tcfg))
                .with_context(|| format!("resuming from {}", dir.display()))?
                .with_peak_flops(peak);
            tracing::info!(
                checkpoint = %dir.display(),
                step = trainer.step(),
                prompt_cursor = state.prompt_cursor,
                "resuming"
            );
            (trainer, state)
        }
        None => {
            let mut trainer = new_trainer(cfg, &tokenizer, &device, tcfg, peak)?;
            tracing::info!(
                params = trainer.model().config.num_parameters(),
                vocab = tokenizer.vocab_size(),
                peak_gflops = peak / 1e9,
                "model ready"
            );
            let limits = prompt_limits(cfg, trainer.model());
            let sft_seconds = sft_warm_up(
                cfg,
                &mut trainer,
                train_env.as_ref(),
                &tokenizer,
                &limits,
                &stop,
            )?;
            let baseline = held_out(trainer.model(), &limits)?;
            tracing::info!(baseline_accuracy = baseline, "held-out accuracy after SFT");
            let state = RunState {
                step: 0,
                prompt_cursor: 0,
                baseline_accuracy: baseline,
                sft_seconds,
                grpo_seconds: 0.0,
                overlapped_steps: 0,
                accounting: Accounting::default(),
            };
            (trainer, state)
        }
    };

    let limits = prompt_limits(cfg, trainer.model());

    // Async GRPO: the pool generates while the trainer trains; they meet only through channels.
    let segment_start = Instant::now();
    let g = &cfg.grpo;
    let (mut metrics_log, kept) =
        MetricsLog::open(&cfg.output_dir, resume.as_ref().map(|_| state.step))?;
    let mut curve: Vec<(usize, f64, Option<f64>)> = kept
        .iter()
        .map(|l| {
            (
                l["step"].as_u64().unwrap_or(0) as usize,
                l["reward_mean"].as_f64().unwrap_or(0.0),
                l["eval_accuracy"].as_f64(),
            )
        })
        .collect();
    let pool = spawn_pool(
        &trainer.model().valid(),
        train_env.clone(),
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
            start_version: trainer.version(),
            first_prompt: state.prompt_cursor,
            weight_wire: WIRE,
            in_flight_weight_updates: g.in_flight_weight_updates,
            max_prompt_length: limits.max_prompt_length,
            prompt_truncation: limits.truncation,
        },
    )?;
    let mut feedback = PoolFeedback::new(
        pool.feedback.clone(),
        WeightPublisher::new(g.weight_sync, WIRE, trainer.model(), trainer.version()),
    );
    let channel_run = ChannelRun {
        groups_per_step: g.prompts_per_step,
        max_staleness: g.max_staleness,
        max_steps: g.max_steps.saturating_sub(trainer.step()),
        stall_timeout: (g.stall_timeout > 0).then(|| Duration::from_secs(g.stall_timeout)),
    };
    let progress = Progress::new(g.max_steps as u64, "grpo");
    progress.set_position(trainer.step() as u64);
    let mut overlapped = 0usize;
    let mut last_generated = pool.counters().generated.load(Ordering::SeqCst);
    let mut last_tokens = pool.counters().tokens.load(Ordering::SeqCst);
    let mut last_time = Instant::now();
    let mut next_save = next_save_after(trainer.step(), cfg.save_steps);
    let mut write_error: Option<anyhow::Error> = None;
    let go_on = || {
        if stop.load(Ordering::SeqCst) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let result = trainer.run_from_channel(
        &pool.groups.clone(),
        Some(&mut feedback),
        &channel_run,
        |t, event| {
            let (m, stats) = match event {
                RunEvent::Step { metrics, stats } => (metrics, stats),
                RunEvent::Waiting { since_step } => {
                    progress.update(format!(
                        "waiting for rollouts ({:.0} s since the last step; {} groups failed)",
                        since_step.as_secs_f64(),
                        pool.counters().failed_groups.load(Ordering::SeqCst)
                    ));
                    return go_on();
                }
            };
            let counters = pool.counters();
            let generated = counters.generated.load(Ordering::SeqCst);
            let during = generated - last_generated;
            last_generated = generated;
            if during > 0 {
                overlapped += 1;
            }
            let tokens = counters.tokens.load(Ordering::SeqCst);
            let rollout_tokens_per_s =
                (tokens - last_tokens) as f64 / last_time.elapsed().as_secs_f64().max(1e-9);
            last_tokens = tokens;
            last_time = Instant::now();
            let acc = (cfg.eval.every > 0 && m.step % cfg.eval.every == 0)
                .then(|| held_out(t.model(), &limits).ok())
                .flatten();
            let mut line = serde_json::to_value(m).expect("metrics serialise");
            for (reward, v) in train_env.rewards().iter().zip(&m.reward_means) {
                line[format!("reward/{}", reward.name)] = json!(v);
            }
            line["eval_accuracy"] = json!(acc);
            line["pool_generated_during_step"] = json!(during);
            line["rollout_tokens_per_s"] = json!(rollout_tokens_per_s);
            line["pool_failed"] = json!(counters.failed.load(Ordering::SeqCst));
            line["elapsed_s"] = json!(state.grpo_seconds + segment_start.elapsed().as_secs_f64());
            if let Err(e) = metrics_log.append(&line) {
                write_error = Some(e);
                return ControlFlow::Break(());
            }
            curve.push((m.step, m.reward_mean, acc));
            progress.step(format!(
                "reward {:.3} acc {} is-masked {}",
                m.reward_mean,
                acc.map_or("-".into(), |a| format!("{a:.2}")),
                m.importance_sampling_masked_fraction
                    .map_or("-".into(), |f| format!("{:.1}%", 100.0 * f))
            ));
            // A batch of μ iterations reports μ steps; the trainer is at the last of them.
            if m.step == t.step() && t.step() >= next_save {
                next_save = next_save_after(t.step(), cfg.save_steps);
                let snapshot = RunState {
                    step: t.step(),
                    prompt_cursor: state.prompt_cursor
                        + (stats.groups_settled + counters.failed_groups.load(Ordering::SeqCst))
                            as u64,
                    grpo_seconds: state.grpo_seconds + segment_start.elapsed().as_secs_f64(),
                    overlapped_steps: state.overlapped_steps + overlapped,
                    accounting: state
                        .accounting
                        .plus(&settled(stats, counters.failed.load(Ordering::SeqCst))),
                    ..state.clone()
                };
                if let Err(e) = checkpoint::save(
                    &cfg.output_dir,
                    t,
                    &tokenizer,
                    &snapshot,
                    cfg.save_total_limit,
                ) {
                    write_error = Some(e);
                    return ControlFlow::Break(());
                }
            }
            go_on()
        },
    );
    progress.finish();
    let groups = pool.groups.clone();
    let failed_groups = pool.counters().failed_groups.load(Ordering::SeqCst);
    let report = pool.shutdown();
    let run = match result {
        Ok(run) => run,
        Err(e @ TrainerError::Stalled(_)) => {
            return Err(anyhow::Error::new(e).context(format!(
                "GRPO stopped at step {} ({failed_groups} groups failed in the reward functions)",
                trainer.step()
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let report = report?;
    if let Some(e) = write_error {
        return Err(e);
    }
    let segment = Accounting {
        generated: report.generated,
        sent: report.sent,
        failed: report.failed,
        unsent_at_shutdown: report.unsent_at_shutdown,
        received: run.received,
        trained: run.trained,
        dropped_stale: run.dropped_stale,
        dropped_filtered: run.dropped_filtered,
        unused_at_close: run.unused_at_close,
        left_in_channel: groups.drain().map(|g| g.samples.len()).sum(),
    };
    let grpo_seconds = state.grpo_seconds + segment_start.elapsed().as_secs_f64();
    let final_state = RunState {
        step: trainer.step(),
        prompt_cursor: state.prompt_cursor + (run.groups_settled + report.failed_groups) as u64,
        grpo_seconds,
        overlapped_steps: state.overlapped_steps + overlapped,
        accounting: state.accounting.plus(&segment),
        ..state.clone()
    };
    // The final checkpoint comes before the final evaluation: a second signal during the
    // evaluation loses nothing.
    let checkpoint = checkpoint::save(
        &cfg.output_dir,
        &trainer,
        &tokenizer,
        &final_state,
        cfg.save_total_limit,
    )?;
    let final_acc = held_out(trainer.model(), &limits)?;
    let plot = crate::plot::plot_curves(
        &cfg.output_dir.join("reward.png"),
        &curve,
        state.baseline_accuracy,
        final_acc,
    )
    .map_err(|e| tracing::warn!("no plot: {e}"))
    .ok();
    Ok(RunSummary {
        baseline_accuracy: state.baseline_accuracy,
        final_accuracy: final_acc,
        steps: trainer.step(),
        seconds: start.elapsed().as_secs_f64(),
        sft_seconds: state.sft_seconds,
        grpo_seconds,
        seed: cfg.seed,
        resumed_from: resume,
        checkpoint,
        metrics: metrics_log.path().to_path_buf(),
        plot,
        overlapped_steps: final_state.overlapped_steps,
        accounting: final_state.accounting.to_json(),
    })
}

/// Prints the end-of-run table (stderr) and the summary JSON line (stdout, last line).
pub fn report(summary: &RunSummary) {
    eprintln!();
    eprintln!(
        "  held-out accuracy after SFT  {:>6.1}%",
        summary.baseline_accuracy * 100.0
    );
    eprintln!(
        "  held-out accuracy after GRPO {:>6.1}%",
        summary.final_accuracy * 100.0
    );
    eprintln!(
        "  GRPO steps {:>5}   time {:.0}s (SFT {:.0}s, GRPO {:.0}s)",
        summary.steps, summary.seconds, summary.sft_seconds, summary.grpo_seconds
    );
    eprintln!("  checkpoint {}", summary.checkpoint.display());
    eprintln!("  metrics    {}", summary.metrics.display());
    if let Some(p) = &summary.plot {
        eprintln!("  plot       {}", p.display());
    }
    println!(
        "{}",
        serde_json::to_string(summary).expect("summary serialises")
    );
}

/// Loads a model saved by a run (for checks and tests).
pub fn load_checkpoint(dir: &std::path::Path) -> Result<CausalLm> {
    Ok(load_model(dir, &burn::tensor::Device::flex())?)
}
