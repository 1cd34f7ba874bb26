//! One TOML file describes a run. Every key, its meaning and its default is documented here, in
//! one place; unknown keys and out-of-range values are errors that name the key.
//!
//! ```toml
//! seed = 0
//! device = "cpu"                 # cpu | vulkan[:N] | cuda[:N]
//! output_dir = "runs/countdown"
//!
//! [model]                        # `path` = an HF model directory, or a tiny Qwen2 from scratch:
//! hidden_size = 128
//!
//! [env]
//! kind = "countdown"             # countdown | arithmetic | gsm8k | jsonl
//! numbers = 3
//!
//! [grpo]                         # TRL GRPOConfig names
//! learning_rate = 1e-3
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use grail_protocol::SyncMode;
use grail_rollout::PromptTruncation;
use grail_trainer::advantages::ScaleRewards;
use grail_trainer::loss::{ImportanceSamplingLevel, LossType};
use grail_trainer::off_policy::ImportanceSamplingMode;
use grail_trainer::schedule::LrSchedulerType;
use serde::{Deserialize, Serialize};

use crate::tasks::{ArithmeticConfig, CountdownConfig, Gsm8kConfig};

/// The whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoConfig {
    /// Seed of everything random (model init, tasks, sampling). Default 0.
    pub seed: u64,
    /// Compute device. Default "cpu".
    pub device: String,
    /// Where metrics, plot and checkpoints go. Default "runs/countdown".
    pub output_dir: PathBuf,
    /// Start a new run in an `output_dir` that holds another one (its `metrics.jsonl` and
    /// checkpoints are removed first). Without it such a directory is an error. Default false.
    pub overwrite_output_dir: bool,
    /// Write a checkpoint (`output_dir/checkpoint-<step>/`: weights in Hugging Face layout,
    /// tokenizer, optimizer state, trainer and run state) every this many GRPO steps; 0: only
    /// the final one. A checkpoint is always written when the run ends or is stopped by a signal.
    /// Default 100.
    pub save_steps: usize,
    /// Keep at most this many checkpoints, removing the oldest after a new one is written.
    /// Default: keep all.
    pub save_total_limit: Option<usize>,
    /// Continue a run: `true` = from the newest checkpoint in `output_dir`, or the path of a
    /// checkpoint directory. The run continues with its weights, optimizer state, schedule step,
    /// policy version, prompt cursor and accounting; `metrics.jsonl` is appended to (lines after
    /// the checkpoint's step, from the interrupted attempt, are dropped). Default false.
    pub resume_from_checkpoint: ResumeFrom,
    /// all (the rollout pool and the trainer in this process, meeting through channels) |
    /// trainer | rollout (separate processes, any number of rollout ones, meeting through
    /// `store`). Default all.
    pub role: Role,
    /// The object store a run spread over processes meets in: `file:///absolute/path` (processes
    /// on one machine, or machines sharing that folder) or `s3://bucket/prefix` (any S3-compatible
    /// server: AWS, R2, MinIO, SeaweedFS; endpoint and credentials from the `AWS_*` environment
    /// variables). Needed by the trainer and rollout roles. Default none.
    pub store: Option<String>,
    /// The run's folder in `store`: a trainer and its rollout workers share it. Default "grail".
    pub run_id: String,
    /// A rollout worker's id in the store (letters, digits, `-`, `_`, `.`). Default: made from
    /// the host name, process id and start time.
    pub worker_id: Option<String>,
    /// The policy model.
    pub model: ModelSection,
    /// The tokenizer.
    pub tokenizer: TokenizerSection,
    /// The task.
    pub env: EnvSection,
    /// Supervised warm-up before GRPO.
    pub sft: SftSection,
    /// GRPO hyper-parameters.
    pub grpo: GrpoSection,
    /// Held-out evaluation.
    pub eval: EvalSection,
}

