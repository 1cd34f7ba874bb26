//! Each fused op equals its unfused tensor-math reference, in values and gradients (relative error
//! ≤ 1e-5 in f32), on random inputs of odd sizes: segments of length 1, lengths that are not
//! multiples of anything, padding tokens, GQA ratios 1, 2 and 4.

use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Bool, Device, Distribution, Tensor, TensorData};
use grail_core::fused::ops::{rms_norm, rope, supported, swiglu, varlen_attention};

fn device() -> Device {
    Device::flex().autodiff()
}

fn random<const D: usize>(shape: [usize; D], seed: u64) -> Tensor<D> {
    let device = device();
    device.seed(seed);
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &device)
}

fn rel<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f64 {
    let a: Vec<f32> = a.into_data().try_to_vec().unwrap();
    let b: Vec<f32> = b.into_data().try_to_vec().unwrap();
    let num: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Unfused reference: per segment, softmax(q kᵀ · scale + causal mask) v, GQA by repetition.
fn reference_attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    segments: &[(usize, usize)],
    scale: f32,
) -> Tensor<3> {
    let [tokens, heads, d] = q.dims();
    let kv = k.dims()[1];
    let group = heads / kv;
    let device = q.device();
    let mut parts = Vec::new();
    let mut at = 0;
    for &(start, len) in segments {
        assert_eq!(start, at, "segments are contiguous in these tests");
        let take = |t: &Tensor<3>| t.clone().narrow(0, start, len).swap_dims(0, 1); // [h, len, d]
        let qs = take(&q);
        let expand = |t: Tensor<3>| {
            t.reshape([kv, 1, len, d])
                .expand([kv, group, len, d])
                .reshape([heads, len, d])
        };
        let (ks, vs) = (expand(take(&k)), expand(take(&v)));
        let mask: Vec<bool> = (0..len * len).map(|i| i % len > i / len).collect();
        let mask = Tensor::<2, Bool>::from_data(TensorData::new(mask, [len, len]), &device)
            .reshape([1, len, len])
            .expand([heads, len, len]);
        let scores = qs.matmul(ks.swap_dims(1, 2)) * scale;
        let p = softmax(scores.mask_fill(mask, f32::NEG_INFINITY), 2);
        parts.push(p.matmul(vs).swap_dims(0, 1));
        at += len;
    }
    if at < tokens {
        parts.push(Tensor::zeros([tokens - at, heads, d], &device));
    }
    Tensor::cat(parts, 0)
}

#[test]
fn varlen_attention_equals_the_reference_in_values_and_gradients() {
    assert!(supported(&device()));
    for (heads, kv) in [(4, 4), (4, 2), (8, 2)] {
        let d = 6;
        // Lengths 1, 13, 1, 30, 150 (three query tiles, the last partial) and 3 padding tokens.
        let segments = [(0, 1), (1, 13), (14, 1), (15, 30), (45, 150)];
        let tokens = 198;
        let q = random([tokens, heads, d], 1).require_grad();
        let k = random([tokens, kv, d], 2).require_grad();
        let v = random([tokens, kv, d], 3).require_grad();
        let w = random([tokens, heads, d], 4);
        let fused = varlen_attention(q.clone(), k.clone(), v.clone(), &segments, 0.37);
        let reference = reference_attention(q.clone(), k.clone(), v.clone(), &segments, 0.37);
        let e = rel(fused.clone(), reference.clone());
        assert!(e <= 1e-5, "H={heads} KV={kv}: values rel err {e:e}");
        let gf = (fused * w.clone()).sum().backward();
        let gr = (reference * w).sum().backward();
        for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
            let e = rel(t.grad(&gf).unwrap(), t.grad(&gr).unwrap());
            assert!(e <= 1e-5, "H={heads} KV={kv}: d{name} rel err {e:e}");
        }
    }
}

