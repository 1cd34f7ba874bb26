//! Each fused op equals its unfused tensor-math reference, in values and gradients (relative error
//! ≤ 1e-5 in f32), on random inputs of odd sizes: segments of length 1, lengths that are not
//! multiples of anything, padding tokens, GQA ratios 1, 2 and 4.
//!
//! The references always run on Flex. The fused ops run on the device `GRAIL_TEST_DEVICE` names
//! (default `cpu`): with `--features vulkan`, `GRAIL_TEST_DEVICE=vulkan:cpu` runs the CubeCL
//! kernels on Mesa's lavapipe (CI does), `vulkan` on a GPU. burn's matmul and `sum()` use
//! shared-memory shaders that crash lavapipe's compiler, so the fused products run on grail's own
//! GEMM kernel on CPU adapters, and on the kernel device the tests seed backward with the upstream
//! gradient itself, `(y · g).backward()`, which burn starts from ones, instead of reducing with
//! `.sum()`.

use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use grail_kernels::{rms_norm, rope, supported, swiglu, varlen_attention};
use grail_testkit::{
    const_on_kernel, kernel_device, on_kernel, random, reference_device as device, rel,
};

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
fn op_varlen_attention_equals_the_reference_in_values_and_gradients() {
    assert!(supported(&kernel_device()));
    for (heads, kv) in [(4, 4), (4, 2), (8, 2)] {
        let d = 6;
        // Lengths 1, 13, 1, 30, 150 (three query tiles, the last partial) and 3 padding tokens.
        let segments = [(0, 1), (1, 13), (14, 1), (15, 30), (45, 150)];
        let tokens = 198;
        let q = random([tokens, heads, d], 1).require_grad();
        let k = random([tokens, kv, d], 2).require_grad();
        let v = random([tokens, kv, d], 3).require_grad();
        let w = random([tokens, heads, d], 4);
        let (qk, kk, vk) = (on_kernel(&q), on_kernel(&k), on_kernel(&v));
        let fused = varlen_attention(qk.clone(), kk.clone(), vk.clone(), &segments, 0.37);
        let reference = reference_attention(q.clone(), k.clone(), v.clone(), &segments, 0.37);
        let e = rel(fused.clone(), reference.clone());
        assert!(e <= 1e-5, "H={heads} KV={kv}: values rel err {e:e}");
        let gf = (fused * const_on_kernel(&w)).backward();
        let gr = (reference * w).sum().backward();
        for (name, tk, t) in [("q", &qk, &q), ("k", &kk, &k), ("v", &vk, &v)] {
            let e = rel(tk.grad(&gf).unwrap(), t.grad(&gr).unwrap());
            assert!(e <= 1e-5, "H={heads} KV={kv}: d{name} rel err {e:e}");
        }
    }
}

#[test]
fn op_cached_attention_equals_attention_over_the_whole_sequence() {
    use grail_kernels::{CachedSpan, cached_attention};
    let (heads, kv) = (4, 2);
    // Head widths off the 8-lane vectors, on them, and one past a 64-lane block.
    for d in [6, 16, 72] {
        // A prefill of 5 on an empty cache, decode steps on caches of 40 and 70, 2 new tokens on a
        // cache of 3; one padding row between the first two, one at the end.
        let spans = [
            CachedSpan {
                q_start: 0,
                q_len: 5,
                k_start: 0,
                k_len: 5,
            },
            CachedSpan {
                q_start: 6,
                q_len: 1,
                k_start: 5,
                k_len: 41,
            },
            CachedSpan {
                q_start: 7,
                q_len: 1,
                k_start: 46,
                k_len: 71,
            },
            CachedSpan {
                q_start: 8,
                q_len: 2,
                k_start: 117,
                k_len: 5,
            },
        ];
        let (tokens, keys) = (11, 122);
        let q = random([tokens, heads, d], 30);
        let k = random([keys, kv, d], 31);
        let v = random([keys, kv, d], 32);
        let out = cached_attention(
            const_on_kernel(&q),
            const_on_kernel(&k),
            const_on_kernel(&v),
            &spans,
            0.41,
        );
        let mut want = Tensor::<3>::zeros([tokens, heads, d], &device());
        for (i, s) in spans.iter().enumerate() {
            // The new queries are the last rows of a causal attention over the sequence's keys; the
            // earlier queries are arbitrary.
            let earlier = random([s.k_len - s.q_len, heads, d], 40 + i as u64);
            let q_full = Tensor::cat(vec![earlier, q.clone().narrow(0, s.q_start, s.q_len)], 0);
            let span = |t: &Tensor<3>| t.clone().narrow(0, s.k_start, s.k_len);
            let full = reference_attention(q_full, span(&k), span(&v), &[(0, s.k_len)], 0.41);
            let rows = s.q_start..s.q_start + s.q_len;
            want = want.slice_assign(
                [rows, 0..heads, 0..d],
                full.narrow(0, s.k_len - s.q_len, s.q_len),
            );
        }
        let e = rel(out, want);
        assert!(e <= 1e-5, "head width {d}: cached attention rel err {e:e}");
    }
}

