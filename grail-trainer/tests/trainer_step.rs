//! Trainer-level guarantees: micro-batch invariance, packed = padded, fused = naive, and clear
//! errors for bad input.

use std::sync::Arc;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use grail_core::model::{CausalLm, ModelConfig};
use grail_protocol::{Group, Sample, WeightPayload};
use grail_trainer::config::TrainerConfig;
use grail_trainer::loss::LossType;
use grail_trainer::off_policy::ImportanceSamplingMode;
use grail_trainer::trainer::GrpoTrainer;
use grail_trainer::{StepGradients, StepOutcome, TrainerError};

fn tiny_config() -> ModelConfig {
    ModelConfig::builder()
        .vocab_size(64)
        .hidden_size(32)
        .intermediate_size(64)
        .num_hidden_layers(2)
        .num_attention_heads(4)
        .num_key_value_heads(2)
        .max_position_embeddings(128)
        .tie_word_embeddings(true)
        .build()
        .unwrap()
}

fn model(seed: u64) -> CausalLm {
    CausalLm::init(&tiny_config(), seed, &Device::flex().autodiff())
}

/// Deterministic pseudo-random groups: prompts of 3–6 tokens, completions of 1–9.
fn groups(n_groups: usize, per_group: usize, seed: u64) -> Vec<Group> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move |m: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % m
    };
    (0..n_groups)
        .map(|g| {
            let prompt: Vec<u32> = (0..3 + next(4)).map(|_| next(64) as u32).collect();
            let samples = (0..per_group)
                .map(|_| {
                    let c = 1 + next(9) as usize;
                    Sample::new(
                        (0..c).map(|_| next(64) as u32).collect(),
                        (0..c).map(|_| -(next(400) as f32) / 100.0 - 2.0).collect(),
                        vec![next(100) as f32 / 100.0],
                        0,
                    )
                })
                .collect();
            Group {
                prompt_id: g as u64,
                prompt_ids: Arc::new(prompt),
                samples,
            }
        })
        .collect()
}

fn flat_grads(model: &CausalLm, grads: &GradientsParams) -> Vec<f32> {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        out: Vec<f32>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let g = self
                .grads
                .get::<D>(param.id)
                .expect("every parameter has a gradient");
            self.out
                .extend(g.into_data().convert::<f32>().try_to_vec::<f32>().unwrap());
        }
    }
    let mut c = Collect {
        grads,
        out: Vec::new(),
    };
    model.visit(&mut c);
    c.out
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn grads_with(cfg: TrainerConfig, groups: &[Group]) -> (Vec<f32>, f64) {
    let trainer = GrpoTrainer::new(model(7), None, cfg).unwrap();
    let pass = trainer.gradients(groups).unwrap();
    (flat_grads(trainer.model(), &pass.grads), pass.stats.loss)
}

fn base_config(loss_type: LossType) -> TrainerConfig {
    let mut cfg = TrainerConfig::default();
    cfg.loss.loss_type = loss_type;
    cfg.loss.max_completion_length = 9;
    cfg.max_tokens_per_microbatch = 4096;
    // The synthetic behaviour log-probs are far from the model's: truncate (a sequence mask would
    // zero most sequences and leave little gradient to compare).
    cfg.importance_sampling_mode = ImportanceSamplingMode::TokenTruncate;
    cfg.importance_sampling_cap = 2.0;
    cfg
}

#[test]
fn gradients_do_not_depend_on_the_token_budget() {
    let data = groups(3, 4, 1);
    for loss_type in [LossType::Grpo, LossType::Dapo, LossType::DrGrpo] {
        let (one, loss_one) = grads_with(base_config(loss_type), &data);
        let mut small = base_config(loss_type);
        small.max_tokens_per_microbatch = 16; // forces many micro-batches
        let (many, loss_many) = grads_with(small, &data);
        let e = rel(&many, &one);
        assert!(
            e <= 1e-5,
            "{loss_type:?}: gradient rel err {e:e} between budgets"
        );
        assert!(
            (loss_one - loss_many).abs() <= 1e-6,
            "{loss_type:?}: loss {loss_one} vs {loss_many}"
        );
        assert!(
            one.iter().any(|g| *g != 0.0),
            "{loss_type:?}: gradients are all zero"
        );
    }
}

