//! The supervised warm-up before GRPO, on the task's reference completions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Result, bail};
use grail_core::tokenizer::Tokenizer;
use grail_rollout::{Environment, PromptLimits};
use grail_trainer::{GrpoTrainer, SftExample};

use crate::config::GrpoConfig;
use crate::evaluate::prompt_at;
use crate::progress::Progress;

/// The SFT warm-up on the task's reference completions; returns its wall time. A signal stops
/// the run here, before GRPO starts.
pub(crate) fn sft_warm_up(
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
