//! `grail-bench`: benchmarks that print one JSON object per line.
//!
//! `cargo run --release -p grail-benches --bin grail-bench -- forward` measures the model's
//! forward throughput (real tokens per second) on a padded batch and on packed rows of the same
//! sequences, in one run, for a ~5M-parameter Qwen2 configuration on the chosen device.

mod ops_bench;
mod store_sync;

use std::time::Instant;

use anyhow::Result;
use burn::tensor::{Device, Int, Tensor, TensorData};
use clap::{Parser, Subcommand};
use grail_core::device::parse_device;
use grail_core::model::{Bf16Matrices, CausalLm, Layout, ModelConfig, RandomInit};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "grail-bench",
    about = "grail benchmarks (JSON lines on stdout)"
)]
struct Args {
    #[command(subcommand)]
    bench: Bench,
    /// Compute device: cpu, vulkan, vulkan:N, cuda or cuda:N.
    #[arg(long, default_value = "cpu", global = true)]
    device: String,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 5, global = true)]
    reps: usize,
    /// RNG seed for sequence lengths and token ids.
    #[arg(long, default_value_t = 0, global = true)]
    seed: u64,
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// Rollout generation throughput (continuous batching, sampling at temperature 1, no EOS).
    Rollout {
        #[command(flatten)]
        model: ModelArgs,
        /// Sequences generated together.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Prompt tokens per sequence.
        #[arg(long, default_value_t = 32)]
        prompt_len: usize,
        /// Tokens generated per sequence.
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        /// Distinct prompts (GRPO shape: `--prompts 8 --num-generations 8`); default: `--batch`.
        #[arg(long)]
        prompts: Option<usize>,
        /// Samples per prompt, which share its prefill.
        #[arg(long, default_value_t = 1)]
        num_generations: usize,
        /// Hold the matrices at bf16, as a rollout worker does with weights sent at bf16.
        #[arg(long)]
        bf16_weights: bool,
        /// Tokens every prompt begins with (a system prompt), of the `--prompt-len`.
        #[arg(long, default_value_t = 0)]
        shared_prefix: usize,
        /// Compute each prompt's shared beginning again (vLLM's prefix caching off).
        #[arg(long)]
        no_prefix_caching: bool,
        /// Keep the matrices row-major (a rollout worker on the CPU holds them in panel order).
        #[arg(long)]
        row_major_weights: bool,
    },
    /// Weight-sync delta size, encode/apply/hash time after real AdamW steps (bf16 deltas; one
    /// line per compression, zstd and lz4, over the same steps).
    WeightSync(WeightSyncArgs),
    /// Time for each weight version to reach a worker through an object store: this machine's
    /// memory and a throttled link (`--mbit`, `--latency-ms`), PULSE deltas vs full copies.
    StoreSync(store_sync::StoreSyncArgs),
    /// Selective log-probs forward + backward: fused chunked op vs naive log_softmax + gather.
    Logprob {
        /// Tokens.
        #[arg(long, default_value_t = 4096)]
        tokens: usize,
        /// Hidden size.
        #[arg(long, default_value_t = 512)]
        hidden: usize,
        /// Vocabulary size.
        #[arg(long, default_value_t = 32768)]
        vocab: usize,
        /// Use the naive path (run separately so peak memory is its own).
        #[arg(long)]
        naive: bool,
    },
    /// GRPO trainer steps (dapo loss, AdamW, grad clip) on a random Qwen2 model; one JSON line.
    TrainerStep(TrainerStepArgs),
    /// One fused op (attention, RMSNorm, SwiGLU, RoPE, linear) vs its unfused tensor math:
    /// forward + backward time and peak memory.
    Op(ops_bench::OpArgs),
    /// Forward (and forward+backward) throughput, padded batch vs packed rows.
    Forward {
        /// Number of sequences.
        #[arg(long, default_value_t = 8)]
        sequences: usize,
        /// Shortest sequence.
        #[arg(long, default_value_t = 16)]
        min_len: usize,
        /// Longest sequence (the padded width).
        #[arg(long, default_value_t = 128)]
        max_len: usize,
    },
}

/// Waits for the work queued on `device` (a no-op on the CPU).
pub(crate) fn sync(device: &Device) {
    device
        .sync()
        .unwrap_or_else(|e| panic!("device sync failed: {e:?}"));
}