#[test]
fn packed_and_padded_steps_agree() {
    let data = groups(2, 4, 2);
    let (packed, loss_packed) = grads_with(base_config(LossType::Dapo), &data);
    let mut padded = base_config(LossType::Dapo);
    padded.packing = false;
    let (pad, loss_pad) = grads_with(padded, &data);
    assert!(rel(&pad, &packed) <= 1e-5, "rel {:e}", rel(&pad, &packed));
    assert!((loss_packed - loss_pad).abs() <= 1e-6);
}

#[test]
fn fused_and_naive_logprob_paths_agree() {
    let data = groups(2, 3, 3);
    let mut cfg = base_config(LossType::Grpo);
    cfg.loss.temperature = 0.7;
    let (fused, loss_f) = grads_with(cfg.clone(), &data);
    cfg.naive_logprob = true;
    let (naive, loss_n) = grads_with(cfg, &data);
    assert!(rel(&fused, &naive) <= 1e-5, "rel {:e}", rel(&fused, &naive));
    assert!((loss_f - loss_n).abs() <= 1e-6);
}

#[test]
fn a_step_updates_weights_and_the_version() {
    let data = groups(2, 4, 4);
    let mut cfg = base_config(LossType::Dapo);
    cfg.learning_rate = 1e-3;
    cfg.num_iterations = 2;
    let mut trainer = GrpoTrainer::new(model(3), None, cfg).unwrap();
    let before = trainer.weight_update();
    let metrics = trainer.train_step(&data).unwrap().into_metrics();
    assert_eq!(metrics.len(), 2);
    assert_eq!(trainer.version(), 2);
    assert!(
        metrics
            .iter()
            .all(|m| m.loss.is_finite() && m.grad_norm > 0.0 && m.tokens_per_s > 0.0)
    );
    let after = trainer.weight_update();
    assert_eq!(after.version, 2);
    let (WeightPayload::Full(before), WeightPayload::Full(after)) = (before.payload, after.payload)
    else {
        panic!("weight_update is a full payload");
    };
    assert_eq!(after.len(), before.len());
    assert!(
        before
            .iter()
            .zip(after.iter())
            .any(|(a, b)| a.values != b.values)
    );
}

#[test]
fn a_batch_with_nothing_to_train_is_an_outcome_not_an_error() {
    let mut data = groups(2, 3, 6);
    for s in data.iter_mut().flat_map(|g| &mut g.samples) {
        s.rewards[0] = 0.5;
    }
    let mut cfg = base_config(LossType::Dapo);
    cfg.filter_zero_std_groups = true;
    let mut trainer = GrpoTrainer::new(model(3), None, cfg).unwrap();
    let before = trainer.weight_update();
    let outcome = trainer.train_step(&data).unwrap();
    assert_eq!(
        outcome,
        StepOutcome::NothingToTrain {
            groups: 2,
            samples: 6
        }
    );
    assert!(outcome.metrics().is_empty());
    assert_eq!((trainer.step(), trainer.version()), (0, 0));
    assert_eq!(trainer.weight_update(), before);
    // A spread in one group: that group trains and the other is counted as dropped.
    data[1].samples[0].rewards[0] = 1.0;
    let m = trainer.train_step(&data).unwrap().into_metrics().remove(0);
    assert_eq!(
        (m.dropped_zero_std_groups, m.dropped_zero_std_samples),
        (1, 3)
    );
    assert_eq!((m.sequences, trainer.version()), (3, 1));
}

