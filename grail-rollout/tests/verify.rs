//! The verifier against honest workers (different batch sizes, kernels, an in-flight weight
//! update: nothing rejected) and against each way of cheating it exists to catch (every
//! completion rejected, for the right reason).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use burn::tensor::Device;
use common::{generate_switching, tiny_config};
use grail_core::model::{CausalLm, NamedTensorSource, named_tensors};
use grail_protocol::{PolicyVersion, Sample, WireDtype};
use grail_rollout::generate::{Generated, GenerationConfig, GenerationRequest, generate};
use grail_rollout::sampling::SamplingConfig;
use grail_rollout::verify::{Rejection, RolloutVerifier};

const SEED: [u8; 32] = [21; 32];

fn sampling() -> SamplingConfig {
    SamplingConfig {
        temperature: 0.9,
        top_k: 24,
        ..SamplingConfig::default()
    }
}

fn verifier() -> RolloutVerifier {
    RolloutVerifier::new(SEED, [99; 32], sampling())
}

fn config(max_batch: usize) -> GenerationConfig {
    GenerationConfig {
        sampling: sampling(),
        max_completion_length: 48,
        max_batch,
        eos_token_ids: vec![5],
        kv_block_size: 4,
        seed: max_batch as u64,
        sketch_seed: Some(SEED),
        ..GenerationConfig::default()
    }
}

fn model(seed: u64) -> CausalLm {
    CausalLm::init(&tiny_config(128), seed, &Device::flex())
}

/// [`model`] with its logits scaled by `scale` (the final norm's weight): a random model's
/// distributions are near flat, a trained one's are peaked.
fn sharpened(seed: u64, scale: f32) -> CausalLm {
    let model = model(seed);
    let mut tensors = named_tensors(&model, WireDtype::F32);
    let norm = tensors.iter_mut().find(|t| t.name == "model.norm.weight");
    norm.expect("a final norm")
        .values
        .iter_mut()
        .for_each(|w| *w *= scale);
    let device = Device::flex();
    CausalLm::build(
        &model.config,
        &mut NamedTensorSource::new(&tensors, &device),
    )
    .unwrap()
}

/// `groups` prompts of different lengths, 4 samples each.
fn requests(groups: usize) -> Vec<GenerationRequest> {
    (0..groups)
        .flat_map(|p| {
            let prompt: Arc<Vec<u32>> =
                Arc::new((0..3 + p % 7).map(|t| (t * 5 + p) as u32 % 64).collect());
            (0..4).map(move |s| GenerationRequest {
                prompt_id: p as u64,
                sample_index: s,
                prompt: prompt.clone(),
            })
        })
        .collect()
}

fn sample(g: &Generated) -> Sample {
    Sample {
        completion_ids: g.ids.clone(),
        behaviour_logps: g.logps.clone(),
        rewards: Vec::new(),
        policy_version: g.versions.iter().copied().min().unwrap_or_default(),
        token_versions: g.versions.clone(),
        sketches: g.sketches.clone(),
    }
}

fn generated(model: &CausalLm, max_batch: usize, groups: usize) -> Vec<Generated> {
    let mut out = Vec::new();
    generate(
        &worker_copy(model),
        &config(max_batch),
        requests(groups),
        |g| out.push(g),
    )
    .unwrap();
    out
}

/// `model` as a rollout worker holds it: its matrices in panel order on the CPU (the verifier
/// recomputes with the row-major model, as a trainer holds it).
fn worker_copy(model: &CausalLm) -> CausalLm {
    model.clone().with_panel_matrices()
}

/// Checks every completion with `models` (index = version); the rejections.
fn rejections(
    models: &[CausalLm],
    out: &[Generated],
    edit: impl Fn(&mut Sample),
) -> Vec<Rejection> {
    let v = verifier();
    let at = |version: PolicyVersion| models.get(version as usize).cloned();
    let samples: Vec<Sample> = out
        .iter()
        .map(|g| {
            let mut s = sample(g);
            edit(&mut s);
            s
        })
        .collect();
    let items: Vec<(&[u32], &Sample)> = out
        .iter()
        .zip(&samples)
        .map(|(g, s)| (g.request.prompt.as_slice(), s))
        .collect();
    // Packed forwards of many completions (as the trainer checks an object), and one at a
    // time: the same verdicts (the recomputed values in them may differ in the last bits).
    let all: Vec<Rejection> = v
        .check_all(&at, &items)
        .into_iter()
        .filter_map(Result::err)
        .collect();
    let one: Vec<Rejection> = items
        .iter()
        .filter_map(|(p, s)| v.check(&at, p, s).err())
        .collect();
    let reasons = |r: &[Rejection]| r.iter().map(Rejection::reason).collect::<Vec<_>>();
    assert_eq!(reasons(&all), reasons(&one));
    all
}

