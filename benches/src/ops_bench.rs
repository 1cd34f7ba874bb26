//! `grail-bench op`: one fused op against its unfused tensor-math version, forward + backward,
//! time (median) and this process's peak memory. Run the two paths as separate processes so each
//! peak RSS is its own.

use anyhow::Result;
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Bool, Device, Distribution, Tensor, TensorData};
use grail_kernels as ops;
use serde_json::json;

/// Which op to measure.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Op {
    /// Causal attention over a packed row of segments (varlen).
    Attention,
    /// RMSNorm over the hidden axis.
    RmsNorm,
    /// silu(gate) · up.
    Swiglu,
    /// Rotate-half RoPE on q.
    Rope,
    /// x · Wᵀ (the MLP up projection's shape).
    Linear,
}

/// Shapes of the op bench (Qwen2-0.5B-like by default).
#[derive(clap::Args, Debug)]
pub struct OpArgs {
    /// The op.
    #[arg(long, value_enum)]
    pub op: Op,
    /// Tokens in the packed row.
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 896)]
    pub hidden: usize,
    /// Query heads.
    #[arg(long, default_value_t = 14)]
    pub heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    /// MLP width.
    #[arg(long, default_value_t = 4864)]
    pub inter: usize,
    /// Run the unfused tensor-math version.
    #[arg(long)]
    pub unfused: bool,
}

/// Timed runs per op (the median is reported).
const REPS: usize = 5;

fn random<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device).require_grad()
}

/// Segment lengths cycling through the trainer bench's lengths until `tokens` are covered.
fn segments(tokens: usize) -> Vec<(usize, usize)> {
    let lens = [128, 96, 64, 32, 120, 80, 48, 16];
    let mut out = Vec::new();
    let mut at = 0;
    for &len in lens.iter().cycle() {
        if at >= tokens {
            break;
        }
        let len = len.min(tokens - at);
        out.push((at, len));
        at += len;
    }
    out
}

fn unfused_attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    segs: &[(usize, usize)],
) -> Tensor<3> {
    let [_, heads, d] = q.dims();
    let kv = k.dims()[1];
    let group = heads / kv;
    let device = q.device();
    let scale = 1.0 / (d as f64).sqrt();
    let parts = segs
        .iter()
        .map(|&(start, len)| {
            let take = |t: &Tensor<3>| t.clone().narrow(0, start, len).swap_dims(0, 1);
            let expand = |t: Tensor<3>| {
                t.reshape([kv, 1, len, d])
                    .expand([kv, group, len, d])
                    .reshape([heads, len, d])
            };
            let mask: Vec<bool> = (0..len * len).map(|i| i % len > i / len).collect();
            let mask = Tensor::<2, Bool>::from_data(TensorData::new(mask, [len, len]), &device)
                .reshape([1, len, len])
                .expand([heads, len, len]);
            let s = take(&q).matmul(expand(take(&k)).swap_dims(1, 2)) * scale;
            softmax(s.mask_fill(mask, f32::NEG_INFINITY), 2)
                .matmul(expand(take(&v)))
                .swap_dims(0, 1)
        })
        .collect();
    Tensor::cat(parts, 0)
}

fn run(a: &OpArgs, device: &Device) -> f64 {
    let (t, h, d) = (a.tokens, a.heads, a.hidden / a.heads);
    match a.op {
        Op::Attention => {
            let (q, k, v) = (
                random([t, h, d], device),
                random([t, a.kv_heads, d], device),
                random([t, a.kv_heads, d], device),
            );
            let segs = segments(t);
            let g = upstream([t, h, d], device);
            crate::median_secs(REPS, device, || {
                let out = if a.unfused {
                    unfused_attention(q.clone(), k.clone(), v.clone(), &segs)
                } else {
                    ops::varlen_attention(
                        q.clone(),
                        k.clone(),
                        v.clone(),
                        &segs,
                        1.0 / (d as f32).sqrt(),
                    )
                };
                let _ = (out * g.clone()).sum().backward();
            })
        }
        Op::RmsNorm => {
            let (x, w) = (random([t, a.hidden], device), random([a.hidden], device));
            let g = upstream([t, a.hidden], device);
            crate::median_secs(REPS, device, || {
                let out = if a.unfused {
                    let r = (x.clone().square().mean_dim(1) + 1e-6).sqrt().recip();
                    x.clone() * r * w.clone().reshape([1, a.hidden])
                } else {
                    ops::rms_norm(x.clone(), w.clone(), 1e-6)
                };
                let _ = (out * g.clone()).sum().backward();
            })
        }
        Op::Swiglu => {
            let (gate, u) = (random([t, a.inter], device), random([t, a.inter], device));
            let g = upstream([t, a.inter], device);
            crate::median_secs(REPS, device, || {
                let out = if a.unfused {
                    silu(gate.clone()) * u.clone()
                } else {
                    ops::swiglu(gate.clone(), u.clone())
                };
                let _ = (out * g.clone()).sum().backward();
            })
        }
        Op::Rope => {
            let x = random([t, h, d], device);
            let cos = Tensor::<2>::ones([t, d], device)
                .without_autodiff()
                .autodiff();
            let sin = cos.clone() * 0.5;
            let g = upstream([t, h, d], device);
            crate::median_secs(REPS, device, || {
                let out = if a.unfused {
                    let half = d / 2;
                    let rotated = Tensor::cat(
                        vec![
                            x.clone().narrow(2, half, half).neg(),
                            x.clone().narrow(2, 0, half),
                        ],
                        2,
                    );
                    x.clone() * cos.clone().reshape([t, 1, d])
                        + rotated * sin.clone().reshape([t, 1, d])
                } else {
                    ops::rope(x.clone(), cos.clone(), sin.clone())
                };
                let _ = (out * g.clone()).sum().backward();
            })
        }
        Op::Linear => {
            let (x, w) = (
                random([t, a.hidden], device),
                random([a.inter, a.hidden], device),
            );
            let g = upstream([t, a.inter], device);
            crate::median_secs(REPS, device, || {
                let out = if a.unfused {
                    x.clone().matmul(w.clone().transpose())
                } else {
                    ops::linear(x.clone(), w.clone())
                };
                let _ = (out * g.clone()).sum().backward();
            })
        }
    }
}

/// A constant upstream gradient of `shape` (contiguous, as inside a model; not `sum()`'s
/// broadcast one).
fn upstream<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    let g = Tensor::<D>::random(shape, Distribution::Normal(0.0, 1.0), device).without_autodiff();
    Tensor::<D>::from_data(g.into_data(), device)
}

/// Runs the op bench and prints its JSON line.
pub fn op_bench(a: &OpArgs, device: &Device, peak_rss: impl Fn() -> u64) -> Result<()> {
    anyhow::ensure!(
        a.hidden.is_multiple_of(a.heads) && a.heads.is_multiple_of(a.kv_heads),
        "hidden must split over heads, and kv_heads divide heads"
    );
    anyhow::ensure!(
        ops::supported(device) || a.unfused,
        "the fused ops have no kernels on {device:?}; pass --unfused"
    );
    let device = device.clone().autodiff();
    let seconds = run(a, &device);
    println!(
        "{}",
        json!({
            "bench": "op", "op": format!("{:?}", a.op), "fused": !a.unfused,
            "tokens": a.tokens, "hidden": a.hidden, "heads": a.heads, "kv_heads": a.kv_heads,
            "inter": a.inter, "fwd_bwd_seconds": seconds, "peak_rss_bytes": peak_rss(),
        })
    );
    Ok(())
}