#[test]
fn bad_input_is_a_clear_error() {
    let trainer = GrpoTrainer::new(model(1), None, base_config(LossType::Dapo)).unwrap();
    let msg = |r: Result<StepGradients, TrainerError>| match r {
        Ok(_) => panic!("should fail"),
        Err(e) => e.to_string(),
    };

    assert!(msg(trainer.gradients(&[])).contains("no groups"));
    let mut empty = groups(1, 2, 5);
    empty[0].samples.clear();
    assert!(msg(trainer.gradients(&empty)).contains("empty"));
    let mut nan = groups(2, 2, 5);
    nan[1].samples[0].rewards[0] = f32::NAN;
    let m = msg(trainer.gradients(&nan));
    assert!(m.contains("group 1 sample 0") && m.contains("NaN"), "{m}");
    let mut mismatch = groups(1, 2, 5);
    mismatch[0].samples[1].behaviour_logps.pop();
    assert!(msg(trainer.gradients(&mismatch)).contains("behaviour log-probs"));

    let mut small = base_config(LossType::Dapo);
    small.max_tokens_per_microbatch = 4;
    let t = GrpoTrainer::new(model(1), None, small).unwrap();
    assert!(msg(t.gradients(&groups(1, 2, 5))).contains("max_tokens_per_microbatch"));

    let mut beta = base_config(LossType::Dapo);
    beta.loss.beta = 0.04;
    let err = GrpoTrainer::new(model(1), None, beta)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("beta") && err.contains("reference"), "{err}");

    let mut bad = base_config(LossType::Dapo);
    bad.learning_rate = -1.0;
    assert!(
        GrpoTrainer::new(model(1), None, bad)
            .err()
            .unwrap()
            .to_string()
            .contains("learning_rate")
    );
    let plain = CausalLm::init(&tiny_config(), 1, &Device::flex());
    assert!(
        GrpoTrainer::new(plain, None, base_config(LossType::Dapo))
            .err()
            .unwrap()
            .to_string()
            .contains("autodiff")
    );
}

#[test]
fn sft_steps_lower_the_loss_and_keep_the_policy_version() {
    use grail_trainer::sft::SftExample;
    let mut cfg = base_config(LossType::Dapo);
    cfg.max_tokens_per_microbatch = 40; // several micro-batches
    let mut trainer = GrpoTrainer::new(model(5), None, cfg).unwrap();
    let examples: Vec<SftExample> = (0..6)
        .map(|i| SftExample {
            prompt: vec![1 + i, 2, 3],
            completion: vec![10 + i, 20, 30 + i, 40],
        })
        .collect();
    let first = trainer.sft_step(&examples, 1e-2).unwrap();
    let mut last = first;
    for _ in 0..20 {
        last = trainer.sft_step(&examples, 1e-2).unwrap();
    }
    assert!(
        last.loss < 0.5 * first.loss,
        "SFT loss {} → {}",
        first.loss,
        last.loss
    );
    assert_eq!(first.tokens, 24);
    assert_eq!(trainer.version(), 0);
    assert!(trainer.sft_step(&[], 1e-2).is_err());
}

/// Groups whose behaviour log-probs are the policy's own plus ln 1.5: every token was 1.5× more
/// likely under the sampler, so π_prox / π_behav = 2/3 exactly.
fn groups_sampled_by_a_shifted_policy() -> Vec<Group> {
    let policy = model(7);
    let mut data = groups(2, 4, 5);
    for g in &mut data {
        for s in &mut g.samples {
            s.behaviour_logps = policy
                .completion_logprobs(&g.prompt_ids, &s.completion_ids, 1.0)
                .unwrap()
                .into_iter()
                .map(|l| l + 1.5f32.ln())
                .collect();
        }
    }
    data
}