/// The ~5M-parameter Qwen2 shape used across grail's CPU benchmarks.
fn bench_config() -> ModelConfig {
    ModelConfig::builder()
        .vocab_size(8192)
        .hidden_size(256)
        .intermediate_size(704)
        .num_hidden_layers(4)
        .num_attention_heads(4)
        .num_key_value_heads(2)
        .max_position_embeddings(2048)
        .tie_word_embeddings(true)
        .build()
        .expect("a consistent bench config")
}

/// The median wall time of `f` over `reps` runs after a warm-up, each run waiting for `device` to
/// finish what `f` queued (GPU backends run asynchronously).
fn median_secs(reps: usize, device: &Device, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    sync(device);
    let mut times: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            sync(device);
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn grid(rows: &[Vec<u32>], cols: usize, device: &Device) -> Tensor<2, Int> {
    let mut flat = Vec::with_capacity(rows.len() * cols);
    for r in rows {
        flat.extend(r.iter().map(|&t| t as i64));
        flat.extend(std::iter::repeat_n(0i64, cols - r.len()));
    }
    Tensor::from_data(TensorData::new(flat, [rows.len(), cols]), device)
}

fn forward_bench(
    args: &Args,
    device: &Device,
    sequences: usize,
    min_len: usize,
    max_len: usize,
) -> Result<()> {
    anyhow::ensure!(
        min_len >= 1 && min_len <= max_len,
        "need 1 <= --min-len <= --max-len"
    );
    let config = bench_config();
    let mut rng = StdRng::seed_from_u64(args.seed);
    let seqs: Vec<Vec<u32>> = (0..sequences)
        .map(|_| {
            let len = rng.random_range(min_len..=max_len);
            (0..len)
                .map(|_| rng.random_range(0..config.vocab_size as u32))
                .collect()
        })
        .collect();
    let lengths: Vec<usize> = seqs.iter().map(Vec::len).collect();
    let real: usize = lengths.iter().sum();

    let padded_ids = grid(&seqs, max_len, device);
    let padded = Layout::Padded {
        lengths: lengths.clone(),
    };
    let packed_ids = grid(&[seqs.concat()], real, device);
    let packed = Layout::packed_single_row(lengths.clone());

    let cases = [
        ("padded", &padded_ids, &padded, sequences * max_len),
        ("packed", &packed_ids, &packed, real),
    ];
    for (mode, autodiff) in [("forward", false), ("forward_backward", true)] {
        let dev = if autodiff {
            device.clone().autodiff()
        } else {
            device.clone()
        };
        let model = CausalLm::init(&config, args.seed, &dev);
        let mut tps = Vec::new();
        for (name, ids, layout, allocated) in &cases {
            let ids = (*ids).clone().to_device(&dev);
            let secs = median_secs(args.reps, &dev, || {
                let hidden = model
                    .forward_hidden(ids.clone(), layout)
                    .expect("valid layout");
                if autodiff {
                    let _ = model.logits(hidden).sum().backward();
                } else {
                    let _ = model.logits(hidden).sum().into_scalar::<f32>();
                }
            });
            let tokens_per_s = real as f64 / secs;
            tps.push(tokens_per_s);
            println!(
                "{}",
                json!({
                    "bench": mode, "layout": name, "device": args.device,
                    "params": config.num_parameters(), "sequences": sequences,
                    "real_tokens": real, "allocated_tokens": allocated,
                    "efficiency": real as f64 / *allocated as f64,
                    "seconds": secs, "real_tokens_per_s": tokens_per_s,
                })
            );
        }
        println!(
            "{}",
            json!({"bench": mode, "packed_over_padded": tps[1] / tps[0], "device": args.device})
        );
    }
    Ok(())
}

/// Model shape flags shared by the rollout and weight-sync benches.
#[derive(clap::Args, Debug)]
struct ModelArgs {
    /// A Hugging Face config.json to take the model shape from (overrides the shape flags).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Hidden size.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    /// MLP width.
    #[arg(long, default_value_t = 688)]
    inter: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 4096)]
    vocab: usize,
}

