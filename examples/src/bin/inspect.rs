//! Prints a Hugging Face checkpoint's config summary, its parameter count and a greedy
//! continuation of a prompt.
//!
//! `cargo run --release -p grail-examples --bin inspect -- <model dir> [--prompt TEXT] [--max-new-tokens N]`

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use grail_core::checkpoint::Checkpoint;
use grail_core::device::parse_device;
use grail_core::model::greedy;
use grail_core::tokenizer::Tokenizer;

#[derive(Parser, Debug)]
#[command(about = "Inspect a Hugging Face checkpoint and greedily continue a prompt")]
struct Args {
    /// Model directory (config.json + model.safetensors or a sharded index).
    model_dir: PathBuf,
    /// Prompt text (needs tokenizer.json in the model directory).
    #[arg(long, default_value = "The answer is")]
    prompt: String,
    /// Prompt token ids, comma-separated; used when there is no tokenizer.json.
    #[arg(long, default_value = "1,2,3,4,5,6,7")]
    prompt_ids: String,
    /// Number of tokens to generate.
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// Compute device: cpu, vulkan, vulkan:N, cuda or cuda:N (GPU ones need the matching feature).
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn main() -> Result<()> {
    grail::init_logging();
    let args = Args::parse();
    let device = parse_device(&args.device)?;
    let start = Instant::now();
    let checkpoint = Checkpoint::open(&args.model_dir)
        .with_context(|| format!("opening {}", args.model_dir.display()))?;
    let model = checkpoint.load(&device)?;
    let c = &model.config;
    println!(
        "model       {} ({})",
        args.model_dir.display(),
        c.family.architecture()
    );
    println!(
        "shape       hidden {} · intermediate {} · layers {} · heads {} (kv {}) · head_dim {}",
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim
    );
    println!(
        "vocab       {} · tied embeddings {} · rope_theta {} · rms_norm_eps {:e}",
        c.vocab_size, c.tie_word_embeddings, c.rope_theta, c.rms_norm_eps
    );
    println!(
        "parameters  {} ({:.2} M)",
        c.num_parameters(),
        c.num_parameters() as f64 / 1e6
    );
    println!(
        "stored as   {} · loaded in {:.2?}",
        checkpoint.dtype.hf_name(),
        start.elapsed()
    );

    let tokenizer = if args.model_dir.join("tokenizer.json").is_file() {
        Some(Tokenizer::from_dir(&args.model_dir)?)
    } else {
        None
    };
    let prompt: Vec<u32> = match &tokenizer {
        Some(tok) => tok.encode(&args.prompt, true)?,
        None => args
            .prompt_ids
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<u32>()
                    .with_context(|| format!("--prompt-ids: {s:?} is not a token id"))
            })
            .collect::<Result<_>>()?,
    };
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= c.vocab_size) {
        anyhow::bail!(
            "prompt token {bad} is outside the vocabulary ({})",
            c.vocab_size
        );
    }
    let start = Instant::now();
    let generated = greedy(&model, &prompt, args.max_new_tokens, true)?;
    let elapsed = start.elapsed();
    match &tokenizer {
        Some(tok) => {
            println!("prompt      {:?}", args.prompt);
            println!("greedy      {:?}", tok.decode(&generated, false)?);
        }
        None => {
            println!("prompt ids  {prompt:?}");
            println!("greedy ids  {generated:?}");
        }
    }
    println!(
        "decoded     {} tokens in {:.2?} ({:.1} tokens/s, KV cache)",
        generated.len(),
        elapsed,
        generated.len() as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}