#[test]
fn the_decoupled_objective_weights_by_the_behaviour_ratio_and_the_coupled_one_clips() {
    let data = groups_sampled_by_a_shifted_policy();
    let mut off = base_config(LossType::Dapo);
    off.importance_sampling_correction = false;
    let (plain, _) = grads_with(off.clone(), &data);

    // Decoupled, token_truncate (C = 3): the clipped ratio π_θ/π_prox is 1, every token weighs
    // π_prox/π_behav = 2/3, so the gradient is exactly 2/3 of the uncorrected one.
    let mut decoupled = base_config(LossType::Dapo);
    decoupled.importance_sampling_cap = 3.0;
    let (weighted, _) = grads_with(decoupled.clone(), &data);
    let scaled: Vec<f32> = plain.iter().map(|g| g * 2.0 / 3.0).collect();
    let e = rel(&weighted, &scaled);
    assert!(e <= 1e-5, "decoupled gradient ≠ 2/3 × plain: rel err {e:e}");
    let mut t = GrpoTrainer::new(model(7), None, decoupled).unwrap();
    let m = t.train_step(&data).unwrap().into_metrics().remove(0);
    assert!(
        (m.importance_sampling_ratio_mean.unwrap() - 2.0 / 3.0).abs() < 1e-4,
        "{m:?}"
    );
    assert!((m.behaviour_logp_diff_max.unwrap() - 1.5f64.ln()).abs() < 1e-4);
    assert_eq!(m.clip_ratio_region, 0.0);

    // Coupled (classic PPO against the sampler): the ratio π_θ/π_behav = 2/3 is below 1 − ε for
    // every token; no separate behaviour weight, and the IS metrics are still reported.
    let mut coupled = base_config(LossType::Dapo);
    coupled.use_decoupled_loss = false;
    let mut t = GrpoTrainer::new(model(7), None, coupled.clone()).unwrap();
    let m = t.train_step(&data).unwrap().into_metrics().remove(0);
    assert!((m.clip_ratio_region - 1.0).abs() < 1e-9, "{m:?}");
    assert!(m.clip_ratio_low > 0.0);
    // Tokens with a negative advantage are clipped (no gradient); positive ones keep 2/3 × A.
    let (classic, _) = grads_with(coupled, &data);
    assert!(
        rel(&classic, &plain) > 1e-3,
        "coupled should differ from plain"
    );
}

