//! Generation on the fixture models: continuous batching equals greedy decoding, behaviour
//! log-probs equal the trainer's recomputation, sampling is seeded and respects its truncation.

mod common;

use std::sync::Arc;

use burn::tensor::{Device, Int, Tensor, TensorData};
use common::{generate_switching, tiny_config};
use grail_core::checkpoint::load_model;
use grail_core::model::{CausalLm, Layout, greedy};
use grail_protocol::proof::{SketchCoefficients, sketch_matches};
use grail_rollout::generate::{
    FinishReason, Generated, GenerationConfig, GenerationRequest, generate,
};
use grail_rollout::sampling::{SamplingConfig, log_softmax, sample_rng, sample_token};
use grail_testkit::{kernel_test_device, model_dirs, read_tensors};

fn run(
    model: &CausalLm,
    cfg: &GenerationConfig,
    prompts: &[Vec<u32>],
    per_prompt: usize,
) -> Vec<Generated> {
    let requests = prompts.iter().enumerate().flat_map(|(p, ids)| {
        let ids = Arc::new(ids.clone());
        (0..per_prompt).map(move |s| GenerationRequest {
            prompt_id: p as u64,
            sample_index: s,
            prompt: ids.clone(),
        })
    });
    let mut out = Vec::new();
    generate(model, cfg, requests, |g| out.push(g)).unwrap();
    out.sort_by_key(|g| (g.request.prompt_id, g.request.sample_index));
    out
}

#[test]
fn continuous_batching_greedy_equals_transformers_and_uncached_greedy() {
    let device = Device::flex();
    for dir in model_dirs() {
        let model = load_model(&dir, &device).unwrap();
        let expected = read_tensors(&dir.join("expected.safetensors")).unwrap();
        let prompt = expected["greedy_prompt"].ids();
        let want = expected["greedy_tokens"].ids();
        let n = want.len();
        // Prompts of different lengths, more than the batch holds.
        let mut prompts = vec![
            prompt.clone(),
            prompt[..prompt.len() / 2].to_vec(),
            prompt[1..].to_vec(),
            vec![prompt[0]],
        ];
        prompts
            .extend((0..).map_while(|i| expected.get(&format!("input_ids_{i}")).map(|t| t.ids())));
        // An EOS that the fixture's own greedy sequence hits part-way makes sequences leave the
        // batch at different steps, so later prompts join while others are still decoding.
        let eos = want[n / 2];
        let cfg = GenerationConfig {
            sampling: SamplingConfig {
                temperature: 0.0,
                ..SamplingConfig::default()
            },
            max_completion_length: n,
            max_batch: 3,
            eos_token_ids: vec![eos],
            ..GenerationConfig::default()
        };
        let out = run(&model, &cfg, &prompts, 1);
        assert_eq!(out.len(), prompts.len());
        for (p, g) in prompts.iter().zip(&out) {
            let full = greedy(&model, p, n, false).unwrap();
            let cut = full.iter().position(|&t| t == eos).map_or(n, |i| i + 1);
            assert_eq!(g.ids, full[..cut], "{}: prompt {:?}", dir.display(), p);
            let reason = if cut < n || full[n - 1] == eos {
                FinishReason::Eos
            } else {
                FinishReason::Length
            };
            assert_eq!(g.finish, reason);
        }
        let first = want.iter().position(|&t| t == eos).unwrap() + 1;
        assert_eq!(
            out[0].ids,
            want[..first],
            "{}: fixture greedy tokens",
            dir.display()
        );
        // Without an EOS the whole fixture sequence comes back.
        let cfg = GenerationConfig {
            eos_token_ids: vec![],
            ..cfg
        };
        assert_eq!(run(&model, &cfg, &prompts[..1], 1)[0].ids, want);
    }
}