/// Paged attention (keys in blocks of 4 positions handed out in a scrambled order, every other
/// pool row filled with large values a stray read would show) equals cached attention over the
/// same keys laid out contiguously.
#[test]
fn op_paged_attention_equals_cached_attention() {
    use grail_kernels::{CachedSpan, PagedSpan, cached_attention, paged_attention};
    let (heads, kv, d, block) = (4, 2, 16, 4);
    // A prefill of 5, decode steps on caches of 40 and 70 (block-aligned and not), 2 new tokens
    // on a cache of 3; padding rows between.
    let spans = [(0, 5, 0, 5), (6, 1, 5, 41), (7, 1, 46, 72), (8, 2, 118, 5)].map(
        |(q_start, q_len, k_start, k_len)| CachedSpan {
            q_start,
            q_len,
            k_start,
            k_len,
        },
    );
    let (tokens, keys) = (11, 123);
    let q = random([tokens, heads, d], 50);
    let k = random([keys, kv, d], 51);
    let v = random([keys, kv, d], 52);
    let num_blocks = 64;
    let mut free: Vec<u32> = (0..num_blocks as u32).map(|b| (b * 37) % 64).collect();
    let row = kv * d;
    let (kh, vh) = (
        k.to_data().try_to_vec::<f32>().unwrap(),
        v.to_data().try_to_vec::<f32>().unwrap(),
    );
    let mut pool_k = vec![1.0e3f32; num_blocks * block * row];
    let mut pool_v = vec![-1.0e3f32; num_blocks * block * row];
    let mut paged = Vec::new();
    for s in &spans {
        let blocks: Vec<u32> = (0..s.k_len.div_ceil(block))
            .map(|_| free.pop().unwrap())
            .collect();
        for p in 0..s.k_len {
            let at = (blocks[p / block] as usize * block + p % block) * row;
            let from = (s.k_start + p) * row;
            pool_k[at..at + row].copy_from_slice(&kh[from..from + row]);
            pool_v[at..at + row].copy_from_slice(&vh[from..from + row]);
        }
        paged.push(PagedSpan {
            q_start: s.q_start,
            q_len: s.q_len,
            k_len: s.k_len,
            blocks,
        });
    }
    let pool = |values: Vec<f32>| {
        const_on_kernel(&Tensor::<3>::from_data(
            TensorData::new(values, [num_blocks * block, kv, d]),
            &device(),
        ))
    };
    let out = paged_attention(
        const_on_kernel(&q),
        pool(pool_k),
        pool(pool_v),
        &paged,
        block,
        0.37,
    );
    let want = cached_attention(
        const_on_kernel(&q),
        const_on_kernel(&k),
        const_on_kernel(&v),
        &spans,
        0.37,
    );
    let e = rel(out, want);
    assert!(e <= 1e-6, "paged attention rel err {e:e}");
}