#[test]
fn each_is_mode_scales_the_loss_by_its_hand_computed_weights() {
    use burn::tensor::{Int, TensorData};
    use grail_kernels::ChunkSizes;
    use grail_trainer::loss::{GrpoLossConfig, LogProbPath, LossBatch, StepNormalizer, grpo_loss};
    use grail_trainer::off_policy::ImportanceSamplingCorrection;
    let device = Device::flex();
    let hidden = Tensor::<2>::random(
        [5, 8],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let weight = Tensor::<2>::random(
        [11, 8],
        burn::tensor::Distribution::Normal(0.0, 0.5),
        &device,
    );
    let targets =
        Tensor::<1, Int>::from_data(TensorData::new(vec![1i64, 4, 7, 2, 9], [5]), &device);
    // Token ratios π_prox/π_behav: sequence 0: 3, 1/4, 1 (product 3/4); sequence 1: 3/2, 3/2
    // (product 9/4). Advantages 1 and −1/2; dapo over 5 tokens; C = 2 (mask range [1/2, 2]).
    let behav = vec![vec![-2.0f32, -1.0, -0.5], vec![-3.0, -1.5]];
    let ratios = [vec![3.0f64, 0.25, 1.0], vec![1.5, 1.5]];
    let prox: Vec<Vec<f32>> = behav
        .iter()
        .zip(&ratios)
        .map(|(b, r)| {
            b.iter()
                .zip(r)
                .map(|(&b, &r)| (b as f64 + r.ln()) as f32)
                .collect()
        })
        .collect();
    let cases = [
        // (mode, expected loss, tokens with zero gradient)
        (
            ImportanceSamplingMode::TokenTruncate,
            -(3.25 - 0.5 * 3.0) / 5.0,
            vec![],
        ),
        (
            ImportanceSamplingMode::TokenMask,
            -(1.0 - 0.5 * 3.0) / 5.0,
            vec![0, 1],
        ),
        (
            ImportanceSamplingMode::SequenceTruncate,
            -(2.25 - 0.5 * 4.0) / 5.0,
            vec![],
        ),
        (
            ImportanceSamplingMode::SequenceMask,
            -2.25 / 5.0,
            vec![3, 4],
        ),
    ];
    for (mode, want, zero_rows) in cases {
        let correction = ImportanceSamplingCorrection {
            mode,
            cap: 2.0,
            ..ImportanceSamplingCorrection::default()
        };
        let (weights, _) = correction.weights(&prox, &behav);
        let batch = LossBatch {
            sequences: 2,
            width: 3,
            cells: vec![0, 1, 2, 3, 4],
            advantages: vec![1.0, -0.5],
            old_logps: None,
            ref_logps: None,
            is_ratio: Some(weights.concat()),
        };
        let norm = StepNormalizer {
            sequences: 2,
            tokens: 5,
        };
        let h = hidden.clone().autodiff().require_grad();
        let loss = grpo_loss(
            LogProbPath::Fused(ChunkSizes::default()),
            &GrpoLossConfig::default(),
            norm,
            &batch,
            h.clone(),
            weight.clone().autodiff().require_grad(),
            targets.clone().autodiff(),
        )
        .unwrap();
        assert!(
            (loss.stats.loss - want).abs() < 1e-5,
            "{mode:?}: loss {} want {want}",
            loss.stats.loss
        );
        let gh = h.grad(&loss.objective.backward()).unwrap();
        let gh: Vec<f32> = gh.into_data().try_to_vec::<f32>().unwrap();
        for row in 0..5 {
            let norm: f32 = gh[row * 8..(row + 1) * 8].iter().map(|g| g.abs()).sum();
            assert_eq!(norm == 0.0, zero_rows.contains(&row), "{mode:?} row {row}");
        }
    }
}

#[test]
fn a_grpo_step_has_the_same_loss_and_gradients_with_fused_ops_on_and_off() {
    // On: fused kernels and the log-prob op as a backward node on the model's graph. Off: plain
    // tensor math and the portable surrogate path for the log-probs.
    let data = groups(3, 4, 2);
    let cfg = base_config(LossType::Dapo);
    let run = |fused: bool| {
        let policy = model(7).with_fused_ops(fused);
        assert_eq!(policy.uses_fused_ops(), fused);
        let trainer = GrpoTrainer::new(policy, None, cfg.clone()).unwrap();
        let pass = trainer.gradients(&data).unwrap();
        (flat_grads(trainer.model(), &pass.grads), pass.stats.loss)
    };
    let (on, loss_on) = run(true);
    let (off, loss_off) = run(false);
    assert!(
        (loss_on - loss_off).abs() <= 1e-5 * loss_off.abs().max(1e-2),
        "loss {loss_on} vs {loss_off}"
    );
    let e = rel(&on, &off);
    assert!(e <= 1e-5, "gradient rel err {e:e}");
}

#[test]
fn gradient_checkpointing_gives_the_same_loss_and_gradients() {
    // Tied embeddings (their gradient comes from the lm_head and the embedding lookup, in two
    // backward passes here), an untied Qwen3 with its q/k norms; fused and plain ops; packed
    // rows in several micro-batches, and padded rows.
    let qwen3 = ModelConfig::builder()
        .family(grail_core::model::ModelFamily::Qwen3)
        .vocab_size(64)
        .hidden_size(32)
        .intermediate_size(64)
        .num_hidden_layers(3)
        .num_attention_heads(4)
        .num_key_value_heads(2)
        .head_dim(12)
        .max_position_embeddings(128)
        .build()
        .unwrap();
    let data = groups(3, 4, 5);
    for (name, config) in [("tied qwen2", tiny_config()), ("untied qwen3", qwen3)] {
        for fused in [true, false] {
            for (budget, packing) in [(4096, true), (24, true), (4096, false)] {
                let case = format!("{name}, fused {fused}, budget {budget}, packing {packing}");
                let run = |checkpointing: bool| {
                    let policy = CausalLm::init(&config, 7, &Device::flex().autodiff())
                        .with_fused_ops(fused);
                    let mut cfg = base_config(LossType::Dapo);
                    cfg.max_tokens_per_microbatch = budget;
                    cfg.packing = packing;
                    cfg.gradient_checkpointing = checkpointing;
                    let trainer = GrpoTrainer::new(policy, None, cfg).unwrap();
                    let pass = trainer.gradients(&data).unwrap();
                    let grads = flat_grads(trainer.model(), &pass.grads);
                    (grads, pass.stats.loss, pass.micro_batches)
                };
                let (plain, loss, micro_batches) = run(false);
                let (checkpointed, loss_ckpt, _) = run(true);
                assert!(
                    budget > 1000 || micro_batches > 1,
                    "{case}: one micro-batch"
                );
                assert!(plain.iter().any(|g| *g != 0.0), "{case}: no gradient");
                assert_eq!(loss, loss_ckpt, "{case}: loss");
                let e = rel(&checkpointed, &plain);
                assert!(e <= 1e-6, "{case}: gradient rel err {e:e}");
            }
        }
    }
}

#[test]
fn fused_adamw_matches_burns_adamw() {
    use burn::optim::AdamWConfig;
    use grail_trainer::optimizer::FusedAdamW;
    let data = groups(2, 4, 9);
    let cfg = base_config(LossType::Dapo);
    let trainer = GrpoTrainer::new(model(7), None, cfg).unwrap();
    let mut fused_opt = FusedAdamW::new(0.9, 0.95, 1e-8, 0.1).init();
    let mut burn_opt = AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.95)
        .with_epsilon(1e-8)
        .with_weight_decay(0.1)
        .init();
    let (mut a, mut b) = (trainer.model().clone(), trainer.model().clone());
    for step in 0..3 {
        let grads = trainer.gradients(&data).unwrap().grads;
        let flat = flat_grads(trainer.model(), &grads);
        assert!(flat.iter().any(|g| *g != 0.0));
        let ga = trainer.gradients(&data).unwrap().grads;
        a = fused_opt.step(1e-2, a, ga);
        b = burn_opt.step(1e-2, b, grads);
        let (pa, pb) = (params(&a), params(&b));
        let e = rel(&pa, &pb);
        assert!(e <= 1e-6, "step {step}: params rel err {e:e}");
    }
}