/// Continuous batching on the device `GRAIL_TEST_DEVICE` names (a GPU, or lavapipe with
/// `vulkan:cpu`; CI runs the latter): the fused device path (device KV caches, one
/// cached-attention kernel per layer) gives the Flex run's tokens and behaviour log-probs, and
/// transformers' greedy tokens. On lavapipe only checkpoints the fused path runs are checked.
#[test]
fn generation_on_the_kernel_device_equals_flex_and_transformers() {
    let Some(name) = kernel_test_device("kernel-device generation") else {
        return;
    };
    let device = grail_core::device::parse_device(&name)
        .unwrap_or_else(|e| panic!("GRAIL_TEST_DEVICE={name}: {e}"));
    let mut checked = 0;
    for dir in model_dirs() {
        let model = load_model(&dir, &device).unwrap();
        if name == "vulkan:cpu" && !model.uses_fused_ops() {
            eprintln!("{}: plain path, not run on lavapipe", dir.display());
            continue;
        }
        let reference = load_model(&dir, &Device::flex()).unwrap();
        let expected = read_tensors(&dir.join("expected.safetensors")).unwrap();
        let prompt = expected["greedy_prompt"].ids();
        let want = expected["greedy_tokens"].ids();
        let prompts = vec![prompt.clone(), prompt[1..].to_vec(), vec![prompt[0]]];
        let cfg = GenerationConfig {
            sampling: SamplingConfig {
                temperature: 0.0,
                ..SamplingConfig::default()
            },
            max_completion_length: want.len(),
            max_batch: 2,
            ..GenerationConfig::default()
        };
        let out = run(&model, &cfg, &prompts, 1);
        assert_eq!(out[0].ids, want, "{}: fixture greedy tokens", dir.display());
        for (g, r) in out.iter().zip(run(&reference, &cfg, &prompts, 1)) {
            assert_eq!(g.ids, r.ids, "{}", dir.display());
            let diff = g.logps.iter().zip(&r.logps).map(|(a, b)| (a - b).abs());
            let worst = diff.fold(0.0f32, f32::max);
            assert!(
                worst <= 1e-4,
                "{}: behaviour log-prob diff {worst}",
                dir.display()
            );
        }
        checked += 1;
    }
    assert!(checked > 0, "no fixture checkpoint could run on {name}");
}

#[test]
fn behaviour_logprobs_equal_the_trainers_recomputation() {
    let device = Device::flex();
    for dir in model_dirs() {
        let model = load_model(&dir, &device).unwrap();
        let prompts = vec![vec![1, 2, 3, 4, 5], vec![7, 8]];
        for (temperature, top_p, repetition_penalty) in [
            (1.0f32, 1.0f32, 1.0f32),
            (0.7, 1.0, 1.0),
            (0.7, 0.8, 1.0),
            (0.7, 0.8, 1.3),
        ] {
            let cfg = GenerationConfig {
                sampling: SamplingConfig {
                    temperature,
                    top_p,
                    repetition_penalty,
                    ..SamplingConfig::default()
                },
                max_completion_length: 12,
                max_batch: 4,
                seed: 5,
                ..GenerationConfig::default()
            };
            for g in run(&model, &cfg, &prompts, 3) {
                let ours = model
                    .completion_logprobs(&g.request.prompt, &g.ids, temperature as f64)
                    .unwrap();
                let max = ours
                    .iter()
                    .zip(&g.logps)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                // Neither top_p truncation nor the repetition penalty may change the recorded
                // definition (the model's full distribution).
                assert!(
                    max <= 1e-4,
                    "{}: T={temperature} top_p={top_p} rep={repetition_penalty}: max |Δ| {max:e}",
                    dir.display()
                );
            }
        }
    }
}

#[test]
fn same_seed_same_completions_different_seed_different() {
    let model = load_model(&model_dirs()[0], &Device::flex()).unwrap();
    let cfg = GenerationConfig {
        max_completion_length: 16,
        max_batch: 2,
        seed: 42,
        ..GenerationConfig::default()
    };
    let prompts = vec![vec![3, 4, 5], vec![9]];
    let a = run(&model, &cfg, &prompts, 3);
    assert_eq!(
        a,
        run(&model, &cfg, &prompts, 3),
        "same seed, same batch: bit-identical"
    );
    // Batch composition does not change the tokens (each sample has its own RNG stream); the
    // log-probs move only by float summation order.
    let b = run(
        &model,
        &GenerationConfig {
            max_batch: 5,
            ..cfg.clone()
        },
        &prompts,
        3,
    );
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.ids, y.ids);
        assert!(
            x.logps
                .iter()
                .zip(&y.logps)
                .all(|(p, q)| (p - q).abs() < 1e-5)
        );
    }
    let c = run(&model, &GenerationConfig { seed: 43, ..cfg }, &prompts, 3);
    assert_ne!(
        a.iter().map(|g| &g.ids).collect::<Vec<_>>(),
        c.iter().map(|g| &g.ids).collect::<Vec<_>>()
    );
}