/// Checks every group (the completions of one prompt) of `out` with `models`, its sampling
/// evidence too; the number of groups with enough challenged positions for that evidence to be
/// tested, and each refused group's rejection.
fn group_rejections(models: &[CausalLm], out: &[Generated]) -> (usize, Vec<Rejection>) {
    let v = verifier();
    let at = |version: PolicyVersion| models.get(version as usize).cloned();
    let mut groups: BTreeMap<u64, Vec<&Generated>> = BTreeMap::new();
    for g in out {
        groups.entry(g.request.prompt_id).or_default().push(g);
    }
    let mut rejected = Vec::new();
    let mut tested = 0;
    for group in groups.values() {
        let challenged: usize = group.iter().map(|g| g.ids.len().min(v.challenges)).sum();
        tested += usize::from(challenged >= v.min_sampling_positions);
        let samples: Vec<Sample> = group.iter().map(|g| sample(g)).collect();
        let items: Vec<(&[u32], &Sample)> = (group.iter())
            .zip(&samples)
            .map(|(g, s)| (g.request.prompt.as_slice(), s))
            .collect();
        let verdicts: Result<Vec<_>, _> = v.check_all(&at, &items).into_iter().collect();
        if let Err(why) = verdicts.and_then(|v_| v.check_sampling(&v_)) {
            rejected.push(why);
        }
    }
    (tested, rejected)
}

#[test]
fn honest_workers_pass_whatever_their_batch_kernels_or_weight_updates() {
    let mut checked = 0;
    for fused in [true, false] {
        let model = model(1).with_fused_ops(fused);
        for max_batch in [1, 5, 32] {
            let out = generated(&model, max_batch, 84);
            let rejected = rejections(std::slice::from_ref(&model), &out, |_| {});
            assert!(
                rejected.is_empty(),
                "fused {fused}, batch {max_batch}: {rejected:?}"
            );
            let (_, rejected) = group_rejections(std::slice::from_ref(&model), &out);
            assert!(
                rejected.is_empty(),
                "groups, fused {fused}, batch {max_batch}: {rejected:?}"
            );
            checked += out.len();
        }
    }
    // Version 1 arrives mid-completion: each token is checked with its own version's weights.
    let (old, new) = (model(1), model(2));
    let (out, _) = generate_switching(
        &worker_copy(&old),
        &worker_copy(&new),
        &config(8),
        requests(8),
        8,
    );
    assert!(
        out.iter()
            .any(|g| g.versions.windows(2).any(|w| w[0] != w[1]))
    );
    let rejected = rejections(&[old.clone(), new.clone()], &out, |_| {});
    assert!(rejected.is_empty(), "in flight: {rejected:?}");
    let (_, rejected) = group_rejections(&[old, new], &out);
    assert!(rejected.is_empty(), "groups in flight: {rejected:?}");
    checked += out.len();
    // Peaked distributions, as a trained model's. With the GEMM in decode, one challenged sketch
    // of the ×16 ones differed from the packed forward's (an activation on a bucket's edge), which
    // an all-32 rule refused; any change of the decode arithmetic (the workers' panel-order
    // matrices are one) can bring such a flip back.
    for scale in [4.0, 16.0] {
        let model = sharpened(1, scale);
        let out = generated(&model, 8, 64);
        let rejected = rejections(std::slice::from_ref(&model), &out, |_| {});
        assert!(rejected.is_empty(), "logits ×{scale}: {rejected:?}");
        let (_, rejected) = group_rejections(std::slice::from_ref(&model), &out);
        assert!(rejected.is_empty(), "groups, logits ×{scale}: {rejected:?}");
        checked += out.len();
    }
    assert!(checked >= 2500, "{checked}");
    eprintln!("{checked} honest completions, none rejected");
}

/// Every completion in `out`, edited by `edit`, is rejected for one of `reasons`.
fn all_caught(
    models: &[CausalLm],
    out: &[Generated],
    reasons: &[&str],
    edit: impl Fn(&mut Sample),
) {
    let rejected = rejections(models, out, edit);
    eprintln!("{reasons:?}: {} of {} caught", rejected.len(), out.len());
    assert_eq!(rejected.len(), out.len(), "{reasons:?}: {rejected:?}");
    assert!(
        rejected.iter().all(|r| reasons.contains(&r.reason())),
        "{reasons:?}: {rejected:?}"
    );
}