/// `role`: which side of a run this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Rollout pool and trainer in one process.
    #[default]
    All,
    /// The trainer: publishes the run and its weights to the store, trains on the rollouts found
    /// there, marks the run finished.
    Trainer,
    /// A rollout worker: takes the model, tokenizer and config from the store, generates and
    /// scores groups of completions into it, and exits when the trainer has finished.
    Rollout,
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "all" => Ok(Role::All),
            "trainer" => Ok(Role::Trainer),
            "rollout" => Ok(Role::Rollout),
            other => Err(format!("unknown role `{other}` (all | trainer | rollout)")),
        }
    }
}

/// `[model]`: an HF directory (`path`) or a Qwen2 built from scratch with these sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// HF model directory; when set, the size keys are ignored. Default: none (from scratch).
    pub path: Option<PathBuf>,
    /// Default 128.
    pub hidden_size: usize,
    /// Default 4.
    pub num_hidden_layers: usize,
    /// Default 4.
    pub num_attention_heads: usize,
    /// Default 2.
    pub num_key_value_heads: usize,
    /// Default 384.
    pub intermediate_size: usize,
}

/// `[tokenizer]`: `path` (a directory with tokenizer.json) or a byte-level BPE trained at start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerSection {
    /// Directory holding tokenizer.json. Default: the model's directory if it has one, else train.
    pub path: Option<PathBuf>,
    /// Vocabulary of the trained BPE. Default 384.
    pub vocab_size: usize,
}

/// `[env]`: which task, and its difficulty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum EnvSection {
    /// Countdown: `numbers` (default 3), `max_number` (9), `max_target` (99).
    Countdown(CountdownConfig),
    /// Arithmetic word problems: `digits` (default 2).
    Arithmetic(ArithmeticConfig),
    /// GSM8K in the model's chat template (needs a pretrained model's tokenizer): `train`
    /// (default "../shared/data/gsm8k/train.jsonl"), `test` (the held-out problems, default
    /// "../shared/data/gsm8k/test.jsonl"), `system_prompt` (default none), `instruction`
    /// (appended to each question; default asks for the final answer after "####").
    Gsm8k(Gsm8kConfig),
    /// A JSONL dataset of `{"prompt", "answer"}` lines at `path`.
    Jsonl {
        /// The dataset file.
        path: PathBuf,
    },
}

/// `[sft]`: supervised warm-up on the task's reference answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftSection {
    /// Optimizer steps (0 skips the warm-up). Default 150.
    pub steps: usize,
    /// Examples per step. Default 64.
    pub batch_size: usize,
    /// Learning rate. Default 3e-3.
    pub learning_rate: f64,
}