#[test]
fn truncated_sampling_never_leaves_its_set() {
    // A fixed, spread-out distribution over 50 tokens.
    let logits: Vec<f32> = (0..50).map(|i| ((i * 37 % 50) as f32) / 8.0).collect();
    let mut by_prob: Vec<usize> = (0..50).collect();
    by_prob.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let probs: Vec<f32> = log_softmax(&logits, 1.0).iter().map(|l| l.exp()).collect();
    let allowed_top_k: Vec<usize> = by_prob[..5].to_vec();
    let mut mass = 0.0;
    let mut allowed_top_p = Vec::new();
    for &t in &by_prob {
        allowed_top_p.push(t);
        mass += probs[t];
        if mass >= 0.6 {
            break;
        }
    }
    let top = probs[by_prob[0]];
    let allowed_min_p: Vec<usize> = (0..50).filter(|&t| probs[t] >= 0.3 * top).collect();
    let cases = [
        (
            SamplingConfig {
                top_k: 5,
                ..SamplingConfig::default()
            },
            allowed_top_k,
        ),
        (
            SamplingConfig {
                top_p: 0.6,
                ..SamplingConfig::default()
            },
            allowed_top_p,
        ),
        (
            SamplingConfig {
                min_p: 0.3,
                ..SamplingConfig::default()
            },
            allowed_min_p,
        ),
    ];
    for (cfg, allowed) in cases {
        let mut rng = sample_rng(7, 0, 0);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3000 {
            let (t, lp) = sample_token(&logits, &[], &cfg, &mut rng);
            assert!(
                allowed.contains(&(t as usize)),
                "{cfg:?}: token {t} outside {allowed:?}"
            );
            assert!(
                (lp - probs[t as usize].ln()).abs() < 1e-5,
                "log-prob is the full distribution's"
            );
            seen.insert(t);
        }
        assert_eq!(
            seen.len(),
            allowed.len(),
            "{cfg:?}: every allowed token shows up in 3000 draws"
        );
    }
    // Temperature 0 is arg-max.
    let greedy_cfg = SamplingConfig {
        temperature: 0.0,
        ..SamplingConfig::default()
    };
    assert_eq!(
        sample_token(&logits, &[], &greedy_cfg, &mut sample_rng(1, 1, 1)).0 as usize,
        by_prob[0]
    );
}

#[test]
fn an_in_flight_switch_recomputes_the_cache_and_tags_every_token() {
    let (old, new) = old_and_new_weights();
    let cfg = GenerationConfig {
        sketch_seed: Some([3; 32]),
        ..greedy_generation(12, 4)
    };
    let prompts = [vec![3u32, 9, 4, 1], vec![5, 2], vec![8, 8, 7, 6, 1, 2, 3]];
    let requests = prompts.iter().enumerate().map(|(i, p)| GenerationRequest {
        prompt_id: i as u64,
        sample_index: 0,
        prompt: Arc::new(p.clone()),
    });
    // The new weights (version 1) arrive before the 6th forward call: every sequence has 5 tokens.
    let switch_at = 5;
    let (mut out, stats) = generate_switching(&old, &new, &cfg, requests, switch_at);
    assert_eq!(stats.weight_switches, 1);
    out.sort_by_key(|g| g.request.prompt_id);
    for (g, prompt) in out.iter().zip(&prompts) {
        let mut want_versions = vec![0u64; switch_at];
        want_versions.resize(12, 1);
        assert_eq!(g.versions, want_versions, "both versions on the tokens");
        // Before the switch: the old model's greedy tokens.
        assert_eq!(
            g.ids[..switch_at],
            greedy(&old, prompt, switch_at, false).unwrap()
        );
        // After: exactly what a fresh prefill of prompt + tokens so far gives with the new weights.
        let prefix: Vec<u32> = prompt.iter().chain(&g.ids[..switch_at]).copied().collect();
        assert_eq!(
            g.ids[switch_at..],
            greedy(&new, &prefix, 12 - switch_at, false).unwrap()
        );
        // And each token's behaviour log-prob comes from the version that sampled it.
        let old_logps = old
            .completion_logprobs(prompt, &g.ids[..switch_at], 1.0)
            .unwrap();
        let new_logps = new
            .completion_logprobs(&prefix, &g.ids[switch_at..], 1.0)
            .unwrap();
        let want: Vec<f32> = old_logps.into_iter().chain(new_logps).collect();
        let max = want
            .iter()
            .zip(&g.logps)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max <= 1e-4, "max |Δ| {max:e}");
        // And its sketch is that of the hidden state of the version that sampled it, with that
        // version's coefficients.
        let seed = cfg.sketch_seed.unwrap();
        let before = SketchCoefficients::for_version(&seed, 0);
        let after = SketchCoefficients::for_version(&seed, 1);
        let want: Vec<u32> = recomputed_sketches(&old, prompt, &g.ids, &before)[..switch_at]
            .iter()
            .chain(&recomputed_sketches(&new, prompt, &g.ids, &after)[switch_at..])
            .copied()
            .collect();
        assert_eq!(g.sketches, want);
    }
}