fn params(model: &CausalLm) -> Vec<f32> {
    struct Collect(Vec<f32>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.extend(
                param
                    .val()
                    .into_data()
                    .convert::<f32>()
                    .try_to_vec::<f32>()
                    .unwrap(),
            );
        }
    }
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}

/// The trainer on the device `GRAIL_TEST_DEVICE` names (a GPU, or lavapipe with `vulkan:cpu`,
/// which CI runs): the gradients of a GRPO step (fused model, fused log-probs with their backward
/// node, the loss) and the weights after a full step (clipping, AdamW through the fused kernels)
/// equal the same on Flex.
#[test]
fn a_step_on_the_kernel_device_equals_the_step_on_flex() {
    let Some(name) = grail_testkit::kernel_test_device("kernel trainer step") else {
        return;
    };
    let device = grail_core::device::parse_device(&name)
        .unwrap_or_else(|e| panic!("GRAIL_TEST_DEVICE={name}: {e}"));
    // ε = 1e-4: Adam divides each gradient by its own magnitude, so a gradient that is zero up to
    // rounding (the k_proj bias: softmax ignores a shift shared by all keys) would otherwise
    // become a ±lr step whose sign is rounding noise and differs between devices.
    let cfg = TrainerConfig {
        learning_rate: 1e-2,
        max_grad_norm: 0.5,
        adam_epsilon: 1e-4,
        ..TrainerConfig::default()
    };
    let g = groups(3, 4, 11);
    let reference = model(7);
    let kernel = reference.clone().fork(&device.autodiff());
    let on = |m: CausalLm| GrpoTrainer::new(m, None, cfg.clone()).unwrap();
    let (mut r, mut k) = (on(reference), on(kernel));
    let (pass_r, pass_k) = (r.gradients(&g).unwrap(), k.gradients(&g).unwrap());
    let e = rel(
        &flat_grads(k.model(), &pass_k.grads),
        &flat_grads(r.model(), &pass_r.grads),
    );
    assert!(e <= 1e-5, "gradient rel err {e:e}");
    let (loss_k, loss_r) = (pass_k.stats.loss, pass_r.stats.loss);
    assert!((loss_k - loss_r).abs() <= 1e-5 * (1.0 + loss_r.abs()));
    r.train_step(&g).unwrap();
    k.train_step(&g).unwrap();
    let weights = |t: &GrpoTrainer| match t.weight_update().payload {
        WeightPayload::Full(tensors) => tensors,
        _ => panic!("weight_update is a full payload"),
    };
    for (a, b) in weights(&k).iter().zip(weights(&r).iter()) {
        let e = rel(&a.values, &b.values);
        assert!(
            e <= 1e-5,
            "{}: weights after the step, rel err {e:e}",
            a.name
        );
    }
}
