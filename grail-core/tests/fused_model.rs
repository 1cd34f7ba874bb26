//! The model with fused ops equals the model without them, in logits and gradients; the whole
//! fused model on the kernel device (`GRAIL_TEST_DEVICE`, see grail-kernels' `tests/ops.rs`)
//! equals it on Flex; cached generation too. The fused-on/off model test stays on Flex unless the
//! device is a real GPU: its unfused path needs burn's matmul and `sum()`, whose shared-memory
//! shaders crash lavapipe's compiler.

use burn::tensor::{Device, Tensor, TensorData};
use grail_core::model::{CausalLm, ModelConfig, ModelFamily, RopeScaling};
use grail_testkit::{
    const_on_kernel, kernel_device, kernel_test_device, random, reference_device as device, rel,
};

/// GQA 2, an untied lm_head, a vocabulary of 97.
fn untied_config() -> ModelConfig {
    ModelConfig::builder()
        .vocab_size(97)
        .hidden_size(48)
        .intermediate_size(80)
        .num_hidden_layers(2)
        .num_attention_heads(4)
        .num_key_value_heads(2)
        .max_position_embeddings(256)
        .build()
        .unwrap()
}

/// Qwen3's per-head q/k norms with a head width (20) that is not hidden / heads, and Llama 3's
/// RoPE scaling with a pretraining context (32) shorter than the test sequences; untied, a
/// vocabulary of 97.
fn qwen3_scaled_config() -> ModelConfig {
    ModelConfig::builder()
        .family(ModelFamily::Qwen3)
        .vocab_size(97)
        .hidden_size(48)
        .intermediate_size(80)
        .num_hidden_layers(2)
        .num_attention_heads(4)
        .num_key_value_heads(2)
        .head_dim(20)
        .rope_scaling(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 32,
        })
        .max_position_embeddings(256)
        .build()
        .unwrap()
}

/// The untied models every model-level test runs.
fn untied_configs() -> [(&'static str, ModelConfig); 2] {
    [
        ("qwen2", untied_config()),
        ("qwen3+llama3 rope", qwen3_scaled_config()),
    ]
}

/// GQA 2, tied embeddings, a vocabulary of 61.
fn tied_config() -> ModelConfig {
    ModelConfig::builder()
        .vocab_size(61)
        .hidden_size(32)
        .intermediate_size(48)
        .num_hidden_layers(2)
        .num_attention_heads(4)
        .num_key_value_heads(2)
        .max_position_embeddings(256)
        .tie_word_embeddings(true)
        .build()
        .unwrap()
}

#[test]
fn the_model_gives_the_same_outputs_and_gradients_with_fused_ops_on_and_off() {
    model_fused_on_off(&device());
}

/// The model-level check on the kernel device, only where that is a real GPU
/// (`GRAIL_TEST_DEVICE=vulkan[:N]` or `cuda[:N]`): it runs burn's matmul, which lavapipe cannot.
#[test]
fn gpu_model_gives_the_same_outputs_and_gradients_with_fused_ops_on_and_off() {
    let name = std::env::var("GRAIL_TEST_DEVICE").unwrap_or_default();
    if name.is_empty() || name == "cpu" || name == "vulkan:cpu" {
        eprintln!("gpu_model: needs GRAIL_TEST_DEVICE naming a real GPU; not run");
        return;
    }
    model_fused_on_off(&kernel_device());
}

fn model_fused_on_off(device: &Device) {
    for (name, config) in untied_configs() {
        eprintln!("{name}");
        model_fused_on_off_for(&config, device);
    }
}

fn model_fused_on_off_for(config: &ModelConfig, device: &Device) {
    use burn::tensor::Int;
    use grail_core::model::{CausalLm, Layout};
    // GQA 2, odd lengths, two packed rows with a padding tail.
    let fused = CausalLm::init(config, 3, device);
    let plain = fused.clone().with_fused_ops(false);
    assert!(fused.uses_fused_ops() && !plain.uses_fused_ops());
    let lens = vec![vec![1, 37, 70], vec![65, 11]];
    let cols = 110;
    let ids: Vec<i64> = (0..2 * cols).map(|i| (i * 7 % 97) as i64).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, cols]), device);
    let layout = Layout::Packed { rows: lens };
    let w = Tensor::<3>::from_data(random([2, cols, 97], 14).to_data(), device);
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
    for (a, b) in norm_gains(&fused).into_iter().zip(norm_gains(&plain)) {
        let e = rel(a.grad(&gf).unwrap(), b.grad(&gp).unwrap());
        assert!(e <= 1e-5, "norm gradient rel err {e:e}");
    }
}