#[test]
fn op_rms_norm_equals_the_reference() {
    // 601 rows: more than two of the Cube weight gradient's row blocks, the last one partial.
    let x = random([601, 24], 5).require_grad();
    let w = random([24], 6).require_grad();
    let g = random([601, 24], 7);
    let eps = 1e-6;
    let (xk, wk) = (on_kernel(&x), on_kernel(&w));
    let fused = rms_norm(xk.clone(), wk.clone(), eps);
    let r = (x.clone().square().mean_dim(1) + eps as f64).sqrt().recip();
    let reference = x.clone() * r * w.clone().reshape([1, 24]);
    assert!(rel(fused.clone(), reference.clone()) <= 1e-5);
    let gf = (fused * const_on_kernel(&g)).backward();
    let gr = (reference * g).sum().backward();
    for (name, e) in [
        ("x", rel(xk.grad(&gf).unwrap(), x.grad(&gr).unwrap())),
        ("w", rel(wk.grad(&gf).unwrap(), w.grad(&gr).unwrap())),
    ] {
        assert!(e <= 1e-5, "d{name} rel err {e:e}");
    }
}

#[test]
fn op_swiglu_equals_the_reference() {
    let gate = random([19, 33], 8).require_grad();
    let up = random([19, 33], 9).require_grad();
    let g = random([19, 33], 10);
    let (gk, uk) = (on_kernel(&gate), on_kernel(&up));
    let fused = swiglu(gk.clone(), uk.clone());
    let reference = silu(gate.clone()) * up.clone();
    assert!(rel(fused.clone(), reference.clone()) <= 1e-5);
    let gf = (fused * const_on_kernel(&g)).backward();
    let gr = (reference * g).sum().backward();
    for (name, e) in [
        ("gate", rel(gk.grad(&gf).unwrap(), gate.grad(&gr).unwrap())),
        ("up", rel(uk.grad(&gf).unwrap(), up.grad(&gr).unwrap())),
    ] {
        assert!(e <= 1e-5, "d{name} rel err {e:e}");
    }
}

#[test]
fn op_rope_equals_rotate_half() {
    let (tokens, heads, d) = (11, 3, 10);
    let x = random([tokens, heads, d], 11).require_grad();
    let g = random([tokens, heads, d], 12);
    // HF tables: both halves hold the same angles.
    let angles = random([tokens, d / 2], 13).without_autodiff();
    let angles = Tensor::cat(vec![angles.clone(), angles], 1);
    let (cos, sin) = (angles.clone().cos(), angles.sin());
    let cos = Tensor::<2>::from_data(cos.into_data(), &device());
    let sin = Tensor::<2>::from_data(sin.into_data(), &device());
    let xk = on_kernel(&x);
    let fused = rope(xk.clone(), const_on_kernel(&cos), const_on_kernel(&sin));
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
    let gf = (fused * const_on_kernel(&g)).backward();
    let gr = (reference * g).sum().backward();
    let e = rel(xk.grad(&gf).unwrap(), x.grad(&gr).unwrap());
    assert!(e <= 1e-5, "dx rel err {e:e}");
}

