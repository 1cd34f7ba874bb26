//! The RL job: tokenizer → model → SFT warm-up → baseline eval → async GRPO (pool + trainer over
//! channels) → final checkpoint → final eval → plot, summary. [`Grpo`] puts a run together; the
//! phases live in their own modules (`setup`, `warm_up`, `async_grpo`, `evaluate`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use grail_core::checkpoint::load_model;
use grail_core::device::parse_device;
use grail_core::model::CausalLm;
use grail_core::tokenizer::Tokenizer;
use grail_rollout::Environment;
use grail_trainer::GrpoTrainer;
use grail_trainer::flops::measure_peak_flops;

use crate::async_grpo::{self, Phase};
use crate::checkpoint::{self, Accounting, RunState};
use crate::config::{GrpoConfig, Role};
use crate::evaluate::{HeldOut, generation_config, prompt_limits};
use crate::output;
use crate::rollout_worker::{WorkerSummary, run_worker};
use crate::setup::{Source, environments, new_tokenizer, new_trainer};
use crate::store_trainer::Heartbeat;
use crate::summary::RunSummary;
use crate::task::Task;
use crate::warm_up::sft_warm_up;

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
        if self.config.role == Role::Rollout {
            bail!(
                "`role = \"rollout\"` runs a rollout worker, which trains nothing: start it with \
                 Grpo::run_worker (or Grpo::run_and_report)"
            );
        }
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

impl Grpo {
    /// Runs a rollout worker (`role = "rollout"`) for the run at the config's `store` and
    /// `run_id`: everything else (job config, tokenizer, model, weights) comes from the store,
    /// and the task from this builder ([`task`](Self::task), [`environments`](Self::environments))
    /// or the job config's `[env]`. Returns when the trainer has finished the run, or when
    /// stopped.
    pub fn run_worker(self) -> Result<WorkerSummary> {
        let stop = self
            .stop
            .clone()
            .unwrap_or_else(crate::signals::stop_on_signals);
        if self.config.role != Role::Rollout {
            bail!("Grpo::run_worker needs `role = \"rollout\"` (and `store`)");
        }
        self.config.validate()?;
        run_worker(&self.config, &self.source, stop)
    }

    /// Runs whichever side the config's `role` names and reports it: the summary table on
    /// stderr and the summary JSON as the last stdout line (a run's, or a rollout worker's).
    /// What the example binaries call.
    pub fn run_and_report(self) -> Result<()> {
        if self.config.role == Role::Rollout {
            let summary = self.run_worker()?;
            crate::summary::report_worker(&summary);
        } else {
            let summary = self.run()?;
            crate::summary::report(&summary);
        }
        Ok(())
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
    let store = match (&cfg.store, cfg.role) {
        (Some(url), Role::Trainer) => Some(open_trainer_store(cfg, url)?),
        _ => None,
    };
    let _heartbeat = store.as_ref().map(Heartbeat::start).transpose()?;
    let device = parse_device(&cfg.device)?;
    if let Some(store) = &store
        && cfg.resume_from_checkpoint == crate::config::ResumeFrom::Latest(true)
    {
        std::fs::create_dir_all(&cfg.output_dir)
            .with_context(|| format!("creating {}", cfg.output_dir.display()))?;
        checkpoint::fetch_from_store(store, &cfg.output_dir)?;
    }
    let resume = output::claim(cfg)?;
    let tokenizer = Arc::new(match (&resume, &grpo.tokenizer) {
        (Some(dir), _) => Tokenizer::from_dir(dir)?,
        (None, Some(given)) => given.clone(),
        (None, None) => new_tokenizer(cfg, &grpo.source)?,
    });
    if tokenizer.eos_token_ids.is_empty() {
        bail!("the tokenizer has no end-of-sequence token");
    }
    let (train_env, eval_env) = environments(cfg, &grpo.source, &tokenizer)?;
    let generation = generation_config(cfg, &tokenizer.eos_token_ids);
    let held_out = HeldOut {
        env: eval_env.as_ref(),
        prompts: cfg.eval.prompts,
        generation: &generation,
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
            let baseline = held_out.accuracy(trainer.model(), &limits)?;
            tracing::info!(baseline_accuracy = baseline, "held-out accuracy after SFT");
            let state = RunState {
                step: 0,
                prompt_cursor: 0,
                baseline_accuracy: baseline,
                sft_seconds,
                grpo_seconds: 0.0,
                overlapped_steps: 0,
                accounting: Accounting::default(),
                rollouts: None,
            };
            (trainer, state)
        }
    };

    let limits = prompt_limits(cfg, trainer.model());
    let phase = Phase {
        cfg,
        train_env: &train_env,
        tokenizer: &tokenizer,
        generation: &generation,
        limits: &limits,
        held_out: &held_out,
        state: &state,
        resumed: resume.is_some(),
        stop: &stop,
        store: store.as_ref(),
    };
    let end = async_grpo::train(&phase, &mut trainer)?;
    // The final checkpoint comes before the final evaluation: a second signal during the
    // evaluation loses nothing.
    let checkpoint = checkpoint::save(
        &cfg.output_dir,
        &trainer,
        &tokenizer,
        &end.state,
        cfg.save_total_limit,
        store.as_ref(),
    )?;
    let final_acc = held_out.accuracy(trainer.model(), &limits)?;
    let plot = crate::plot::plot_curves(
        &cfg.output_dir.join("reward.png"),
        &end.curve,
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
        grpo_seconds: end.state.grpo_seconds,
        seed: cfg.seed,
        resumed_from: resume,
        checkpoint,
        metrics: end.metrics,
        plot,
        overlapped_steps: end.state.overlapped_steps,
        accounting: end.state.accounting.to_json(),
        rollouts_refused: end.state.rollouts.map(|r| r.refused_by).unwrap_or_default(),
    })
}

/// The trainer's store. A new run claims a folder no run has used (two trainers started at once
/// for one run id: only one gets it); a resumed run takes its own folder back.
fn open_trainer_store(cfg: &GrpoConfig, url: &str) -> Result<grail_store::Store> {
    let store = grail_store::Store::open(url, &cfg.run_id)?;
    if cfg.resume_from_checkpoint != crate::config::ResumeFrom::Latest(false) {
        return Ok(store);
    }
    if !store.list("")?.is_empty() {
        bail!(
            "the store already holds a run at {} (config key `run_id` = {:?}): choose another \
             run_id, resume it (resume_from_checkpoint = true, with its output_dir), or remove \
             the old run's folder",
            store.location(""),
            cfg.run_id
        );
    }
    // Two trainers started at once both saw an empty folder: only one claims it.
    let claim = format!("pid {}\n", std::process::id()).into_bytes();
    if !store.create(grail_store::layout::TRAINER_CLAIM, claim)? {
        bail!(
            "another trainer claimed the run at {} first (config key `run_id` = {:?})",
            store.location(""),
            cfg.run_id
        );
    }
    Ok(store)
}

/// Loads a model saved by a run (for checks and tests).
pub fn load_checkpoint(dir: &std::path::Path) -> Result<CausalLm> {
    Ok(load_model(dir, &burn::tensor::Device::flex())?)
}