/// The RMSNorm gains of layer 0: the input norm, and Qwen3's q/k norms where the model has them.
fn norm_gains(m: &grail_core::model::CausalLm) -> Vec<Tensor<1>> {
    let l = &m.model.layers[0];
    let qk = [&l.self_attn.q_norm, &l.self_attn.k_norm];
    std::iter::once(&l.input_layernorm)
        .chain(qk.into_iter().flatten())
        .map(|n| n.weight.val())
        .collect()
}

/// The whole fused model on the kernel device equals the same model on Flex, in logits and
/// gradients: every fused op in its place (packed varlen attention, RoPE, RMSNorm, SwiGLU, the
/// linear layers), chained, through autodiff. Runs wherever `GRAIL_TEST_DEVICE` names a CubeCL
/// device, lavapipe included (CI): the model's fused path needs no burn matmul or reduction.
#[test]
fn the_fused_model_on_the_kernel_device_equals_the_model_on_flex() {
    if kernel_test_device("kernel model").is_none() {
        return;
    }
    for (name, config) in untied_configs() {
        eprintln!("{name}");
        kernel_model_equals_flex(&config);
    }
}

fn kernel_model_equals_flex(config: &ModelConfig) {
    use burn::module::Module;
    use burn::tensor::Int;
    use grail_core::model::{CausalLm, Layout};
    // GQA 2, odd lengths, two packed rows with a padding tail, an untied lm_head.
    let reference = CausalLm::init(config, 3, &device());
    let kernel = reference.clone().fork(&kernel_device());
    assert!(kernel.uses_fused_ops());
    let lens = vec![vec![1, 37, 70], vec![65, 11]];
    let cols = 110;
    let ids: Vec<i64> = (0..2 * cols).map(|i| (i * 7 % 97) as i64).collect();
    let ids = |d: &Device| Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [2, cols]), d);
    let layout = Layout::Packed { rows: lens };
    let w = random([2, cols, 97], 14);
    let out_r = reference.forward(ids(&device()), &layout).unwrap();
    let out_k = kernel.forward(ids(&kernel_device()), &layout).unwrap();
    let e = rel(out_k.clone(), out_r.clone());
    assert!(e <= 1e-5, "logits rel err {e:e}");
    let gk = (out_k * const_on_kernel(&w)).backward();
    let gr = (out_r * w).sum().backward();
    let grads = |m: &CausalLm, g: &burn::tensor::Gradients| {
        let l = &m.model.layers[1];
        let matrix = |w: Tensor<2>| w.grad(g).unwrap();
        let vector = |w: Tensor<1>| w.grad(g).unwrap().unsqueeze::<2>();
        vec![
            matrix(l.self_attn.q_proj.weight.val()),
            matrix(l.self_attn.k_proj.weight.val()),
            matrix(l.self_attn.o_proj.weight.val()),
            matrix(l.mlp.gate_proj.weight.val()),
            matrix(l.mlp.down_proj.weight.val()),
            matrix(m.lm_head.as_ref().unwrap().weight.val()),
            vector(l.post_attention_layernorm.weight.val()),
            vector(m.model.norm.weight.val()),
        ]
        .into_iter()
        .chain(norm_gains(m).into_iter().map(vector))
        .collect::<Vec<_>>()
    };
    for (i, (a, b)) in grads(&kernel, &gk)
        .into_iter()
        .zip(grads(&reference, &gr))
        .enumerate()
    {
        let e = rel(a, b);
        assert!(e <= 1e-5, "gradient {i} rel err {e:e}");
    }
}