#[test]
fn rms_norm_equals_the_reference() {
    let x = random([37, 24], 5).require_grad();
    let w = random([24], 6).require_grad();
    let g = random([37, 24], 7);
    let eps = 1e-6;
    let fused = rms_norm(x.clone(), w.clone(), eps);
    let r = (x.clone().square().mean_dim(1) + eps as f64).sqrt().recip();
    let reference = x.clone() * r * w.clone().reshape([1, 24]);
    assert!(rel(fused.clone(), reference.clone()) <= 1e-5);
    let gf = (fused * g.clone()).sum().backward();
    let gr = (reference * g).sum().backward();
    for (name, e) in [
        ("x", rel(x.grad(&gf).unwrap(), x.grad(&gr).unwrap())),
        ("w", rel(w.grad(&gf).unwrap(), w.grad(&gr).unwrap())),
    ] {
        assert!(e <= 1e-5, "d{name} rel err {e:e}");
    }
}

#[test]
fn swiglu_equals_the_reference() {
    let gate = random([19, 33], 8).require_grad();
    let up = random([19, 33], 9).require_grad();
    let g = random([19, 33], 10);
    let fused = swiglu(gate.clone(), up.clone());
    let reference = silu(gate.clone()) * up.clone();
    assert!(rel(fused.clone(), reference.clone()) <= 1e-5);
    let gf = (fused * g.clone()).sum().backward();
    let gr = (reference * g).sum().backward();
    for (name, e) in [
        (
            "gate",
            rel(gate.grad(&gf).unwrap(), gate.grad(&gr).unwrap()),
        ),
        ("up", rel(up.grad(&gf).unwrap(), up.grad(&gr).unwrap())),
    ] {
        assert!(e <= 1e-5, "d{name} rel err {e:e}");
    }
}

#[test]
fn rope_equals_rotate_half() {
    let (tokens, heads, d) = (11, 3, 10);
    let x = random([tokens, heads, d], 11).require_grad();
    let g = random([tokens, heads, d], 12);
    // HF tables: both halves hold the same angles.
    let angles = random([tokens, d / 2], 13).without_autodiff();
    let angles = Tensor::cat(vec![angles.clone(), angles], 1);
    let (cos, sin) = (angles.clone().cos(), angles.sin());
    let cos = Tensor::<2>::from_data(cos.into_data(), &device());
    let sin = Tensor::<2>::from_data(sin.into_data(), &device());
    let fused = rope(x.clone(), cos.clone(), sin.clone());
    let half = d / 2;
    let rotated = Tensor::cat(
        vec![
            x.clone().narrow(2, half, half).neg(),
            x.clone().narrow(2, 0, half),
        ],
        2,
    );
    let reference = x.clone() * cos.reshape([tokens, 1, d]) + rotated * sin.reshape([tokens, 1, d]);
    assert!(rel(fused.clone(), reference.clone()) <= 1e-5);
    let gf = (fused * g.clone()).sum().backward();
    let gr = (reference * g).sum().backward();
    let e = rel(x.grad(&gf).unwrap(), x.grad(&gr).unwrap());
    assert!(e <= 1e-5, "dx rel err {e:e}");
}

#[test]
fn fused_ops_run_without_autodiff_too() {
    let device = Device::flex();
    let x = Tensor::<2>::ones([2, 4], &device);
    let w = Tensor::<1>::ones([4], &device);
    let y: Vec<f32> = rms_norm(x, w, 0.0).into_data().try_to_vec().unwrap();
    assert!(y.iter().all(|&v| (v - 1.0).abs() < 1e-6));
}