#[test]
fn op_selective_logprobs_equal_log_softmax_gather() {
    use burn::tensor::activation::log_softmax;
    use grail_kernels::{ChunkSizes, selective_logprobs};
    // A vocabulary of 1,203: three of the Cube row kernel's vocabulary blocks, the last partial.
    let (n, h, v) = (45, 12, 1203);
    let temperature = 0.7;
    let hidden = random([n, h], 19).require_grad();
    let weight = (random([v, h], 20) * 0.3).detach().require_grad();
    let g = random([n], 21);
    let ids: Vec<i64> = (0..n).map(|i| ((i * 7919 + 13) % v) as i64).collect();
    let targets =
        |device: &Device| Tensor::<1, Int>::from_data(TensorData::new(ids.clone(), [n]), device);
    let logits = hidden.clone().matmul(weight.clone().transpose()) / temperature;
    let logp_all = log_softmax(logits, 1);
    let reference = logp_all
        .clone()
        .gather(1, targets(&device()).reshape([n, 1]))
        .reshape([n]);
    let entropy = (logp_all.clone().exp() * logp_all)
        .sum_dim(1)
        .neg()
        .reshape([n]);
    // Token tiles that do not divide the 45 tokens.
    let chunks = ChunkSizes {
        tokens: 16,
        vocab: 64,
    };
    let (hk, wk) = (on_kernel(&hidden), on_kernel(&weight));
    let (logp, ent) = selective_logprobs(
        hk.clone(),
        wk.clone(),
        targets(&kernel_device()),
        temperature,
        chunks,
        true,
    );
    assert!(rel(logp.clone(), reference.clone()) <= 1e-5);
    assert!(rel(ent, entropy.detach()) <= 1e-5);
    let gf = (logp * const_on_kernel(&g)).backward();
    let gr = (reference * g).sum().backward();
    assert!(rel(hk.grad(&gf).unwrap(), hidden.grad(&gr).unwrap()) <= 1e-5);
    assert!(rel(wk.grad(&gf).unwrap(), weight.grad(&gr).unwrap()) <= 1e-5);
}

#[test]
fn op_adamw_equals_the_formula() {
    use grail_kernels::{AdamWStep, adamw};
    let shape = [33, 17];
    let (p, g, m) = (random(shape, 22), random(shape, 23), random(shape, 24));
    let v = random(shape, 25).abs();
    let step = AdamWStep {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.99,
        epsilon: 1e-8,
        weight_decay: 0.1,
        time: 3,
    };
    let k = |t: &Tensor<2>| const_on_kernel(t).without_autodiff();
    let (p1, m1, v1) = adamw(k(&p), k(&g), k(&m), k(&v), step);
    let m_ref = m * 0.9 + g.clone() * 0.1;
    let v_ref = v * 0.99 + g.square() * 0.01;
    let (c1, c2) = (1.0 - 0.9f64.powi(3), 1.0 - 0.99f64.powi(3));
    let delta = (m_ref.clone() / c1) / ((v_ref.clone() / c2).sqrt() + 1e-8);
    let p_ref = p * (1.0 - 1e-2 * 0.1) - delta * 1e-2;
    assert!(rel(p1, p_ref) <= 1e-6);
    assert!(rel(m1, m_ref) <= 1e-6);
    assert!(rel(v1, v_ref) <= 1e-6);
}

/// Up to `FEW_ROWS` rows (decode steps) take the dot-product kernel, above it the GEMM; input
/// widths on and off its 16-lane blocks.
#[test]
fn op_linear_equals_matmul_by_the_transposed_weight() {
    use grail_kernels::linear;
    for (rows, width) in [(1, 19), (3, 67), (5, 67), (32, 19), (64, 19), (65, 19)] {
        let x = random([rows, width], 15).require_grad();
        let w = random([23, width], 16).require_grad();
        let g = random([rows, 23], 17);
        let (xk, wk) = (on_kernel(&x), on_kernel(&w));
        let fused = linear(xk.clone(), wk.clone());
        let reference = x.clone().matmul(w.clone().transpose());
        assert!(rel(fused.clone(), reference.clone()) <= 1e-5, "{rows} rows");
        let gf = (fused * const_on_kernel(&g)).backward();
        let gr = (reference * g).sum().backward();
        assert!(rel(xk.grad(&gf).unwrap(), x.grad(&gr).unwrap()) <= 1e-5);
        assert!(rel(wk.grad(&gf).unwrap(), w.grad(&gr).unwrap()) <= 1e-5);
    }
}