/// New weights arriving just after a prompt was admitted over another prompt's published blocks:
/// those blocks hold the old weights' keys, so the prompt is prefilled whole with the new ones.
#[test]
fn a_switch_never_reads_blocks_another_prompt_published_with_old_weights() {
    let (old, new) = old_and_new_weights();
    let cfg = GenerationConfig {
        kv_block_size: 4,
        ..greedy_generation(8, 2)
    };
    // The second prompt waits a step for the first's blocks, is admitted over them, and then
    // the new weights arrive (before the second forward call).
    let preamble: Vec<u32> = (20..28).collect();
    let prompts: Vec<Vec<u32>> = [1u32, 2]
        .iter()
        .map(|&t| preamble.iter().copied().chain([t]).collect())
        .collect();
    let requests = prompts.iter().enumerate().map(|(i, p)| GenerationRequest {
        prompt_id: i as u64,
        sample_index: 0,
        prompt: Arc::new(p.clone()),
    });
    let (mut out, stats) = generate_switching(&old, &new, &cfg, requests, 1);
    assert_eq!(stats.weight_switches, 1);
    assert_eq!(stats.shared_prompt_tokens, 0, "nothing was read shared");
    out.sort_by_key(|g| g.request.prompt_id);
    let second = &out[1];
    assert_eq!(second.versions, vec![1; 8], "{stats:?}");
    assert_eq!(
        second.ids,
        greedy(&new, &prompts[1], 8, false).unwrap(),
        "the new weights' greedy tokens, from a whole prefill"
    );
    let want = new
        .completion_logprobs(&prompts[1], &second.ids, 1.0)
        .unwrap();
    let worst = want
        .iter()
        .zip(&second.logps)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-4, "behaviour log-probs off by {worst:e}");
}

/// Two small random models: the weights before and after an in-flight switch.
fn old_and_new_weights() -> (CausalLm, CausalLm) {
    let device = Device::flex();
    (
        CausalLm::init(&tiny_config(128), 1, &device),
        CausalLm::init(&tiny_config(128), 2, &device),
    )
}

/// Greedy decoding of up to `max_completion_length` tokens, `max_batch` sequences at a time.
fn greedy_generation(max_completion_length: usize, max_batch: usize) -> GenerationConfig {
    GenerationConfig {
        sampling: SamplingConfig {
            temperature: 0.0,
            ..SamplingConfig::default()
        },
        max_completion_length,
        max_batch,
        ..GenerationConfig::default()
    }
}

/// A small random model (2 layers, GQA 2) for the scheduling tests.
fn small_model(fused: bool) -> CausalLm {
    CausalLm::init(&tiny_config(128), 3, &Device::flex()).with_fused_ops(fused)
}

fn sampled(max_batch: usize) -> GenerationConfig {
    GenerationConfig {
        max_completion_length: 20,
        max_batch,
        kv_block_size: 4,
        seed: 11,
        ..GenerationConfig::default()
    }
}

/// Three prompts (lengths 6, 9 and 3: partial last blocks of 4) with `g` samples each.
fn group_prompts() -> Vec<Vec<u32>> {
    vec![
        vec![3, 9, 4, 1, 7, 7],
        vec![5, 2, 8, 8, 1, 0, 2, 6, 9],
        vec![12, 13, 14],
    ]
}

fn generate_all(
    model: &CausalLm,
    cfg: &GenerationConfig,
    prompts: &[Vec<u32>],
    g: usize,
) -> (Vec<Generated>, grail_rollout::generate::GenerationStats) {
    let requests: Vec<GenerationRequest> = prompts
        .iter()
        .enumerate()
        .flat_map(|(p, ids)| {
            let ids = Arc::new(ids.clone());
            (0..g).map(move |s| GenerationRequest {
                prompt_id: p as u64,
                sample_index: s,
                prompt: ids.clone(),
            })
        })
        .collect();
    let mut out = Vec::new();
    let stats = generate(model, cfg, requests, |d| out.push(d)).unwrap();
    out.sort_by_key(|d| (d.request.prompt_id, d.request.sample_index));
    (out, stats)
}

fn assert_same_completions(a: &[Generated], b: &[Generated], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.request, y.request, "{what}");
        assert_eq!(x.ids, y.ids, "{what}: sample {:?}", x.request.sample_index);
        for (p, q) in x.logps.iter().zip(&y.logps) {
            assert!((p - q).abs() < 1e-5, "{what}: log-prob {p} vs {q}");
        }
    }
}