#[test]
fn the_model_gives_the_same_outputs_and_gradients_with_fused_ops_on_and_off() {
    use burn::tensor::Int;
    use grail_core::model::{CausalLm, Layout, ModelConfig};
    // GQA 2, odd lengths, two packed rows with a padding tail.
    let config = ModelConfig::qwen2(97, 48, 80, 2, 4, 2, 256, false);
    let fused = CausalLm::init(&config, 3, &device());
    let plain = fused.clone().with_fused_ops(false);
    assert!(fused.uses_fused_ops() && !plain.uses_fused_ops());
    let lens = vec![vec![1, 37, 70], vec![65, 11]];
    let cols = 110;
    let ids: Vec<i64> = (0..2 * cols).map(|i| (i * 7 % 97) as i64).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, cols]), &device());
    let layout = Layout::Packed { rows: lens };
    let w = random([2, cols, 97], 14);
    let out_f = fused.forward(ids.clone(), &layout).unwrap();
    let out_p = plain.forward(ids, &layout).unwrap();
    // Padding positions differ by design (zeros vs attention over padding): compare the first
    // 76 columns, real tokens in both rows.
    let e = rel(
        out_f.clone().narrow(1, 0, 76),
        out_p.clone().narrow(1, 0, 76),
    );
    assert!(e <= 1e-5, "logits rel err {e:e}");
    let gf = (out_f.narrow(1, 0, 76) * w.clone().narrow(1, 0, 76))
        .sum()
        .backward();
    let gp = (out_p.narrow(1, 0, 76) * w.narrow(1, 0, 76))
        .sum()
        .backward();
    let weights = |m: &CausalLm| {
        let l = &m.model.layers[1];
        vec![
            l.self_attn.q_proj.weight.val(),
            l.self_attn.k_proj.weight.val(),
            l.mlp.gate_proj.weight.val(),
        ]
    };
    for (a, b) in weights(&fused).into_iter().zip(weights(&plain)) {
        let e = rel(a.grad(&gf).unwrap(), b.grad(&gp).unwrap());
        assert!(e <= 1e-5, "gradient rel err {e:e}");
    }
    let norm_f = fused.model.layers[0]
        .input_layernorm
        .weight
        .val()
        .grad(&gf)
        .unwrap();
    let norm_p = plain.model.layers[0]
        .input_layernorm
        .weight
        .val()
        .grad(&gp)
        .unwrap();
    assert!(rel(norm_f, norm_p) <= 1e-5);
}

#[test]
fn linear_equals_matmul_by_the_transposed_weight() {
    use grail_core::fused::ops::linear;
    let x = random([37, 19], 15).require_grad();
    let w = random([23, 19], 16).require_grad();
    let g = random([37, 23], 17);
    let fused = linear(x.clone(), w.clone());
    let reference = x.clone().matmul(w.clone().transpose());
    assert!(rel(fused.clone(), reference.clone()) <= 1e-5);
    let gf = (fused * g.clone()).sum().backward();
    let gr = (reference * g).sum().backward();
    assert!(rel(x.grad(&gf).unwrap(), x.grad(&gr).unwrap()) <= 1e-5);
    assert!(rel(w.grad(&gf).unwrap(), w.grad(&gr).unwrap()) <= 1e-5);
}

#[test]
fn sum_squares_and_scale_match_tensor_math() {
    use grail_core::fused::ops::{scale, sum_squares};
    let x = random([300, 70], 18).without_autodiff();
    let want = x.clone().square().sum().into_scalar::<f64>();
    assert!((sum_squares(x.clone()) - want).abs() <= 1e-5 * want);
    assert!(rel(scale(x.clone(), 0.3), x * 0.3) <= 1e-7);
}

#[test]
fn cached_generation_gives_the_same_logits_with_fused_ops_on_and_off() {
    use grail_core::model::{CausalLm, KvCache, ModelConfig};
    let config = ModelConfig::qwen2(61, 32, 48, 2, 4, 2, 256, true);
    let fused = CausalLm::init(&config, 5, &Device::flex());
    let plain = fused.clone().with_fused_ops(false);
    let run = |m: &CausalLm| {
        let mut caches = vec![KvCache::new(2), KvCache::new(2), KvCache::new(2)];
        let mut out = Vec::new();
        // Prefill prompts of 1, 70 (two query tiles) and 5 tokens, then mixed decode steps.
        let prompts: Vec<Vec<u32>> = vec![
            vec![3],
            (0..70).map(|i| i % 61).collect(),
            vec![9, 8, 7, 6, 5],
        ];
        let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        out.push(m.forward_cached(&refs, &mut caches).unwrap());
        for step in 0..3u32 {
            let next = [[step + 1], [step + 20], [step + 40]];
            let refs: Vec<&[u32]> = next.iter().map(|t| t.as_slice()).collect();
            out.push(m.forward_cached(&refs, &mut caches).unwrap());
        }
        out
    };
    for (a, b) in run(&fused).into_iter().zip(run(&plain)) {
        let e = rel(a, b);
        assert!(e <= 1e-5, "cached logits rel err {e:e}");
    }
}
