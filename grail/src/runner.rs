//! The RL job: tokenizer → model → SFT warm-up → baseline eval → async GRPO (pool + trainer over
//! channels) → final eval → checkpoint, metrics, plot, summary.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use grail_core::checkpoint::{StorageDtype, load_model, save_model};
use grail_core::device::parse_device;
use grail_core::env::tasks::{arithmetic_task, countdown_task};
use grail_core::env::{Arithmetic, Completion, Countdown, Environment, JsonlDataset, Split};
use grail_core::model::{CausalLm, ModelConfig};
use grail_core::sync::{PoolFeedback, WeightPublisher, WireDtype};
use grail_core::tokenizer::Tokenizer;
use grail_rollout::generate::{FinishReason, GenerationConfig, GenerationRequest, generate};
use grail_rollout::sampling::SamplingConfig;
use grail_rollout::{PoolConfig, spawn_pool};
use grail_trainer::TrainerError;
use grail_trainer::channel::{ChannelRun, RunEvent};
use grail_trainer::flops::measure_peak_flops;
use grail_trainer::sft::SftExample;
use grail_trainer::trainer::GrpoTrainer;
use serde_json::json;

use crate::config::{EnvSection, GrpoConfig};
use crate::progress::Progress;

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
    /// Wall time of the whole run.
    pub seconds: f64,
    /// Wall time of the SFT warm-up.
    pub sft_seconds: f64,
    /// Wall time of GRPO.
    pub grpo_seconds: f64,
    /// The seed.
    pub seed: u64,
    /// Final checkpoint directory (HF layout + tokenizer).
    pub checkpoint: PathBuf,
    /// Per-step metrics (JSONL).
    pub metrics: PathBuf,
    /// Reward and accuracy plot (PNG), when a font was available to draw it.
    pub plot: Option<PathBuf>,
    /// Steps during which the pool generated samples while the trainer trained (overlap).
    pub overlapped_steps: usize,
    /// Pool and trainer sample accounting.
    pub accounting: serde_json::Value,
}

/// A task's reference completion text for prompt `index` of the train split (SFT targets).
fn reference_completion(cfg: &GrpoConfig, env: &dyn Environment, index: u64) -> Option<String> {
    Some(match &cfg.env {
        EnvSection::Countdown(c) => countdown_task(c, cfg.seed, Split::Train, index).solution,
        EnvSection::Arithmetic(a) => format!(
            "#### {}",
            arithmetic_task(a, cfg.seed, Split::Train, index).1
        ),
        EnvSection::Jsonl { .. } => format!("#### {}", env.prompt(index)?.answer),
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
        EnvSection::Jsonl { path } => Arc::new(JsonlDataset::open(path, split, tok)?),
    })
}