#[test]
fn cached_generation_gives_the_same_logits_with_fused_ops_on_and_off() {
    let config = tied_config();
    let fused = CausalLm::init(&config, 5, &Device::flex());
    let plain = fused.clone().with_fused_ops(false);
    for (a, b) in cached_logits(&fused).into_iter().zip(cached_logits(&plain)) {
        let e = rel(a, b);
        assert!(e <= 1e-5, "cached logits rel err {e:e}");
    }
}

/// The logits of a prefill of prompts of 1, 70 (two query tiles) and 5 tokens through
/// per-sequence caches, then of three mixed decode steps (token ids below 61).
fn cached_logits(m: &CausalLm) -> Vec<Tensor<2>> {
    use grail_core::model::KvCache;
    let mut caches = vec![KvCache::new(2), KvCache::new(2), KvCache::new(2)];
    let prompts: Vec<Vec<u32>> = vec![
        vec![3],
        (0..70).map(|i| i % 61).collect(),
        vec![9, 8, 7, 6, 5],
    ];
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let mut out = vec![m.forward_cached(&refs, &mut caches).unwrap()];
    for step in 0..3u32 {
        let next = [[step + 1], [step + 20], [step + 40]];
        let refs: Vec<&[u32]> = next.iter().map(|t| t.as_slice()).collect();
        out.push(m.forward_cached(&refs, &mut caches).unwrap());
    }
    out
}

/// A paged KV cache (blocks of 4 positions handed out in a scrambled order, one sequence's
/// blocks shared by a second that copied its partial last block) gives exactly the logits of
/// per-sequence caches: a prefill of 1, 70 and 5 tokens, then decode steps.
#[test]
fn paged_generation_gives_the_logits_of_per_sequence_caches_bit_for_bit() {
    let model = CausalLm::init(&tied_config(), 5, &Device::flex());
    assert!(model.supports_paged_kv());
    assert!(!model.clone().with_fused_ops(false).supports_paged_kv());
    paged_equals_per_sequence_caches(&model);
}

/// The same on the kernel device: the block pool in device memory, one paged-attention kernel
/// call per layer, against the device's per-sequence caches. A pool in the other memory is
/// refused. Runs wherever `GRAIL_TEST_DEVICE` names a CubeCL device, lavapipe included.
#[test]
fn paged_generation_on_the_kernel_device_gives_the_logits_of_per_sequence_caches() {
    use burn::module::Module;
    use grail_core::model::PagedKvCache;
    if kernel_test_device("kernel paged generation").is_none() {
        return;
    }
    let config = tied_config();
    let model =
        CausalLm::init(&config, 5, &Device::flex()).to_device(&kernel_device().without_autodiff());
    assert!(model.supports_paged_kv());
    paged_equals_per_sequence_caches(&model);
    let mut host_pool = PagedKvCache::new(&config, 4, 4, &Device::flex());
    let seq = [grail_core::model::PagedSequence {
        blocks: &[0],
        cached: 0,
    }];
    let err = model
        .forward_paged(&[&[1, 2]], &mut host_pool, &seq)
        .unwrap_err();
    assert!(err.to_string().contains("host memory"), "{err}");
}