impl ModelArgs {
    fn model_config(&self) -> Result<ModelConfig> {
        Ok(match &self.config {
            Some(path) => ModelConfig::from_file(path)?,
            None => ModelConfig::builder()
                .vocab_size(self.vocab)
                .hidden_size(self.hidden)
                .intermediate_size(self.inter)
                .num_hidden_layers(self.layers)
                .num_attention_heads(self.heads)
                .num_key_value_heads(self.kv_heads)
                .max_position_embeddings(32768)
                .build()?,
        })
    }
}

/// The shape of a rollout bench's workload.
struct RolloutShape {
    batch: usize,
    prompts: usize,
    num_generations: usize,
    prompt_len: usize,
    new_tokens: usize,
    bf16_weights: bool,
    shared_prefix: usize,
    prefix_caching: bool,
    panels: bool,
}

fn rollout_bench(args: &Args, device: &Device, m: &ModelArgs, shape: RolloutShape) -> Result<()> {
    use grail_core::model::PagedKvCache;
    use grail_rollout::generate::{GenerationConfig, GenerationRequest, generate};
    let RolloutShape {
        batch,
        prompts,
        num_generations,
        prompt_len,
        new_tokens,
        bf16_weights,
        shared_prefix,
        prefix_caching,
        panels,
    } = shape;
    anyhow::ensure!(
        shared_prefix <= prompt_len,
        "--shared-prefix {shared_prefix} is longer than --prompt-len {prompt_len}"
    );
    let config = m.model_config()?;
    // At bf16 each matrix is cast as it is drawn, so the peak RSS shows the halved weights.
    let mut init = RandomInit::new(args.seed, 0.02, device);
    let model = if bf16_weights {
        CausalLm::build(&config, &mut Bf16Matrices(init))?
    } else {
        CausalLm::build(&config, &mut init)?
    };
    let model = if panels {
        model.with_panel_matrices()
    } else {
        model
    };
    let mut rng = StdRng::seed_from_u64(args.seed);
    let vocab = config.vocab_size as u32;
    let mut random_tokens =
        |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..vocab)).collect() };
    let system = random_tokens(shared_prefix);
    let requests: Vec<GenerationRequest> = (0..prompts)
        .flat_map(|i| {
            let prompt: std::sync::Arc<Vec<u32>> = std::sync::Arc::new(
                system
                    .iter()
                    .copied()
                    .chain(random_tokens(prompt_len - shared_prefix))
                    .collect(),
            );
            (0..num_generations).map(move |s| GenerationRequest {
                prompt_id: i as u64,
                sample_index: s,
                prompt: prompt.clone(),
            })
        })
        .collect();
    let sequences = requests.len();
    // Prefill alone (one new token each), then the full generation.
    let prefill_cfg = GenerationConfig {
        max_completion_length: 1,
        max_batch: batch,
        seed: args.seed,
        enable_prefix_caching: prefix_caching,
        ..GenerationConfig::default()
    };
    // Untimed warm-up (a prefill and a decode step): a GPU backend compiles each kernel on its
    // first launch, which would land in the prefill's time and make the decode's meaningless.
    let warm_up = GenerationConfig {
        max_completion_length: 2,
        ..prefill_cfg.clone()
    };
    generate(&model, &warm_up, requests.clone(), |_| {})?;
    let cfg = GenerationConfig {
        max_completion_length: new_tokens,
        ..prefill_cfg.clone()
    };
    let t = Instant::now();
    generate(&model, &prefill_cfg, requests.clone(), |_| {})?;
    let prefill_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let stats = generate(&model, &cfg, requests, |_| {})?;
    let total_s = t.elapsed().as_secs_f64();
    let decode_s = (total_s - prefill_s).max(1e-9);
    println!(
        "{}",
        json!({
            "bench": "rollout", "device": args.device, "params": config.num_parameters(),
            "weights": if bf16_weights { "bf16" } else { "f32" },
            "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "shared_prefix": shared_prefix, "prefix_caching": prefix_caching, "panels": panels,
            "generated_tokens": stats.generated_tokens, "tokens_per_s": stats.generated_tokens as f64 / total_s,
            "prompts": prompts, "num_generations": num_generations,
            "decode_tokens_per_s": (stats.generated_tokens - sequences) as f64 / decode_s,
            "prefill_s": prefill_s, "decode_s": decode_s, "total_s": total_s,
            "prefill_tokens": stats.prefill_tokens, "shared_prompt_tokens": stats.shared_prompt_tokens,
            "mean_batch": stats.mean_batch, "preemptions": stats.preemptions,
            "kv_bytes_per_token": PagedKvCache::bytes_per_block(&config, 1),
            "kv_blocks": stats.kv_blocks, "kv_blocks_peak": stats.kv_blocks_peak,
            "peak_rss_bytes": peak_rss_bytes(),
        })
    );
    Ok(())
}