/// `[grpo]`: TRL GRPOConfig names, plus grail's own (last group).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoSection {
    /// Default 3e-4 (from-scratch tiny models; use ~1e-6 for pretrained LLMs).
    pub learning_rate: f64,
    /// Completions per prompt. Default 8.
    pub num_generations: usize,
    /// Prompts per optimizer step. Default 16.
    pub prompts_per_step: usize,
    /// Longest prompt in tokens; longer ones are handled as `prompt_truncation` says. Every
    /// prompt plus `max_completion_length` must also fit the model's `max_position_embeddings`
    /// (an error naming the prompt otherwise). Default 64.
    pub max_prompt_length: usize,
    /// left (keep the last `max_prompt_length` tokens, as TRL does) | error (stop the run naming
    /// the prompt). Default left.
    pub prompt_truncation: PromptTruncation,
    /// Completion budget (tokens). Default 16.
    pub max_completion_length: usize,
    /// Default 1.0.
    pub temperature: f32,
    /// Default 1.0 (off).
    pub top_p: f32,
    /// Default 0 (off).
    pub top_k: usize,
    /// Default 0.0 (off).
    pub min_p: f32,
    /// KL weight; 0 runs no reference model. Default 0.0.
    pub beta: f64,
    /// Lower clip ε. Default 0.2.
    pub epsilon: f64,
    /// Upper clip ε (DAPO clip-higher). Default 0.28.
    pub epsilon_high: f64,
    /// grpo | bnpo | dr_grpo | dapo | cispo | sapo. Default dapo.
    pub loss_type: LossType,
    /// token | sequence (GSPO). Default token.
    pub importance_sampling_level: ImportanceSamplingLevel,
    /// group | batch | none. Default group.
    pub scale_rewards: ScaleRewards,
    /// μ: optimizer steps per batch. Default 1.
    pub num_iterations: usize,
    /// Default 1.0.
    pub max_grad_norm: f64,
    /// AdamW's decoupled weight decay. Default 0.0.
    pub weight_decay: f64,
    /// Default 0.
    pub warmup_steps: usize,
    /// constant | linear | cosine. Default constant.
    pub lr_scheduler_type: LrSchedulerType,
    /// GRPO optimizer steps. Default 600.
    pub max_steps: usize,
    /// Drop groups with zero reward spread. Default true.
    pub filter_zero_std_groups: bool,
    /// Token budget of one micro-batch. Default 4096.
    pub max_tokens_per_microbatch: usize,
    /// Keep only each decoder layer's input in the trainer's forward and recompute the layers
    /// in the backward: less memory for one more forward. Default false.
    pub gradient_checkpointing: bool,
    /// Samples more than this many versions old (by their oldest token) are dropped and counted.
    /// Default 2.
    pub max_staleness: u64,
    /// How many optimizer steps the pool may run ahead of the newest weights it has (it pauses
    /// beyond that, so it does not generate samples that would arrive too stale). AReaL calls it
    /// `max_head_offpolicyness`, prime-rl `async_level`; both spellings are accepted. Default 2.
    #[serde(alias = "max_head_offpolicyness", alias = "async_level")]
    pub max_ahead: Option<u64>,
    /// Let a rollout worker switch to new weights in the middle of a completion (PipelineRL,
    /// AReaL): it recomputes its KV caches with the new weights and each token records the version
    /// that produced it. Default false (whole completions from one version).
    pub in_flight_weight_updates: bool,
    /// The watchdog, in seconds: the run stops with an error saying why when it has taken no
    /// optimizer step for this long and, meanwhile, either no group arrived from the rollout pool
    /// for this long or batches were filtered (zero reward spread) or dropped as stale. Time
    /// inside a step does not count. 0 turns it off. Default 600.
    pub stall_timeout: u64,
    /// Rollout worker threads. Default 1.
    pub rollout_workers: usize,
    /// Bytes for each rollout worker's paged KV cache (vLLM's KV budget; CPU workers): a
    /// sequence waits for room rather than overcommit, and one that cannot grow is preempted
    /// and re-prefilled later (counted as `preemptions`). Must hold one sequence of
    /// `max_prompt_length + max_completion_length` positions. Default: room for every sequence
    /// of a worker's batch at once.
    pub kv_cache_bytes: Option<usize>,
    /// full | delta. Default delta.
    pub weight_sync: SyncMode,
    /// With a store: a full copy of the weights every this many versions, deltas between
    /// (a worker that joins reads the newest full copy and the deltas after it). Default 10.
    pub weight_anchor_interval: u64,
    /// With a store: the trainer checks every rollout object before any of its groups trains
    /// and refuses the whole object when one check fails: each prompt is the environment's and
    /// was claimed by the object's worker, each completion ends where generation stops, the
    /// rewards are recomputed by the trainer's reward functions (and replace the worker's), no
    /// prompt is accepted twice; and the groups `verify_fraction` picks are recomputed with the
    /// weights that sampled them (GRAIL sketches at 32 secret positions, every log-prob, the
    /// sampled tokens against the sampling settings, one at a time and, over a group, how likely
    /// they are: not likelier than the sampler draws). The workers commit to every token's
    /// hidden state for it. false trusts the workers (your own machines). Without a store the
    /// pool is in the trainer's process and is not checked. Default true.
    pub verify_rollouts: bool,
    /// With `verify_rollouts`: the share of each object's groups (at least one, picked in
    /// secret) whose samples are recomputed by the model; the other checks cover every group.
    /// 1.0 recomputes everything (a forward per version of the whole object); the default,
    /// 0.1, is grail's spot-check rate (docs/architecture.md gives the bound on what a cheater
    /// can slip through). Default 0.1.
    pub verify_fraction: f64,
    /// With `verify_rollouts`: after this many objects of one worker fail verification, its
    /// objects are refused unread (quarantined; 0 never). Default 3.
    pub quarantine_after: u64,
    /// Correct for the behaviour–trainer policy gap (importance sampling). Default true.
    pub importance_sampling_correction: bool,
    /// token_truncate | token_mask | sequence_truncate | sequence_mask. Default sequence_mask.
    pub importance_sampling_mode: ImportanceSamplingMode,
    /// C: the truncation cap and the default mask range [1/C, C]. Default 3.0.
    pub importance_sampling_cap: f64,
    /// Lower edge of the mask range. Default 1/C.
    pub importance_sampling_mask_low: Option<f64>,
    /// Upper edge of the mask range. Default C.
    pub importance_sampling_mask_high: Option<f64>,
    /// AReaL's decoupled PPO objective: clip π_θ/π_prox, weight by π_prox/π_behav. Default true.
    pub use_decoupled_loss: bool,
}