#[test]
fn samples_sharing_their_prompts_prefill_equal_samples_generated_alone() {
    for fused in [true, false] {
        let model = small_model(fused);
        let prompts = group_prompts();
        let cfg = sampled(16);
        let (shared, stats) = generate_all(&model, &cfg, &prompts, 4);
        let lens: usize = prompts.iter().map(Vec::len).sum();
        assert_eq!(stats.prefill_tokens, lens, "each prompt prefilled once");
        assert_eq!(
            stats.shared_prompt_tokens,
            3 * lens,
            "three samples of each share it"
        );
        assert_eq!(
            stats.kv_blocks > 0,
            fused,
            "paged where the model reads a paged cache"
        );
        let alone = generate_alone(&model, &cfg, &prompts, 4);
        assert_same_completions(&shared, &alone, &format!("fused {fused}"));
    }
}

/// Each of `g` samples of each prompt generated alone: its own prefill, no one to share with.
fn generate_alone(
    model: &CausalLm,
    cfg: &GenerationConfig,
    prompts: &[Vec<u32>],
    g: usize,
) -> Vec<Generated> {
    let mut alone = Vec::new();
    for (p, ids) in prompts.iter().enumerate() {
        for s in 0..g {
            let request = GenerationRequest {
                prompt_id: p as u64,
                sample_index: s,
                prompt: Arc::new(ids.clone()),
            };
            let stats = generate(model, cfg, [request], |d| alone.push(d)).unwrap();
            assert_eq!(stats.shared_prompt_tokens, 0);
        }
    }
    alone
}

/// On the kernel device the pool lives in device memory: samples sharing their prompt's blocks
/// (copy-on-write of the partial last block) equal samples generated alone, a budget that
/// forces preemption gives the completions of a roomy run, and prompts that begin alike share
/// whole blocks. Runs wherever `GRAIL_TEST_DEVICE`
/// names a CubeCL device, lavapipe included.
#[test]
fn paged_generation_on_the_kernel_device_shares_prefixes_and_preempts_exactly() {
    use burn::module::Module;
    let Some(name) = kernel_test_device("kernel-device paged generation") else {
        return;
    };
    let device = grail_core::device::parse_device(&name)
        .unwrap_or_else(|e| panic!("GRAIL_TEST_DEVICE={name}: {e}"));
    let model = small_model(true).to_device(&device);
    let prompts = group_prompts();
    let (shared, roomy) = generate_all(&model, &sampled(16), &prompts, 4);
    assert!(roomy.kv_blocks > 0, "a paged pool on the device: {roomy:?}");
    assert_eq!(roomy.shared_prompt_tokens, 3 * (6 + 9 + 3));
    let alone = generate_alone(&model, &sampled(16), &prompts, 4);
    assert_same_completions(&shared, &alone, "shared prefixes on the device");
    let per_block = grail_core::model::PagedKvCache::bytes_per_block(&model.config, 4);
    let tight = GenerationConfig {
        kv_cache_bytes: Some(20 * per_block),
        ..sampled(16)
    };
    let (got, stats) = generate_all(&model, &tight, &prompts, 4);
    assert!(stats.preemptions > 0, "{stats:?}");
    assert_same_completions(&got, &shared, "preempted on the device");
    // Prompts that begin alike read the first one's published blocks from the device pool.
    let preamble: Vec<u32> = (20..29).collect();
    let alike: Vec<Vec<u32>> = [vec![1, 2], vec![3]]
        .iter()
        .map(|tail| preamble.iter().chain(tail).copied().collect())
        .collect();
    let (shared, stats) = generate_all(&model, &sampled(16), &alike, 2);
    assert_eq!(stats.prefill_tokens, 11 + 2, "{stats:?}");
    let alone = generate_alone(&model, &sampled(16), &alike, 2);
    assert_same_completions(&shared, &alone, "a shared preamble on the device");
    // A budget under one block is refused by name before any device memory is taken.
    let nothing = GenerationConfig {
        kv_cache_bytes: Some(per_block - 1),
        ..sampled(4)
    };
    let request = GenerationRequest {
        prompt_id: 0,
        sample_index: 0,
        prompt: Arc::new(vec![1; 9]),
    };
    let err = generate(&model, &nothing, [request], |_| {}).unwrap_err();
    assert!(err.to_string().contains("holds 0 blocks"), "{err}");
}