/// Paged generation on `model`'s device equals per-sequence caches bit for bit (see the tests).
fn paged_equals_per_sequence_caches(model: &CausalLm) {
    use grail_core::model::{KvCache, PagedKvCache, PagedSequence};
    let config = model.config.clone();
    let prompts: Vec<Vec<u32>> = vec![
        vec![3],
        (0..70).map(|i| i % 61).collect(),
        vec![9, 8, 7, 6, 5],
    ];
    let steps = 6u32;
    let values = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
    // Per-sequence caches, plus a fourth sequence: the third's prompt continued differently.
    let mut caches = vec![KvCache::new(2); 3];
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let mut want = vec![values(model.forward_cached(&refs, &mut caches).unwrap())];
    caches.push(caches[2].clone());
    for step in 0..steps {
        let next = [[step + 1], [step + 20], [step + 40], [step + 50]];
        let refs: Vec<&[u32]> = next.iter().map(|t| t.as_slice()).collect();
        want.push(values(model.forward_cached(&refs, &mut caches).unwrap()));
    }
    // Paged: block ids from the top down, skipping some, so no sequence's blocks are in order.
    let block = 4;
    let mut kv = PagedKvCache::new(&config, 64, block, &model.device());
    let mut free: Vec<u32> = (0..64).filter(|b| b % 3 != 1).collect();
    let mut tables: Vec<Vec<u32>> = vec![Vec::new(); 3];
    let mut lens = vec![0usize; 3];
    let grow = |free: &mut Vec<u32>,
                tables: &mut Vec<Vec<u32>>,
                lens: &mut Vec<usize>,
                i: usize,
                n: usize| {
        lens[i] += n;
        while tables[i].len() * block < lens[i] {
            tables[i].push(free.pop().unwrap());
        }
    };
    for (i, p) in prompts.iter().enumerate() {
        grow(&mut free, &mut tables, &mut lens, i, p.len());
    }
    let seqs: Vec<PagedSequence<'_>> = tables
        .iter()
        .map(|b| PagedSequence {
            blocks: b,
            cached: 0,
        })
        .collect();
    let mut got = vec![values(
        model
            .forward_paged(&refs_of(&prompts), &mut kv, &seqs)
            .unwrap(),
    )];
    // The fourth shares the third's full block and copies its partial one (5 = 4 + 1).
    let copy = free.pop().unwrap();
    kv.copy_block(tables[2][1], copy, 1);
    tables.push(vec![tables[2][0], copy]);
    lens.push(lens[2]);
    for step in 0..steps {
        let cached = lens.clone();
        for i in 0..4 {
            grow(&mut free, &mut tables, &mut lens, i, 1);
        }
        let seqs: Vec<PagedSequence<'_>> = tables
            .iter()
            .zip(&cached)
            .map(|(b, &c)| PagedSequence {
                blocks: b,
                cached: c,
            })
            .collect();
        let next = [[step + 1], [step + 20], [step + 40], [step + 50]];
        let refs: Vec<&[u32]> = next.iter().map(|t| t.as_slice()).collect();
        got.push(values(model.forward_paged(&refs, &mut kv, &seqs).unwrap()));
    }
    for (step, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(
            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "call {step}: paged logits differ"
        );
    }
    // Blocks that cannot hold the new tokens are refused, naming the sequence.
    let short = [PagedSequence {
        blocks: &tables[0][..1],
        cached: 3,
    }];
    let err = model
        .forward_paged(&[&[1, 2]], &mut kv, &short)
        .unwrap_err();
    assert!(err.to_string().contains("sequence 0"), "{err}");
}

fn refs_of(v: &[Vec<u32>]) -> Vec<&[u32]> {
    v.iter().map(Vec::as_slice).collect()
}

/// Generation on the kernel device (fused path, device KV caches, one cached-attention kernel
/// per layer) gives the logits of generation on Flex (host caches): a prefill of mixed lengths,
/// then decode steps. Runs wherever `GRAIL_TEST_DEVICE` names a CubeCL device, lavapipe included.
#[test]
fn cached_generation_on_the_kernel_device_equals_flex() {
    use burn::module::Module;
    use grail_core::model::CausalLm;
    if kernel_test_device("kernel generation").is_none() {
        return;
    }
    let config = tied_config();
    let reference = CausalLm::init(&config, 5, &Device::flex());
    let kernel = reference
        .clone()
        .to_device(&kernel_device().without_autodiff());
    for (step, (a, b)) in cached_logits(&kernel)
        .into_iter()
        .zip(cached_logits(&reference))
        .enumerate()
    {
        let e = rel(a, b);
        assert!(e <= 1e-5, "step {step}: cached logits rel err {e:e}");
    }
}