fn weight_sync_bench(args: &Args, device: &Device, w: &WeightSyncArgs) -> Result<()> {
    use grail_core::model::named_tensors;
    use grail_protocol::{Compression, WireDtype, delta, weights_hash};
    let wire = WireDtype::Bf16;
    let mut trainer = bench_trainer(args, device, w)?;
    let config = trainer.model().config.clone();
    let mut last = named_tensors(trainer.model(), wire);
    /// One compression's totals, and the receiver's weights it keeps up to date.
    struct Stream {
        compression: Compression,
        held: Vec<grail_protocol::NamedTensor>,
        bytes: usize,
        encode_s: f64,
        apply_s: f64,
        hash_s: f64,
    }
    let mut streams: Vec<Stream> = [Compression::Zstd, Compression::Lz4]
        .into_iter()
        .map(|compression| Stream {
            compression,
            held: last.clone(),
            bytes: 0,
            encode_s: 0.0,
            apply_s: 0.0,
            hash_s: 0.0,
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut read_s = 0.0;
    let steps = w.steps.max(1);
    for _ in 0..steps {
        random_step(&mut trainer, &mut rng)?;
        let t = Instant::now();
        let now = named_tensors(trainer.model(), wire);
        read_s += t.elapsed().as_secs_f64();
        let expected = weights_hash(&now, wire);
        for s in &mut streams {
            let t = Instant::now();
            let bytes = delta::encode_with(&last, &now, wire, s.compression);
            s.encode_s += t.elapsed().as_secs_f64();
            s.bytes += bytes.len();
            let t = Instant::now();
            delta::apply(&mut s.held, wire, &bytes)?;
            s.apply_s += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let hash = weights_hash(&s.held, wire);
            s.hash_s += t.elapsed().as_secs_f64();
            anyhow::ensure!(
                hash == expected,
                "the applied delta differs from the trainer's weights"
            );
        }
        last = now;
    }
    let n = steps as f64;
    let full = last.iter().map(|t| t.values.len()).sum::<usize>() * wire.value_bytes();
    for s in &streams {
        println!(
            "{}",
            json!({
                "bench": "weight-sync", "device": args.device, "params": config.num_parameters(),
                "weights": if w.model_dir.is_some() { "checkpoint" } else { "random" }, "lr": w.lr,
                "steps": steps, "wire": "bf16", "compression": s.compression, "full_bytes": full,
                "delta_bytes_mean": s.bytes as f64 / n, "delta_over_full": s.bytes as f64 / n / full as f64,
                "read_s_mean": read_s / n, "encode_s_mean": s.encode_s / n,
                "apply_s_mean": s.apply_s / n, "hash_s_mean": s.hash_s / n,
                "peak_rss_bytes": peak_rss_bytes(),
            })
        );
    }
    Ok(())
}

/// A trainer for the weight benches: the checkpoint `w.model_dir`, or a seeded random init of
/// `w.model`'s shape, taking AdamW steps at `w.lr`.
fn bench_trainer(
    args: &Args,
    device: &Device,
    w: &WeightSyncArgs,
) -> Result<grail_trainer::trainer::GrpoTrainer> {
    let autodiff = device.clone().autodiff();
    let policy = match &w.model_dir {
        Some(dir) => grail_core::checkpoint::load_model(dir, &autodiff)?,
        None => CausalLm::init(&w.model.model_config()?, args.seed, &autodiff),
    };
    let cfg = grail_trainer::config::TrainerConfig {
        learning_rate: w.lr,
        // Random behaviour log-probs: a mask would zero the update these benches measure.
        importance_sampling_correction: false,
        ..Default::default()
    };
    Ok(grail_trainer::trainer::GrpoTrainer::new(policy, None, cfg)?)
}

/// One real AdamW step on a group of 8 random completions of 48 tokens.
fn random_step(trainer: &mut grail_trainer::trainer::GrpoTrainer, rng: &mut StdRng) -> Result<()> {
    use grail_protocol::{Group, Sample};
    let vocab = trainer.model().config.vocab_size as u32;
    let samples = (0..8)
        .map(|_| {
            Sample::new(
                (0..48).map(|_| rng.random_range(0..vocab)).collect(),
                vec![0.0; 48],
                vec![rng.random_range(0.0..1.0f32)],
                trainer.version(),
            )
        })
        .collect();
    let prompt = std::sync::Arc::new((0..16).map(|_| rng.random_range(0..vocab)).collect());
    trainer.train_step(&[Group {
        prompt_id: 0,
        prompt_ids: prompt,
        samples,
    }])?;
    Ok(())
}

/// Flags of the weight benches (weight-sync, store-sync): which weights, how many steps.
#[derive(clap::Args, Debug)]
struct WeightSyncArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A Hugging Face checkpoint to start from (real weights) instead of a seeded random init
    /// of the shape flags.
    #[arg(long = "model")]
    model_dir: Option<std::path::PathBuf>,
    /// Optimizer steps to publish.
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Learning rate of those steps.
    #[arg(long, default_value_t = 1e-6)]
    lr: f64,
}

#[derive(clap::Args, Debug)]
struct TrainerStepArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Sequence lengths (prompt + completion), comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "128,96,64,32,120,80,48,16"
    )]
    lens: Vec<usize>,
    /// Prompt tokens at the start of every sequence (the rest is completion).
    #[arg(long, default_value_t = 15)]
    prompt_len: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Token budget per micro-batch.
    #[arg(long, default_value_t = 4096)]
    max_tokens_per_microbatch: usize,
    /// Pad every micro-batch to its longest sequence instead of packing.
    #[arg(long)]
    no_packing: bool,
    /// Use the unfused log_softmax + gather log-prob path.
    #[arg(long)]
    naive_logprob: bool,
    /// Plain tensor math instead of the fused RMSNorm / SwiGLU / RoPE / varlen attention kernels.
    #[arg(long)]
    no_fused_ops: bool,
    /// Recompute π_prox for the importance-sampling correction, as the default trainer config
    /// does (off by default here: the PyTorch reference step has no such forward).
    #[arg(long)]
    is_correction: bool,
    /// Recompute the decoder layers in the backward instead of keeping their activations.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Also check the step's samples as a trainer checks an untrusted worker's
    /// (`grail_rollout::verify`: packed forwards at the samples' version, every log-prob,
    /// K = 32 challenged sketches and tokens) and report that time beside the step's.
    #[arg(long)]
    verify: bool,
    /// With --verify: the share of the step's samples checked (the first ⌈share · n⌉, standing
    /// in for the groups `grpo.verify_fraction` picks).
    #[arg(long, default_value_t = 1.0)]
    verify_fraction: f64,
}