/// A bf16 weight on the CPU is read as it is, widened on load: the product equals, bit for bit,
/// that of the same values held as f32, on both sides of `FEW_ROWS` and of the 8-lane tiles.
#[test]
fn op_linear_reads_a_bf16_weight_as_the_same_values_in_f32() {
    use burn::tensor::FloatDType;
    use grail_kernels::linear;
    let device = Device::flex();
    for (rows, width) in [
        (1, 19),
        (3, 67),
        (4, 8),
        (5, 67),
        (32, 19),
        (64, 133),
        (65, 19),
    ] {
        let x = random([rows, width], 25)
            .without_autodiff()
            .to_device(&device);
        let w16 = random([37, width], 26)
            .without_autodiff()
            .to_device(&device)
            .cast(FloatDType::BF16);
        let w32 = w16.clone().cast(FloatDType::F32);
        let from_bf16 = linear(x.clone(), w16)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let from_f32 = linear(x, w32).into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(from_bf16.len(), rows * 37);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&from_bf16), bits(&from_f32), "{rows} rows × {width}");
    }
}

/// A weight in panel order gives the product of the row-major weight: on the kernel device (the
/// CPU's panel kernel, or the row-major weight restored on a GPU backend), with f32 and bf16
/// weights on the CPU, for row counts around the 6-row tiles and the 48-row blocks, widths that
/// are no multiple of 8, output widths of one and several panels, and a weight split over several
/// tasks (one panel each at 2,100 inputs). Reordering is exact both
/// ways, and the host reorder gives what the tensor one does.
#[test]
fn op_linear_panels_equals_the_row_major_product() {
    use burn::tensor::FloatDType;
    use grail_kernels::{PANEL, linear, linear_panels, panel_order, row_order, to_panel_order};
    for (rows, width, out) in [
        (1, 19, 16),
        (5, 67, 48),
        (6, 8, 32),
        (13, 133, 16),
        (64, 19, 64),
        (100, 37, 32),
        (7, 2100, 48),
    ] {
        let x = random([rows, width], 27).without_autodiff();
        let w = random([out, width], 28).without_autodiff();
        let packed = panel_order(w.clone());
        let values = |t: Tensor<2>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        assert_eq!(values(row_order(packed.clone())), values(w.clone()));
        assert_eq!(
            values(packed.clone()),
            to_panel_order(&values(w.clone()), out, width),
            "host reorder"
        );
        let want = x.clone().matmul(w.clone().transpose());
        let got = linear_panels(const_on_kernel(&x), const_on_kernel(&packed));
        assert!(rel(got, want.clone()) <= 1e-5, "{rows} × {width} → {out}");
        // bf16 on the CPU, read as it is stored: the row-major product's values.
        let flex = Device::flex();
        let (x, w16) = (
            x.to_device(&flex),
            w.to_device(&flex).cast(FloatDType::BF16),
        );
        let by_rows = linear(x.clone(), w16.clone());
        let by_panels = linear_panels(x, panel_order(w16));
        assert!(
            rel(by_panels, by_rows) <= 1e-6,
            "bf16: {rows} × {width} → {out}"
        );
    }
    assert_eq!(PANEL, 16);
}

#[test]
fn op_sum_squares_and_scale_match_tensor_math() {
    use grail_kernels::{scale, sum_squares};
    let x = random([300, 70], 18).without_autodiff();
    let want = x.clone().square().sum().into_scalar::<f64>();
    let xk = const_on_kernel(&x).without_autodiff();
    assert!((sum_squares(xk.clone()) - want).abs() <= 1e-5 * want);
    assert!(rel(scale(xk, 0.3), x * 0.3) <= 1e-7);
}

#[test]
fn fused_ops_run_without_autodiff_too() {
    let device = Device::flex();
    let x = Tensor::<2>::ones([2, 4], &device);
    let w = Tensor::<1>::ones([4], &device);
    let y: Vec<f32> = rms_norm(x, w, 0.0).into_data().try_to_vec().unwrap();
    assert!(y.iter().all(|&v| (v - 1.0).abs() < 1e-6));
}

/// A Vulkan adapter that does not exist is a configuration error naming the device, not a panic
/// inside the first tensor operation.
#[cfg(feature = "vulkan")]
#[test]
fn a_missing_vulkan_adapter_is_a_clear_error() {
    let err = grail_kernels::parse_device("vulkan:99")
        .expect_err("no machine has 100 discrete GPUs")
        .to_string();
    assert!(err.contains("device") && err.contains("vulkan:99"), "{err}");
}