/// Held-out accuracy: greedy completions of the first `n` held-out prompts, scored by the
/// environment's `correct` reward (or its last reward).
pub fn evaluate(
    model: &CausalLm,
    env: &dyn Environment,
    n: usize,
    generation: &GenerationConfig,
) -> Result<f64> {
    let prompts: Vec<_> = (0..n as u64).map_while(|i| env.prompt(i)).collect();
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

/// Runs the job. `stop` (set by Ctrl-C) ends GRPO early with a final evaluation and checkpoint.
pub fn run(cfg: &GrpoConfig, stop: Arc<AtomicBool>) -> Result<RunSummary> {
    let start = Instant::now();
    let device = parse_device(&cfg.device)?;
    std::fs::create_dir_all(&cfg.output_dir)
        .with_context(|| format!("creating {}", cfg.output_dir.display()))?;

    // Tokenizer: given, the model's own, or trained now on the task's text.
    let tok_dir = cfg.tokenizer.path.clone().or_else(|| {
        cfg.model
            .path
            .clone()
            .filter(|p| p.join("tokenizer.json").is_file())
    });
    let tokenizer = Arc::new(match tok_dir {
        Some(dir) => Tokenizer::from_dir(&dir)?,
        None => {
            let corpus = tokenizer_corpus(cfg);
            Tokenizer::train_bpe(
                corpus.iter().map(String::as_str),
                cfg.tokenizer.vocab_size,
                &[EOS],
            )?
        }
    });
    let eos: Vec<u32> = tokenizer.eos_token_ids.clone();
    if eos.is_empty() {
        bail!("the tokenizer has no end-of-sequence token");
    }
    let train_env = make_env(cfg, Split::Train, tokenizer.clone())?;
    let eval_env = make_env(cfg, Split::Eval, tokenizer.clone())?;

    // Policy on an autodiff device.
    let ad = device.clone().autodiff();
    let policy = match &cfg.model.path {
        Some(path) => load_model(path, &ad)?,
        None => {
            let m = &cfg.model;
            let mut mc = ModelConfig::qwen2(
                tokenizer.vocab_size(),
                m.hidden_size,
                m.intermediate_size,
                m.num_hidden_layers,
                m.num_attention_heads,
                m.num_key_value_heads,
                512,
                true,
            );
            mc.eos_token_ids = eos.clone();
            CausalLm::init(&mc, cfg.seed, &ad)
        }
    };
    if policy.vocab_size() < tokenizer.vocab_size() {
        bail!(
            "the model's vocabulary ({}) is smaller than the tokenizer's ({})",
            policy.vocab_size(),
            tokenizer.vocab_size()
        );
    }
    let mut tcfg = cfg.trainer_config();
    tcfg.reward_weights = train_env.rewards().iter().map(|r| r.weight).collect();
    let reference = (cfg.grpo.beta != 0.0).then(|| policy.valid());
    let peak = measure_peak_flops(&device, 1024);
    let mut trainer = GrpoTrainer::new(policy, reference, tcfg, peak)?;
    tracing::info!(
        params = trainer.model().config.num_parameters(),
        vocab = tokenizer.vocab_size(),
        peak_gflops = peak / 1e9,
        "model ready"
    );

    // SFT warm-up on reference completions.
    let sft_start = Instant::now();
    let mut progress = Progress::new(cfg.sft.steps as u64, "sft");
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
            let Some(p) = train_env.prompt(next) else {
                next = 0;
                continue;
            };
            let text = reference_completion(cfg, train_env.as_ref(), next)
                .context("reference completion")?;
            next += 1;
            let mut completion = tokenizer.encode(&text, false)?;
            completion.extend(&eos[..1]);
            batch.push(SftExample {
                prompt: p.ids.to_vec(),
                completion,
            });
        }
        let m = trainer.sft_step(&batch, cfg.sft.learning_rate)?;
        progress.step(format!("loss {:.3}", m.loss));
    }
    progress.finish();
    let sft_seconds = sft_start.elapsed().as_secs_f64();

    let generation = GenerationConfig {
        sampling: SamplingConfig {
            temperature: cfg.grpo.temperature,
            top_p: cfg.grpo.top_p,
            top_k: cfg.grpo.top_k,
            min_p: cfg.grpo.min_p,
            repetition_penalty: 1.0,
        },
        max_completion_length: cfg.grpo.max_completion_length,
        max_batch: 64,
        eos_token_ids: eos.clone(),
        stop_sequences: Vec::new(),
        stop_strings: Vec::new(),
        seed: cfg.seed,
    };
    let baseline = evaluate(
        &trainer.model().valid(),
        eval_env.as_ref(),
        cfg.eval.prompts,
        &generation,
    )?;
    tracing::info!(baseline_accuracy = baseline, "held-out accuracy after SFT");

    // Async GRPO: the pool generates while the trainer trains; they meet only through channels.
    let grpo_start = Instant::now();
    let g = &cfg.grpo;
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
            first_prompt: 0,
            weight_wire: WIRE,
            in_flight_weight_updates: g.in_flight_weight_updates,
        },
    )?;
    let mut feedback = PoolFeedback::new(
        pool.feedback.clone(),
        WeightPublisher::new(g.weight_sync, WIRE, trainer.model(), trainer.version()),
    );
    let channel_run = ChannelRun {
        groups_per_step: g.prompts_per_step,
        max_staleness: g.max_staleness,
        max_steps: g.max_steps,
        stall_timeout: (g.stall_timeout > 0).then(|| Duration::from_secs(g.stall_timeout)),
    };
    let metrics_path = cfg.output_dir.join("metrics.jsonl");
    let mut metrics_file = std::fs::File::create(&metrics_path)
        .with_context(|| format!("creating {}", metrics_path.display()))?;
    let mut progress = Progress::new(g.max_steps as u64, "grpo");
    let mut curve: Vec<(usize, f64, Option<f64>)> = Vec::new();
    let mut overlapped = 0usize;
    let mut last_generated = pool.counters().generated.load(Ordering::SeqCst);
    let mut last_tokens = pool.counters().tokens.load(Ordering::SeqCst);
    let mut last_time = Instant::now();
    let mut io_error = None;
    let result = trainer.run_from_channel(
        &pool.groups.clone(),
        Some(&mut feedback),
        &channel_run,
        |t, event| {
            let m = match event {
                RunEvent::Step(m) => m,
                RunEvent::Waiting { since_step } => {
                    progress.update(format!(
                        "waiting for rollouts ({:.0} s since the last step; {} groups failed)",
                        since_step.as_secs_f64(),
                        pool.counters().failed_groups.load(Ordering::SeqCst)
                    ));
                    return if stop.load(Ordering::SeqCst) {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    };
                }
            };
            let generated = pool.counters().generated.load(Ordering::SeqCst);
            let during = generated - last_generated;
            last_generated = generated;
            if during > 0 {
                overlapped += 1;
            }
            let tokens = pool.counters().tokens.load(Ordering::SeqCst);
            let rollout_tokens_per_s =
                (tokens - last_tokens) as f64 / last_time.elapsed().as_secs_f64().max(1e-9);
            last_tokens = tokens;
            last_time = Instant::now();
            let acc = (cfg.eval.every > 0 && m.step % cfg.eval.every == 0)
                .then(|| {
                    evaluate(
                        &t.model().valid(),
                        eval_env.as_ref(),
                        cfg.eval.prompts,
                        &generation,
                    )
                    .ok()
                })
                .flatten();
            let mut line = serde_json::to_value(m).expect("metrics serialise");
            let names: Vec<&str> = train_env
                .rewards()
                .iter()
                .map(|r| r.name.as_str())
                .collect();
            for (name, v) in names.iter().zip(&m.reward_means) {
                line[format!("reward/{name}")] = json!(v);
            }
            line["eval_accuracy"] = json!(acc);
            line["pool_generated_during_step"] = json!(during);
            line["rollout_tokens_per_s"] = json!(rollout_tokens_per_s);
            line["pool_failed"] = json!(pool.counters().failed.load(Ordering::SeqCst));
            line["elapsed_s"] = json!(start.elapsed().as_secs_f64());
            if let Err(e) = writeln!(metrics_file, "{line}") {
                io_error.get_or_insert(e);
            }
            curve.push((m.step, m.reward_mean, acc));
            progress.step(format!(
                "reward {:.3} acc {} is-masked {}",
                m.reward_mean,
                acc.map_or("-".into(), |a| format!("{a:.2}")),
                m.is_masked_fraction
                    .map_or("-".into(), |f| format!("{:.1}%", 100.0 * f))
            ));
            if stop.load(Ordering::SeqCst) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
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
    if let Some(e) = io_error {
        return Err(e).with_context(|| format!("writing {}", metrics_path.display()));
    }
    let left_in_channel: usize = groups.drain().map(|g| g.samples.len()).sum();
    let grpo_seconds = grpo_start.elapsed().as_secs_f64();

    let final_acc = evaluate(
        &trainer.model().valid(),
        eval_env.as_ref(),
        cfg.eval.prompts,
        &generation,
    )?;
    let checkpoint = cfg.output_dir.join("checkpoint");
    save_model(trainer.model(), &checkpoint, StorageDtype::F32)?;
    tokenizer.save(&checkpoint)?;
    let plot = crate::plot::plot_curves(
        &cfg.output_dir.join("reward.png"),
        &curve,
        baseline,
        final_acc,
    )
    .map_err(|e| tracing::warn!("no plot: {e}"))
    .ok();
    let accounting = json!({
        "generated": report.generated, "sent": report.sent, "failed": report.failed,
        "unsent_at_shutdown": report.unsent_at_shutdown, "received": run.received, "trained": run.trained,
        "dropped_stale": run.dropped_stale, "dropped_filtered": run.dropped_filtered, "unused_at_close": run.unused_at_close, "left_in_channel": left_in_channel,
        "identity_holds": report.generated == run.trained + run.dropped_stale + run.dropped_filtered + run.unused_at_close + left_in_channel + report.failed + report.unsent_at_shutdown,
    });
    Ok(RunSummary {
        baseline_accuracy: baseline,
        final_accuracy: final_acc,
        steps: trainer.step(),
        seconds: start.elapsed().as_secs_f64(),
        sft_seconds,
        grpo_seconds,
        seed: cfg.seed,
        checkpoint,
        metrics: metrics_path,
        plot,
        overlapped_steps: overlapped,
        accounting,
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