/// Peak resident set size of this process (Linux `VmHWM`), 0 where unknown.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn trainer_step_bench(args: &Args, t: &TrainerStepArgs, device: &Device) -> Result<()> {
    use burn::module::Module;
    use grail_protocol::proof::SketchCoefficients;
    use grail_protocol::{Group, Sample};
    use grail_rollout::sampling::SamplingConfig;
    use grail_rollout::verify::RolloutVerifier;
    use grail_trainer::config::TrainerConfig;
    use grail_trainer::flops::measure_peak_flops;
    use grail_trainer::loss::LossType;
    use grail_trainer::trainer::GrpoTrainer;

    let config = t.model.model_config()?;
    anyhow::ensure!(t.prompt_len >= 1, "--prompt-len must be at least 1");
    if let Some(short) = t.lens.iter().find(|&&l| l <= t.prompt_len) {
        anyhow::bail!(
            "--lens: {short} leaves no completion after --prompt-len {}",
            t.prompt_len
        );
    }
    let mut rng = StdRng::seed_from_u64(args.seed);
    let vocab = config.vocab_size as u32;
    let prompt: Vec<u32> = (0..t.prompt_len)
        .map(|_| rng.random_range(0..vocab))
        .collect();
    let samples = t
        .lens
        .iter()
        .map(|&len| {
            let c = len - t.prompt_len;
            Sample::new(
                (0..c).map(|_| rng.random_range(0..vocab)).collect(),
                vec![0.0; c],
                vec![rng.random_range(0.0..1.0f32)],
                0,
            )
        })
        .collect();
    let mut groups = vec![Group {
        prompt_id: 0,
        prompt_ids: std::sync::Arc::new(prompt),
        samples,
    }];

    let peak = measure_peak_flops(device, 2048);
    let mut cfg = TrainerConfig {
        learning_rate: 1e-5,
        max_tokens_per_microbatch: t.max_tokens_per_microbatch,
        packing: !t.no_packing,
        naive_logprob: t.naive_logprob,
        // Off by default as in the PyTorch reference step (no extra proximal forward).
        importance_sampling_correction: t.is_correction,
        gradient_checkpointing: t.gradient_checkpointing,
        ..TrainerConfig::default()
    };
    cfg.loss.loss_type = LossType::Dapo;
    let model = CausalLm::init(&config, args.seed, &device.clone().autodiff())
        .with_fused_ops(!t.no_fused_ops);
    let fused_ops = model.uses_fused_ops();
    // The verifier checks against the weights that sampled (version 0): the samples get the
    // log-probs and sketches an honest worker would send, so every check runs to its end.
    let sampled_by = model.valid();
    let verifier = RolloutVerifier::new([1; 32], [2; 32], SamplingConfig::default());
    if t.verify {
        let coefficients = SketchCoefficients::for_version(&verifier.sketch_seed, 0);
        let prompt = groups[0].prompt_ids.clone();
        for s in &mut groups[0].samples {
            let hidden = sampled_by.completion_hidden(&prompt, &s.completion_ids)?;
            s.behaviour_logps = sampled_by.token_logprobs(hidden.clone(), &s.completion_ids, 1.0);
            let hidden: Vec<f32> = hidden
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .map_err(|e| anyhow::anyhow!("hidden states to the host: {e:?}"))?;
            s.sketches = coefficients.sketches(&hidden, config.hidden_size);
        }
    }
    anyhow::ensure!(
        t.verify_fraction > 0.0 && t.verify_fraction <= 1.0,
        "--verify-fraction {}: must be in (0, 1]",
        t.verify_fraction
    );
    let verified = (t.verify_fraction * t.lens.len() as f64).ceil() as usize;
    let verify = |groups: &[Group]| -> Result<f64> {
        let start = std::time::Instant::now();
        let g = &groups[0];
        let items: Vec<(&[u32], &Sample)> = g.samples[..verified.min(g.samples.len())]
            .iter()
            .map(|s| (g.prompt_ids.as_slice(), s))
            .collect();
        for r in verifier.check_all(&|_| Some(sampled_by.clone()), &items) {
            r.map_err(|r| anyhow::anyhow!("an honest sample was rejected: {r}"))?;
        }
        Ok(start.elapsed().as_secs_f64())
    };
    let mut trainer = GrpoTrainer::new(model, None, cfg)?.with_peak_flops(peak);
    trainer.train_step(&groups)?; // warm-up
    let mut verify_secs = 0.0;
    if t.verify {
        verify(&groups)?; // warm-up
    }
    let mut secs = 0.0;
    let mut last = None;
    let mut times = [0.0f64; 5];
    for _ in 0..t.steps.max(1) {
        let m = trainer
            .train_step(&groups)?
            .into_metrics()
            .pop()
            .expect("one step");
        secs += m.seconds;
        let s = &m.times;
        for (acc, v) in times.iter_mut().zip([
            s.prepare_s,
            s.forward_s,
            s.loss_s,
            s.backward_s,
            s.optimizer_s,
        ]) {
            *acc += v / t.steps.max(1) as f64;
        }
        last = Some(m);
        if t.verify {
            verify_secs += verify(&groups)?;
        }
    }
    let m = last.expect("at least one step");
    let s_per_step = secs / t.steps.max(1) as f64;
    let verify_s_per_step = verify_secs / t.steps.max(1) as f64;
    println!(
        "{}",
        json!({
            "bench": "trainer-step", "device": args.device,
            "params": config.num_parameters(), "lens": t.lens, "prompt_len": t.prompt_len,
            "packing": !t.no_packing, "fused_logprob": !t.naive_logprob, "fused_ops": fused_ops,
            "real_tokens": m.real_tokens, "micro_batches": m.micro_batches,
            "tokens_per_s": m.real_tokens as f64 / s_per_step, "s_per_step": s_per_step,
            "flops_per_step": m.flops, "peak_flops": peak, "mfu": m.flops / s_per_step / peak,
            "packing_efficiency": m.packing_efficiency, "peak_rss_bytes": peak_rss_bytes(),
            "steps": t.steps, "is_correction": t.is_correction,
            "gradient_checkpointing": t.gradient_checkpointing,
            "verify": t.verify, "verify_fraction": t.verify_fraction,
            "verified_samples": if t.verify { verified } else { 0 },
            "verify_s_per_step": verify_s_per_step,
            "verify_over_step": verify_s_per_step / s_per_step,
            "ms_per_step": {
                "prepare": times[0] * 1e3, "forward": times[1] * 1e3, "loss": times[2] * 1e3,
                "backward": times[3] * 1e3, "optimizer": times[4] * 1e3,
            },
        })
    );
    Ok(())
}