/// Prompts that begin alike (a 9-token preamble: two whole blocks of 4 and one token more) share
/// the preamble's whole blocks: the later prompts wait a step for the first one's prefill and
/// compute only what follows, and every completion equals the one generated alone.
#[test]
fn prompts_that_begin_alike_share_their_common_whole_blocks() {
    let model = small_model(true);
    let preamble: Vec<u32> = (20..29).collect();
    let prompts: Vec<Vec<u32>> = [vec![1, 2], vec![3], vec![4, 5, 6]]
        .iter()
        .map(|tail| preamble.iter().chain(tail).copied().collect())
        .collect();
    let cfg = sampled(16);
    let (shared, stats) = generate_all(&model, &cfg, &prompts, 2);
    let lens: usize = prompts.iter().map(Vec::len).sum();
    assert_eq!(
        stats.prefill_tokens,
        lens - 2 * 8,
        "the later two read the preamble's two whole blocks: {stats:?}"
    );
    assert_eq!(
        stats.shared_prompt_tokens,
        2 * 8 + lens,
        "two preambles' blocks, and each prompt's second sample"
    );
    let alone = generate_alone(&model, &cfg, &prompts, 2);
    assert_same_completions(&shared, &alone, "prompts sharing a preamble");
    // Samples that end at their first token free their prompt's blocks at once: the prompts
    // waiting for those blocks are admitted before that.
    let one_token = GenerationConfig {
        max_completion_length: 1,
        ..cfg.clone()
    };
    let (_, stats) = generate_all(&model, &one_token, &prompts, 2);
    assert_eq!(stats.prefill_tokens, lens - 2 * 8, "{stats:?}");
    // Per-sequence caches (the reference path) share nothing across prompts, nor does the pool
    // with prefix caching off; both agree.
    let (plain, stats) = generate_all(&small_model(false), &cfg, &prompts, 2);
    assert_eq!(stats.prefill_tokens, lens);
    assert_same_completions(&plain, &shared, "reference path");
    let off = GenerationConfig {
        enable_prefix_caching: false,
        ..cfg
    };
    let (unshared, stats) = generate_all(&model, &off, &prompts, 2);
    assert_eq!(stats.prefill_tokens, lens);
    assert_same_completions(&unshared, &shared, "prefix caching off");
}

#[test]
fn preempted_sequences_come_back_with_the_tokens_of_an_unpreempted_run() {
    let model = small_model(true);
    let prompts = group_prompts();
    let (want, roomy) = generate_all(&model, &sampled(8), &prompts, 3);
    assert_eq!(roomy.preemptions, 0);
    // Room for ~2.5 full sequences (9 + 20 positions = 8 blocks each) while 8 try to run.
    let per_block = grail_core::model::PagedKvCache::bytes_per_block(&model.config, 4);
    let tight = GenerationConfig {
        kv_cache_bytes: Some(20 * per_block),
        ..sampled(8)
    };
    let (got, stats) = generate_all(&model, &tight, &prompts, 3);
    assert!(stats.preemptions > 0, "{stats:?}");
    assert!(stats.reprefill_tokens > 0);
    assert_eq!(stats.kv_blocks, 20);
    assert!(
        stats.kv_blocks_peak <= 20 && roomy.kv_blocks_peak > 20,
        "{stats:?} {roomy:?}"
    );
    assert_same_completions(&got, &want, "preempted");
}

#[test]
fn samples_wait_for_room_instead_of_being_preempted() {
    // Blocks of 16 hold a prompt and its whole completion, so a sample only ever takes one block
    // (its copy of the prompt's shared partial block). Admission counts that block: a pool too
    // small for everyone at once makes samples wait, and nothing is preempted or prefilled twice.
    let model = small_model(true);
    let prompts = group_prompts();
    let cfg = GenerationConfig {
        kv_block_size: 16,
        max_completion_length: 4,
        ..sampled(12)
    };
    let (want, roomy) = generate_all(&model, &cfg, &prompts, 4);
    let per_block = grail_core::model::PagedKvCache::bytes_per_block(&model.config, 16);
    let tight = GenerationConfig {
        kv_cache_bytes: Some(4 * per_block),
        ..cfg
    };
    let (got, stats) = generate_all(&model, &tight, &prompts, 4);
    assert!(roomy.kv_blocks_peak > 4, "{roomy:?}");
    assert_eq!(
        (stats.preemptions, stats.reprefill_tokens),
        (0, 0),
        "{stats:?}"
    );
    assert_eq!(
        stats.prefill_tokens,
        6 + 9 + 3,
        "each prompt prefilled once"
    );
    assert_same_completions(&got, &want, "waiting");
}

