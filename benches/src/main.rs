//! `grail-bench`: benchmarks that print one JSON object per line.
//!
//! `cargo run --release -p grail-benches --bin grail-bench -- forward` measures the model's
//! forward throughput (real tokens per second) on a padded batch and on packed rows of the same
//! sequences, in one run, for a ~5M-parameter Qwen2 configuration on the chosen device.

use std::time::Instant;

use anyhow::Result;
use burn::tensor::{Device, Int, Tensor, TensorData};
use clap::{Parser, Subcommand};
use grail_core::device::parse_device;
use grail_core::model::{CausalLm, Layout, ModelConfig};
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
    /// Compute device: cpu, vulkan[:N] or cuda[:N].
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

/// The ~5M-parameter Qwen2 shape used across grail's CPU benchmarks.
fn bench_config() -> ModelConfig {
    ModelConfig::qwen2(8192, 256, 704, 4, 4, 2, 2048, true)
}

fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let mut times: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
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
            let secs = median_secs(args.reps, || {
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

fn main() -> Result<()> {
    let args = Args::parse();
    let device = parse_device(&args.device)?;
    match args.bench {
        Bench::Forward {
            sequences,
            min_len,
            max_len,
        } => forward_bench(&args, &device, sequences, min_len, max_len),
    }
}