fn logprob_bench(
    args: &Args,
    device: &Device,
    tokens: usize,
    hidden: usize,
    vocab: usize,
    naive: bool,
) -> Result<()> {
    use burn::tensor::Distribution;
    use grail_kernels::{
        ChunkSizes, naive_selective_logprobs, selective_logprobs_backward,
        selective_logprobs_forward,
    };
    let h = Tensor::<2>::random([tokens, hidden], Distribution::Normal(0.0, 1.0), device);
    let w = Tensor::<2>::random([vocab, hidden], Distribution::Normal(0.0, 0.05), device);
    let mut rng = StdRng::seed_from_u64(args.seed);
    let ids: Vec<i64> = (0..tokens)
        .map(|_| rng.random_range(0..vocab as i64))
        .collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(ids, [tokens]), device);
    let g = Tensor::<1>::ones([tokens], device);
    let rss_before = peak_rss_bytes();
    let secs = median_secs(args.reps, device, || {
        if naive {
            let ha = h.clone().autodiff().require_grad();
            let wa = w.clone().autodiff().require_grad();
            let lp =
                naive_selective_logprobs(ha.clone(), wa.clone(), targets.clone().autodiff(), 1.0);
            let grads = (lp * g.clone().autodiff()).sum().backward();
            let _ = wa.grad(&grads).expect("grad").sum().into_scalar::<f32>();
        } else {
            let chunks = ChunkSizes::default();
            let out = selective_logprobs_forward(&h, &w, &targets, 1.0, chunks, false);
            let (gh, gw) = selective_logprobs_backward(&h, &w, &targets, &out.lse, &g, 1.0, chunks);
            let _ = (gh.sum() + gw.sum()).into_scalar::<f32>();
        }
    });
    println!(
        "{}",
        json!({
            "bench": "logprob", "path": if naive { "naive" } else { "fused" }, "device": args.device,
            "tokens": tokens, "hidden": hidden, "vocab": vocab, "seconds": secs,
            "peak_rss_bytes": peak_rss_bytes(), "rss_before_bytes": rss_before,
            "logits_bytes_if_materialised": tokens * vocab * 4,
        })
    );
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = parse_device(&args.device)?;
    match &args.bench {
        Bench::Rollout {
            model,
            batch,
            prompt_len,
            new_tokens,
            prompts,
            num_generations,
            bf16_weights,
            shared_prefix,
            no_prefix_caching,
            row_major_weights,
        } => {
            let shape = RolloutShape {
                batch: *batch,
                prompts: prompts.unwrap_or(*batch),
                num_generations: *num_generations,
                prompt_len: *prompt_len,
                new_tokens: *new_tokens,
                bf16_weights: *bf16_weights,
                shared_prefix: *shared_prefix,
                prefix_caching: !*no_prefix_caching,
                panels: !*row_major_weights,
            };
            rollout_bench(&args, &device, model, shape)
        }
        Bench::WeightSync(w) => weight_sync_bench(&args, &device, w),
        Bench::StoreSync(s) => store_sync::store_sync_bench(&args, &device, s),
        Bench::Logprob {
            tokens,
            hidden,
            vocab,
            naive,
        } => logprob_bench(&args, &device, *tokens, *hidden, *vocab, *naive),
        Bench::TrainerStep(t) => trainer_step_bench(&args, t, &device),
        Bench::Op(o) => ops_bench::op_bench(o, &device, peak_rss_bytes),
        Bench::Forward {
            sequences,
            min_len,
            max_len,
        } => forward_bench(&args, &device, *sequences, *min_len, *max_len),
    }
}