#[test]
fn a_prompt_that_does_not_fit_neither_holds_back_samples_nor_locks_the_pool() {
    // Blocks of 16 and a 4-block pool; prompt 0 (6 tokens) takes a block, each of its samples a
    // block of its own; prompt 1 (40 tokens) takes three. Requests are interleaved, so prompt 0's
    // last sample is queued behind prompt 1. It must fork while prompt 1 waits for room (before:
    // it waited too), and the two prompts' prefixes must never fill the pool so that neither can
    // be forked (before: they did, were dropped, were prefilled again, forever).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let model = small_model(true);
        let per_block = grail_core::model::PagedKvCache::bytes_per_block(&model.config, 16);
        let cfg = GenerationConfig {
            kv_block_size: 16,
            max_completion_length: 4,
            kv_cache_bytes: Some(4 * per_block),
            ..sampled(2)
        };
        let short = Arc::new(vec![5u32; 6]);
        let long = Arc::new((0..40u32).map(|t| 1 + t % 60).collect::<Vec<_>>());
        let requests = [(0, 0), (0, 1), (0, 2), (1, 0), (0, 3)].map(|(p, s)| GenerationRequest {
            prompt_id: p,
            sample_index: s,
            prompt: if p == 0 { short.clone() } else { long.clone() },
        });
        let mut finished = Vec::new();
        let stats = generate(&model, &cfg, requests, |d| {
            finished.push((d.request.prompt_id, d.request.sample_index))
        });
        tx.send((finished, stats.map_err(|e| e.to_string())))
            .unwrap();
    });
    let (finished, stats) = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("generation did not finish: the pool locked");
    let stats = stats.unwrap();
    let at = |r| finished.iter().position(|&f| f == r).unwrap();
    assert!(at((0, 3)) < at((1, 0)), "{finished:?}");
    assert_eq!(
        (stats.prefill_tokens, stats.preemptions),
        (6 + 40, 0),
        "{stats:?}"
    );
}

/// A prompt's samples that all end at their first token leave its prefix spent at once; the next
/// prompt is admitted into the room that frees rather than the generation stopping with "no
/// waiting sequence fits".
#[test]
fn a_prefix_spent_by_one_token_samples_leaves_room_for_the_next_prompt() {
    let model = small_model(true);
    let per_block = grail_core::model::PagedKvCache::bytes_per_block(&model.config, 16);
    let cfg = GenerationConfig {
        max_completion_length: 1,
        kv_block_size: 16,
        kv_cache_bytes: Some(3 * per_block),
        ..sampled(1)
    };
    let prompts = vec![(1..9).collect::<Vec<u32>>(), (11..19).collect()];
    let (out, stats) = generate_all(&model, &cfg, &prompts, 1);
    assert_eq!(out.len(), 2, "{stats:?}");
    assert_eq!(stats.prefill_tokens, 16);
}

#[test]
fn a_kv_budget_below_one_sequence_is_refused_naming_it() {
    let model = small_model(true);
    let per_block = grail_core::model::PagedKvCache::bytes_per_block(&model.config, 4);
    let cfg = GenerationConfig {
        kv_cache_bytes: Some(5 * per_block),
        ..sampled(8)
    };
    let request = GenerationRequest {
        prompt_id: 0,
        sample_index: 0,
        prompt: Arc::new(vec![1; 9]),
    };
    let err = generate(&model, &cfg, [request], |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("kv_cache_bytes") && err.contains("needs 9"),
        "{err}"
    );
}

/// The sketches of the hidden states a packed forward of `prompt + completion` (the trainer's)
/// gives at the positions the completion's tokens were sampled from, with `coefficients`.
fn recomputed_sketches(
    model: &CausalLm,
    prompt: &[u32],
    completion: &[u32],
    coefficients: &SketchCoefficients,
) -> Vec<u32> {
    let n = prompt.len() + completion.len();
    let ids = prompt.iter().chain(completion).map(|&t| t as i64).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &Device::flex());
    let hidden = model
        .forward_hidden(ids, &Layout::packed_single_row(vec![n]))
        .unwrap()
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap();
    let size = hidden.len() / n;
    coefficients.sketches(&hidden[(prompt.len() - 1) * size..(n - 1) * size], size)
}

