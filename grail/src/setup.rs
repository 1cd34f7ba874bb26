//! What a new run is built from: where its prompts come from, its tokenizer, its environments
//! and its trainer.

use std::sync::Arc;

use anyhow::{Result, bail};
use burn::module::Module;
use burn::tensor::Device;
use grail_core::checkpoint::load_model;
use grail_core::model::{CausalLm, ModelConfig};
use grail_core::tokenizer::Tokenizer;
use grail_rollout::{Environment, Split};
use grail_trainer::{GrpoTrainer, TrainerConfig};

use crate::config::{EnvSection, GrpoConfig};
use crate::task::Task;
use crate::tasks::{Arithmetic, Countdown, Gsm8k, arithmetic_task, countdown_task, open_jsonl};

/// End-of-sequence marker of trained tokenizers.
pub const EOS: &str = "<|endoftext|>";

/// Where a run's prompts and rewards come from.
pub(crate) enum Source {
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

/// The train and held-out environments of a run.
pub(crate) fn environments(
    cfg: &GrpoConfig,
    source: &Source,
    tokenizer: &Arc<Tokenizer>,
) -> Result<(Arc<dyn Environment>, Arc<dyn Environment>)> {
    Ok(match source {
        Source::Config => (
            make_env(cfg, Split::Train, tokenizer.clone())?,
            make_env(cfg, Split::Eval, tokenizer.clone())?,
        ),
        Source::Task(task) => (
            task.environment(Split::Train, tokenizer.clone())?,
            task.environment(Split::Eval, tokenizer.clone())?,
        ),
        Source::Environments { train, eval } => (train.clone(), eval.clone()),
    })
}

/// Texts a BPE for this task is trained on.
fn tokenizer_corpus(cfg: &GrpoConfig) -> Result<Vec<String>> {
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
        // Its prompts are the chat template of a pretrained model, which brings its tokenizer.
        EnvSection::Gsm8k(_) => bail!(
            "`[env] kind = \"gsm8k\"` asks its questions in a pretrained model's chat template: \
             set `model.path` to a Hugging Face model directory with its tokenizer.json (or \
             `tokenizer.path`) rather than training a tokenizer from scratch"
        ),
    }
    Ok(out)
}

fn make_env(cfg: &GrpoConfig, split: Split, tok: Arc<Tokenizer>) -> Result<Arc<dyn Environment>> {
    Ok(match &cfg.env {
        EnvSection::Countdown(c) => Arc::new(Countdown::new(c.clone(), cfg.seed, split, tok)?),
        EnvSection::Arithmetic(a) => Arc::new(Arithmetic::new(a.clone(), cfg.seed, split, tok)?),
        EnvSection::Gsm8k(g) => Arc::new(Gsm8k::open(g, cfg.seed, split, tok)?),
        EnvSection::Jsonl { path } => Arc::new(open_jsonl(path, split, tok)?),
    })
}

/// The tokenizer of a new run: the one named in the config, the model's own, or (for a model
/// built from scratch) a byte-level BPE trained now on the task's text.
pub(crate) fn new_tokenizer(cfg: &GrpoConfig, source: &Source) -> Result<Tokenizer> {
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
        Source::Config => tokenizer_corpus(cfg)?,
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
pub(crate) fn new_trainer(
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