#[test]
fn cheating_workers_are_caught() {
    let (honest, other) = (model(1), model(7));
    let models = [honest.clone()];
    let out = generated(&honest, 8, 16);

    // Another checkpoint of the same architecture, its own log-probs and sketches.
    let forged = generated(&other, 8, 16);
    all_caught(&models, &forged, &["logprob"], |_| {});
    // ... with the log-probs the honest model gives its tokens: tokens outside the honest
    // candidate set and the sketches still give it away.
    let rewritten: Vec<Generated> = forged
        .iter()
        .map(|g| {
            let mut g = g.clone();
            g.logps = honest
                .completion_logprobs(&g.request.prompt, &g.ids, 0.9)
                .unwrap();
            g
        })
        .collect();
    all_caught(
        &models,
        &rewritten,
        &["implausible_token", "sketches"],
        |_| {},
    );

    // An older version's completions claimed as the current one.
    let stale = generated(&other, 8, 16);
    all_caught(
        &[other.clone(), honest.clone()],
        &stale,
        &["logprob"],
        |s| {
            s.token_versions.iter_mut().for_each(|v| *v = 1);
            s.policy_version = 1;
        },
    );

    // One token changed after generation.
    all_caught(&models, &out, &["logprob"], |s| {
        let j = s.completion_ids.len() / 2;
        s.completion_ids[j] = (s.completion_ids[j] + 1) % 64;
    });
    // Log-probs scaled.
    all_caught(&models, &out, &["logprob"], |s| {
        s.behaviour_logps.iter_mut().for_each(|l| *l *= 1.05);
    });
    // A log-prob that is not a number.
    all_caught(&models, &out, &["logprob"], |s| {
        s.behaviour_logps[0] = f32::NAN
    });
    // The sketch column shifted by one position (where that changes it: a one-token completion
    // has nothing to shift).
    let shiftable: Vec<Generated> = (out.iter())
        .filter(|g| g.sketches.windows(2).any(|w| w[0] != w[1]))
        .cloned()
        .collect();
    assert!(shiftable.len() * 10 >= out.len() * 9);
    all_caught(&models, &shiftable, &["sketches"], |s| {
        s.sketches.rotate_right(1)
    });
    // No sketches, a token outside the vocabulary, a version the verifier never held.
    all_caught(&models, &out, &["missing_sketches"], |s| s.sketches.clear());
    all_caught(&models, &out, &["outside_vocabulary"], |s| {
        s.completion_ids[0] = 64;
    });
    all_caught(&models, &out, &["unknown_version"], |s| {
        s.token_versions.iter_mut().for_each(|v| *v = 3);
    });
}

#[test]
fn a_token_the_sampler_could_not_draw_is_caught_even_with_its_true_log_prob() {
    let honest = model(1);
    let out = generated(&honest, 8, 16);
    // The least likely token in place of the first one, with the log-prob the model gives it:
    // only the candidate set (top-k 24 of 64) can tell, and position 0 is always challenged in
    // these short completions.
    let rewritten: Vec<Generated> = out
        .iter()
        .filter(|g| g.ids.len() <= 32)
        .map(|g| {
            let mut g = g.clone();
            let first = honest.completion_hidden(&g.request.prompt, &[0]).unwrap();
            let logits = honest
                .logits(first)
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap();
            let least = (0..64u32)
                .min_by(|&a, &b| logits[a as usize].total_cmp(&logits[b as usize]))
                .unwrap();
            g.ids[0] = least;
            // Log-probs of the whole edited completion, as an honest forward gives.
            g.logps = honest
                .completion_logprobs(&g.request.prompt, &g.ids, 0.9)
                .unwrap();
            g
        })
        .collect();
    assert!(!rewritten.is_empty());
    let rejected = rejections(&[honest], &rewritten, |_| {});
    assert_eq!(rejected.len(), rewritten.len(), "{rejected:?}");
    assert!(
        rejected
            .iter()
            .all(|r| matches!(r, Rejection::Implausible { token: 0, .. })),
        "{rejected:?}"
    );
}

/// Completions drawn at `temperature` instead of the run's 0.9, with the log-probs the model
/// gives their tokens at 0.9 (what an honest worker records).
fn drawn_at(model: &CausalLm, temperature: f32, groups: usize) -> Vec<Generated> {
    let mut cfg = config(8);
    cfg.sampling.temperature = temperature;
    let mut out = Vec::new();
    generate(model, &cfg, requests(groups), |g| out.push(g)).unwrap();
    for g in &mut out {
        g.logps = model
            .completion_logprobs(&g.request.prompt, &g.ids, 0.9)
            .unwrap();
    }
    out
}