/// `[eval]`: held-out accuracy (greedy decoding, the `correct` reward).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Held-out prompts. Default 200.
    pub prompts: usize,
    /// Evaluate every N GRPO steps (0: only before and after). Default 10.
    pub every: usize,
}

/// `resume_from_checkpoint`: `false`, `true` (the newest checkpoint in `output_dir`) or a path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ResumeFrom {
    /// `true`: the newest checkpoint in `output_dir`; `false`: a new run.
    Latest(bool),
    /// A checkpoint directory.
    Path(PathBuf),
}

impl Default for ResumeFrom {
    fn default() -> Self {
        ResumeFrom::Latest(false)
    }
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            device: "cpu".into(),
            output_dir: PathBuf::from("runs/countdown"),
            overwrite_output_dir: false,
            save_steps: 100,
            save_total_limit: None,
            resume_from_checkpoint: ResumeFrom::default(),
            role: Role::All,
            store: None,
            run_id: "grail".into(),
            worker_id: None,
            model: ModelSection::default(),
            tokenizer: TokenizerSection::default(),
            env: EnvSection::Countdown(CountdownConfig::default()),
            sft: SftSection::default(),
            grpo: GrpoSection::default(),
            eval: EvalSection::default(),
        }
    }
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            path: None,
            hidden_size: 128,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            intermediate_size: 384,
        }
    }
}

impl Default for TokenizerSection {
    fn default() -> Self {
        Self {
            path: None,
            vocab_size: 384,
        }
    }
}

impl Default for SftSection {
    fn default() -> Self {
        Self {
            steps: 150,
            batch_size: 64,
            learning_rate: 3e-3,
        }
    }
}

impl Default for GrpoSection {
    fn default() -> Self {
        Self {
            learning_rate: 3e-4,
            num_generations: 8,
            prompts_per_step: 16,
            max_prompt_length: 64,
            prompt_truncation: PromptTruncation::Left,
            max_completion_length: 16,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            beta: 0.0,
            epsilon: 0.2,
            epsilon_high: 0.28,
            loss_type: LossType::Dapo,
            importance_sampling_level: ImportanceSamplingLevel::Token,
            scale_rewards: ScaleRewards::Group,
            num_iterations: 1,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            warmup_steps: 0,
            lr_scheduler_type: LrSchedulerType::Constant,
            max_steps: 600,
            filter_zero_std_groups: true,
            max_tokens_per_microbatch: 4096,
            max_staleness: 2,
            max_ahead: Some(2),
            in_flight_weight_updates: false,
            stall_timeout: 600,
            rollout_workers: 1,
            kv_cache_bytes: None,
            weight_sync: SyncMode::Delta,
            weight_anchor_interval: 10,
            verify_rollouts: true,
            verify_fraction: 0.1,
            quarantine_after: 3,
            importance_sampling_correction: true,
            importance_sampling_mode: ImportanceSamplingMode::SequenceMask,
            importance_sampling_cap: 3.0,
            importance_sampling_mask_low: None,
            importance_sampling_mask_high: None,
            use_decoupled_loss: true,
            gradient_checkpointing: false,
        }
    }
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            prompts: 200,
            every: 10,
        }
    }
}