/// The sketches a worker records while it decodes (paged or per-sequence caches, its matrices in
/// panel order as workers hold them) are those of the hidden states a trainer's packed forward of
/// the row-major model recomputes for the same tokens, and not those of another model's.
#[test]
fn sketches_commit_to_the_hidden_states_a_packed_forward_recomputes() {
    let seed = [7u8; 32];
    let coefficients = SketchCoefficients::for_version(&seed, 0);
    let other = CausalLm::init(&tiny_config(128), 4, &Device::flex());
    for fused in [true, false] {
        let model = small_model(fused);
        let cfg = GenerationConfig {
            sketch_seed: Some(seed),
            ..sampled(4)
        };
        let worker = model.clone().with_panel_matrices();
        let (out, _) = generate_all(&worker, &cfg, &group_prompts(), 3);
        let (mut positions, mut exact, mut exact_other, mut near_other) = (0, 0, 0, 0);
        for g in &out {
            assert_eq!(g.sketches.len(), g.ids.len());
            let prompt = g.request.prompt.len();
            let ours = recomputed_sketches(&model, &g.request.prompt, &g.ids, &coefficients);
            let theirs = recomputed_sketches(&other, &g.request.prompt, &g.ids, &coefficients);
            for (j, (&claimed, &recomputed)) in g.sketches.iter().zip(&ours).enumerate() {
                assert!(
                    sketch_matches(claimed, recomputed, prompt - 1 + j),
                    "fused {fused}, prompt {}, sample {}, token {j}: {claimed} vs {recomputed}",
                    g.request.prompt_id,
                    g.request.sample_index
                );
            }
            positions += ours.len();
            exact += g.sketches.iter().zip(&ours).filter(|(a, b)| a == b).count();
            exact_other += g
                .sketches
                .iter()
                .zip(&theirs)
                .filter(|(a, b)| a == b)
                .count();
            near_other += (g.sketches.iter().zip(&theirs).enumerate())
                .filter(|(j, (a, b))| sketch_matches(**a, **b, prompt - 1 + j))
                .count();
        }
        // Within grail's tolerance of another model's is not a failure here: that tolerance is
        // wide (docs/architecture.md, verifiable rollouts); exact equality is what separates.
        eprintln!(
            "fused {fused}: {positions} positions, {exact} sketches equal to the recomputed ones, \
             {exact_other} to another model's ({near_other} within grail's tolerance of them)"
        );
        assert!(
            exact * 100 >= positions * 99,
            "{exact} of {positions} equal"
        );
        assert!(
            exact_other * 2 < positions,
            "{exact_other} of {positions} equal another model's"
        );
    }
    let (plain, _) = generate_all(&small_model(true), &sampled(4), &group_prompts(), 1);
    assert!(plain.iter().all(|g| g.sketches.is_empty()));
}

/// A worker holding weights sent at bf16 keeps its matrices at bf16 (in panel order) on the CPU:
/// it generates the same tokens, log-probs and sketches, bit for bit, as a copy holding the same
/// values at f32 in the same order (one sequence at a time and a batch of 12), and the packed
/// forward of 80 tokens recomputes the same log-probs.
#[test]
fn weights_held_at_bf16_generate_bit_for_bit_what_the_same_values_at_f32_do() {
    use burn::tensor::DType;
    use grail_core::model::NamedTensorSource;
    use grail_protocol::WireDtype;
    use grail_rollout::WeightState;
    let device = Device::flex();
    let config = tiny_config(128);
    let state = WeightState::new(&CausalLm::init(&config, 3, &device), 0, WireDtype::Bf16);
    let at_bf16 = state.build_model(&config, &device).unwrap();
    let at_f32 = CausalLm::build(
        &config,
        &mut NamedTensorSource::new(state.tensors(), &device),
    )
    .unwrap()
    .with_panel_matrices();
    assert!(at_bf16.model.layers[0].mlp.up_proj.panels);
    assert_eq!(at_bf16.lm_head_weight().dtype(), DType::BF16);
    assert_eq!(at_f32.lm_head_weight().dtype(), DType::F32);
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    for max_batch in [1, 16] {
        let cfg = GenerationConfig {
            sketch_seed: Some([5u8; 32]),
            ..sampled(max_batch)
        };
        let (a, _) = generate_all(&at_bf16, &cfg, &group_prompts(), 4);
        let (b, _) = generate_all(&at_f32, &cfg, &group_prompts(), 4);
        assert_eq!(a.len(), 12);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.ids, y.ids, "batch {max_batch}");
            assert_eq!(bits(&x.logps), bits(&y.logps), "batch {max_batch}");
            assert_eq!(x.sketches, y.sketches, "batch {max_batch}");
        }
    }
    let prompt: Vec<u32> = (0..50).map(|i| (i * 7 % 64) as u32).collect();
    let completion: Vec<u32> = (0..30).map(|i| (i * 5 % 64) as u32).collect();
    let recomputed = |m: &CausalLm| m.completion_logprobs(&prompt, &completion, 0.9).unwrap();
    assert_eq!(bits(&recomputed(&at_bf16)), bits(&recomputed(&at_f32)));
}