#[test]
fn a_worker_that_draws_likelier_tokens_than_its_sampler_is_caught() {
    // Greedy decoding and a lower temperature than the run's 0.9, with the model's true
    // log-probs at 0.9: every token is one the sampler could draw, so each completion on its own
    // passes; its group does not. `tested`: groups with at least 32 challenged positions (four
    // one-token completions are too few to tell anything).
    for (scale, temperature, at_least) in [(1.0, 0.0, 1.0), (4.0, 0.0, 1.0), (4.0, 0.3, 0.99)] {
        let model = sharpened(1, scale);
        let models = std::slice::from_ref(&model);
        let out = drawn_at(&model, temperature, 64);
        assert!(rejections(models, &out, |_| {}).is_empty());
        let (tested, rejected) = group_rejections(models, &out);
        eprintln!(
            "logits ×{scale}, drawn at temperature {temperature}: {} of {tested} groups caught",
            rejected.len()
        );
        assert!(tested >= 60, "{tested}");
        assert!(
            rejected.len() as f64 >= at_least * tested as f64,
            "{rejected:?}"
        );
        assert!(
            rejected.iter().all(|r| r.reason() == "sampling"),
            "{rejected:?}"
        );
    }
}

/// Completions generated on the device `GRAIL_TEST_DEVICE` names (lavapipe in CI: another
/// backend's arithmetic, the cross-GPU case in small) with the weights the verifier holds on
/// Flex, at two batch sizes and across an in-flight weight update: prints how far the worker's
/// sketches and log-probs drift from Flex's over every position, and checks that the default
/// rule (every challenged sketch exactly equal) rejects none of them.
#[test]
fn completions_from_another_backend_pass_the_default_rule() {
    let Some(name) = grail_testkit::kernel_test_device("cross-backend verification") else {
        return;
    };
    let device = grail_core::device::parse_device(&name)
        .unwrap_or_else(|e| panic!("GRAIL_TEST_DEVICE={name}: {e}"));
    // Wider than the other tests' model: 256 activations to pick the sketch's 16 from.
    let shape = grail_core::model::ModelConfig::builder()
        .vocab_size(64)
        .hidden_size(256)
        .intermediate_size(512)
        .num_hidden_layers(4)
        .num_attention_heads(4)
        .num_key_value_heads(2)
        .max_position_embeddings(128)
        .tie_word_embeddings(true)
        .build()
        .unwrap();
    let on_device = |m: &CausalLm| {
        let tensors = grail_core::model::named_tensors(m, grail_protocol::WireDtype::F32);
        let mut source = grail_core::model::NamedTensorSource::new(&tensors, &device);
        CausalLm::build(&m.config, &mut source).unwrap()
    };
    let flex = [1, 2].map(|seed| CausalLm::init(&shape, seed, &Device::flex()));
    let worker = on_device(&flex[0]);
    let mut out = Vec::new();
    for max_batch in [8, 32] {
        out.extend(generated(&worker, max_batch, 32));
    }
    // Version 1 arrives mid-completion.
    let (switched, _) =
        generate_switching(&worker, &on_device(&flex[1]), &config(8), requests(32), 8);
    assert!(
        switched
            .iter()
            .any(|g| g.versions.windows(2).any(|w| w[0] != w[1]))
    );
    // The drift, over every position (not only the challenged ones).
    let coefficients = grail_protocol::proof::SketchCoefficients::for_version(&SEED, 0);
    let (mut positions, mut equal, mut worst_sketch, mut worst_logp) = (0, 0, 0u32, 0f32);
    for g in &out {
        let hidden = flex[0]
            .completion_hidden(&g.request.prompt, &g.ids)
            .unwrap();
        let logps = flex[0].token_logprobs(hidden.clone(), &g.ids, 0.9);
        let hidden = hidden
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap();
        let sketches = coefficients.sketches(&hidden, shape.hidden_size);
        for j in 0..g.ids.len() {
            let d = grail_protocol::proof::sketch_distance(g.sketches[j], sketches[j]);
            positions += 1;
            equal += (d == 0) as usize;
            worst_sketch = worst_sketch.max(d);
            worst_logp = worst_logp.max((g.logps[j] - logps[j]).abs());
        }
    }
    eprintln!(
        "{name} vs Flex: {} completions, {positions} positions, {equal} sketches equal, \
         largest sketch distance {worst_sketch}, largest log-prob difference {worst_logp:e}",
        out.len()
    );
    let v = verifier();
    out.extend(switched);
    let samples: Vec<Sample> = out.iter().map(sample).collect();
    let items: Vec<(&[u32], &Sample)> = out
        .iter()
        .zip(&samples)
        .map(|(g, s)| (g.request.prompt.as_slice(), s))
        .collect();
    let at = |v: PolicyVersion| flex.get(v as usize).cloned();
    let rejected: Vec<Rejection> = v
        .check_all(&at, &items)
        .into_iter()
        .filter_map(Result::err)
        .collect();
    assert!(
        rejected.is_empty(),
        "{} of {}: {rejected:?}",
        rejected.len(),
        out.len()
    );
    let (tested, rejected) = group_rejections(&flex, &out);
    assert!(rejected.is_empty(), "groups: {rejected:?}");
    assert!(tested > 0);
    eprintln!(
        "{} completions generated on {name} (batch 8 and 32, an in-flight update), none rejected",
        out.len()
    );
}