fn positive(key: &str, v: usize) -> Result<()> {
    if v == 0 {
        bail!("config key `{key}` = 0: must be positive");
    }
    Ok(())
}

impl GrpoConfig {
    /// Parses a TOML file (a missing file, bad TOML, an unknown key or a wrong type is an error
    /// naming the file and key) and validates it.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading job config {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("in job config {}", path.display()))
    }

    /// Parses TOML text and validates it.
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: GrpoConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Range checks, each naming its key.
    pub fn validate(&self) -> Result<()> {
        let g = &self.grpo;
        match (self.role, &self.store) {
            (Role::All, Some(url)) => bail!(
                "config key `store` = {url:?}: `role = \"all\"` runs the pool and the trainer in one \
                 process, through channels; a store is for `role = \"trainer\"` and \"rollout\""
            ),
            (Role::Trainer | Role::Rollout, None) => bail!(
                "config key `role` = \"{}\" needs `store` (the URL the trainer and its rollout \
                 workers meet at, e.g. file:///tmp/grail-store)",
                if self.role == Role::Trainer {
                    "trainer"
                } else {
                    "rollout"
                }
            ),
            (Role::Trainer | Role::Rollout, Some(url))
                if !(url.starts_with("file://") || url.starts_with("s3://")) =>
            {
                bail!(
                    "config key `store` = {url:?}: the trainer and rollout roles meet in a folder \
                     (file:///absolute/path) or a bucket (s3://bucket/prefix)"
                )
            }
            _ => {}
        }
        if let Some(id) = &self.worker_id {
            grail_store::layout::check_worker_id(id)
                .map_err(|e| anyhow::anyhow!("config key `worker_id`: {e}"))?;
        }
        if !(g.verify_fraction > 0.0 && g.verify_fraction <= 1.0) {
            bail!(
                "config key `grpo.verify_fraction` = {}: must be in (0, 1] (turn verification \
                 off with grpo.verify_rollouts = false)",
                g.verify_fraction
            );
        }
        if g.weight_anchor_interval == 0 {
            bail!("config key `grpo.weight_anchor_interval` = 0: must be at least 1");
        }
        if let Some(p) = &self.model.path
            && !p.is_dir()
        {
            bail!(
                "config key `model.path` = {}: no such model directory",
                p.display()
            );
        }
        if let Some(p) = &self.tokenizer.path
            && !p.join("tokenizer.json").is_file()
        {
            bail!(
                "config key `tokenizer.path` = {}: no tokenizer.json there",
                p.display()
            );
        }
        match &self.env {
            EnvSection::Jsonl { path } if !path.is_file() => {
                bail!("config key `env.path` = {}: no such file", path.display());
            }
            EnvSection::Gsm8k(g) => {
                for (key, path) in [("env.train", &g.train), ("env.test", &g.test)] {
                    if !path.is_file() {
                        bail!("config key `{key}` = {}: no such file", path.display());
                    }
                }
            }
            EnvSection::Countdown(c) => c.validate()?,
            EnvSection::Arithmetic(a) if !(1..=6).contains(&a.digits) => {
                bail!("config key `env.digits` = {}: must be in 1..=6", a.digits);
            }
            _ => {}
        }
        for (k, v) in [
            ("model.hidden_size", self.model.hidden_size),
            ("model.num_hidden_layers", self.model.num_hidden_layers),
            ("model.num_attention_heads", self.model.num_attention_heads),
            ("model.num_key_value_heads", self.model.num_key_value_heads),
            ("model.intermediate_size", self.model.intermediate_size),
            ("sft.batch_size", self.sft.batch_size),
            ("grpo.num_generations", g.num_generations),
            ("grpo.prompts_per_step", g.prompts_per_step),
            ("grpo.max_prompt_length", g.max_prompt_length),
            ("grpo.max_completion_length", g.max_completion_length),
            ("grpo.num_iterations", g.num_iterations),
            ("grpo.rollout_workers", g.rollout_workers),
            (
                "grpo.max_tokens_per_microbatch",
                g.max_tokens_per_microbatch,
            ),
            ("eval.prompts", self.eval.prompts),
            ("save_total_limit", self.save_total_limit.unwrap_or(1)),
        ] {
            positive(k, v)?;
        }
        if !self
            .model
            .hidden_size
            .is_multiple_of(self.model.num_attention_heads)
            || !(self.model.hidden_size / self.model.num_attention_heads).is_multiple_of(2)
        {
            bail!(
                "config key `model.hidden_size` = {}: must split into an even head_dim over num_attention_heads",
                self.model.hidden_size
            );
        }
        if !self
            .model
            .num_attention_heads
            .is_multiple_of(self.model.num_key_value_heads)
        {
            bail!(
                "config key `model.num_key_value_heads` = {}: must divide num_attention_heads",
                self.model.num_key_value_heads
            );
        }
        if g.num_generations < 2 {
            bail!(
                "config key `grpo.num_generations` = {}: GRPO needs at least 2 completions per prompt",
                g.num_generations
            );
        }
        if self.tokenizer.vocab_size < 260 {
            bail!(
                "config key `tokenizer.vocab_size` = {}: a byte-level BPE needs at least 260",
                self.tokenizer.vocab_size
            );
        }
        if !(self.sft.learning_rate.is_finite() && self.sft.learning_rate > 0.0) {
            bail!(
                "config key `sft.learning_rate` = {}: must be positive",
                self.sft.learning_rate
            );
        }
        if !(g.temperature > 0.0 && g.temperature <= 10.0) {
            bail!(
                "config key `grpo.temperature` = {}: must be in (0, 10]; GRPO learns from the spread \
                 of rewards within a group, and at temperature 0 every completion of a prompt is the same",
                g.temperature
            );
        }
        self.trainer_config()
            .validate()
            .map_err(|e| anyhow::anyhow!("[grpo] {e}"))?;
        grail_rollout::sampling::SamplingConfig {
            temperature: g.temperature,
            top_k: g.top_k,
            top_p: g.top_p,
            min_p: g.min_p,
            repetition_penalty: 1.0,
        }
        .validate()
        .map_err(|e| anyhow::anyhow!("config key `grpo.{e}"))?;
        Ok(())
    }

    /// The trainer's configuration.
    pub fn trainer_config(&self) -> grail_trainer::config::TrainerConfig {
        let g = &self.grpo;
        let mut t = grail_trainer::config::TrainerConfig {
            learning_rate: g.learning_rate,
            max_grad_norm: g.max_grad_norm,
            weight_decay: g.weight_decay,
            lr_scheduler_type: g.lr_scheduler_type,
            warmup_steps: g.warmup_steps,
            max_steps: g.max_steps,
            num_iterations: g.num_iterations,
            scale_rewards: g.scale_rewards,
            reward_weights: Vec::new(), // set from the environment
            filter_zero_std_groups: g.filter_zero_std_groups,
            max_tokens_per_microbatch: g.max_tokens_per_microbatch,
            importance_sampling_correction: g.importance_sampling_correction,
            importance_sampling_mode: g.importance_sampling_mode,
            importance_sampling_cap: g.importance_sampling_cap,
            importance_sampling_mask_low: g.importance_sampling_mask_low,
            importance_sampling_mask_high: g.importance_sampling_mask_high,
            use_decoupled_loss: g.use_decoupled_loss,
            gradient_checkpointing: g.gradient_checkpointing,
            ..Default::default()
        };
        t.reward_weights = vec![1.0];
        t.loss.loss_type = g.loss_type;
        t.loss.importance_sampling_level = g.importance_sampling_level;
        t.loss.epsilon_low = g.epsilon;
        t.loss.epsilon_high = g.epsilon_high;
        t.loss.beta = g.beta;
        t.loss.temperature = g.temperature as f64;
        t.loss.max_completion_length = g.max_completion_length;
        t
    }
}