/// A model with its matrices in panel order (a rollout copy on the CPU) gives the outputs of the
/// row-major model: logits of a packed forward (rows of 1 to 70 tokens) and of cached decode
/// steps, with f32 and bf16 matrices, tied and untied lm_heads; its tensors and lm_head weight
/// read back unchanged, and gradients through it equal the row-major model's. A vocabulary that
/// fills no whole panel (61) keeps its embedding row-major.
#[test]
fn panel_matrices_give_the_outputs_of_row_major_ones() {
    use burn::tensor::Int;
    use grail_core::model::{Bf16Matrices, Layout, RandomInit};
    // `untied_config`'s shape with another vocabulary, tied or not.
    let vocab = |vocab_size: usize, tie_word_embeddings: bool| ModelConfig {
        vocab_size,
        tie_word_embeddings,
        ..untied_config()
    };
    let flex = Device::flex();
    for (name, config) in [
        ("tied", vocab(64, true)),
        ("untied", vocab(96, false)),
        ("tied, vocab 61", tied_config()),
    ] {
        for bf16 in [false, true] {
            let what = format!("{name}, {}", if bf16 { "bf16" } else { "f32" });
            let mut init = RandomInit::new(7, 0.02, &flex);
            let rows = if bf16 {
                CausalLm::build(&config, &mut Bf16Matrices(init)).unwrap()
            } else {
                CausalLm::build(&config, &mut init).unwrap()
            };
            let panels = rows.clone().with_panel_matrices();
            assert!(panels.model.layers[1].mlp.down_proj.panels, "{what}");
            let head_packed = match &panels.lm_head {
                Some(head) => head.panels,
                None => panels.model.embed_tokens.panels,
            };
            assert_eq!(head_packed, config.vocab_size % 16 == 0, "{what}");
            // A packed forward: rows of 1, 37, 70 tokens (the kernel's 6-row tiles and 48-row
            // blocks, with ragged ends).
            let v = config.vocab_size as i64;
            let ids: Vec<i64> = (0..108).map(|i| i * 7 % v).collect();
            let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, 108]), &flex);
            let layout = Layout::Packed {
                rows: vec![vec![1, 37, 70]],
            };
            let e = rel(
                panels.forward(ids.clone(), &layout).unwrap(),
                rows.forward(ids, &layout).unwrap(),
            );
            assert!(e <= 1e-5, "{what}: forward logits rel err {e:e}");
            for (a, b) in cached_logits(&panels).into_iter().zip(cached_logits(&rows)) {
                let e = rel(a, b);
                assert!(e <= 1e-5, "{what}: decode logits rel err {e:e}");
            }
            let mut want = Vec::new();
            rows.for_each_tensor(|name, data| want.push((name, data)));
            let mut got = Vec::new();
            panels.for_each_tensor(|name, data| got.push((name, data)));
            assert_eq!(
                got, want,
                "{what}: tensors read back in Hugging Face layout"
            );
            assert_eq!(
                panels.lm_head_weight().into_data(),
                rows.lm_head_weight().into_data(),
                "{what}"
            );
        }
    }
    // A packed model moved to a GPU backend gets its products from the row-major weights there.
    if kernel_test_device("panel matrices on the kernel device").is_some() {
        use burn::module::Module;
        let rows = CausalLm::init(&vocab(64, true), 5, &Device::flex());
        let panels = rows
            .clone()
            .with_panel_matrices()
            .to_device(&kernel_device().without_autodiff());
        for (a, b) in cached_logits(&panels).into_iter().zip(cached_logits(&rows)) {
            let e = rel(a, b);
            assert!(e <= 1e-5, "kernel device: cached logits rel err {e:e}");
        }
    }
    // Training through panel-ordered weights takes the row-major path: the same gradients.
    let config = vocab(64, true);
    let rows = CausalLm::init(&config, 3, &device());
    let panels = rows.clone().with_panel_matrices();
    assert!(panels.model.embed_tokens.panels);
    let ids: Vec<i64> = (0..40).map(|i| i * 5 % 64).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, 40]), &device());
    let layout = Layout::Packed {
        rows: vec![vec![40]],
    };
    let w = random([1, 40, 64], 9);
    let loss = |m: &CausalLm| (m.forward(ids.clone(), &layout).unwrap() * w.clone()).sum();
    let (gr, gp) = (loss(&rows).backward(), loss(&panels).backward());
    let q = |m: &CausalLm| m.model.layers[0].self_attn.q_proj.row_major_weight();
    let e = rel(
        grail_kernels::row_order(
            panels.model.layers[0]
                .self_attn
                .q_proj
                .weight
                .val()
                .grad(&gp)
                .unwrap(),
        ),
        q(&rows).grad(&gr).unwrap(),
    );
    assert!(e <= 1e-5, "gradient rel err {e:e}");
}
