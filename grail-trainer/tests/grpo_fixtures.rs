//! Every case of `grpo/cases.json` (Liger-Kernel 0.8.5 / TRL, float64) through every log-prob path
//! of `grpo_loss`: loss, grad_hidden, grad_weight, clip_ratio and kl within 1e-4 relative error,
//! the fused paths at several chunk sizes (including ones that divide neither the token nor the
//! vocabulary count).

use burn::tensor::{Device, Int, Tensor, TensorData};
use grail_kernels::ChunkSizes;
use grail_testkit::{FixtureTensor, fixtures_root, read_tensors};
use grail_trainer::loss::{
    GrpoLossConfig, ImportanceSamplingLevel, LogProbPath, LossBatch, LossType, StepNormalizer,
    grpo_loss,
};
use serde_json::Value;
use std::collections::HashMap;

const TOL: f64 = 1e-4;

fn rel(ours: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let num: f64 = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| (*a as f64 - b).powi(2))
        .sum();
    let den: f64 = reference.iter().map(|b| b * b).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

fn config(case: &Value) -> GrpoLossConfig {
    let f = |k: &str| case.get(k).and_then(Value::as_f64);
    GrpoLossConfig {
        loss_type: serde_json::from_value::<LossType>(case["loss_type"].clone())
            .expect("known loss_type"),
        importance_sampling_level: match case
            .get("importance_sampling_level")
            .and_then(Value::as_str)
        {
            Some("sequence") => ImportanceSamplingLevel::Sequence,
            _ => ImportanceSamplingLevel::Token,
        },
        epsilon_low: f("epsilon_low").unwrap_or(0.2),
        epsilon_high: f("epsilon_high").unwrap_or(0.2),
        delta: f("delta"),
        beta: f("beta").unwrap_or(0.04), // absent means 0.04 (fixtures README)
        temperature: f("temperature").unwrap_or(1.0),
        max_completion_length: case
            .get("max_completion_length")
            .and_then(Value::as_u64)
            .unwrap_or(1) as usize,
        ..GrpoLossConfig::default()
    }
}

fn f32s(t: &FixtureTensor) -> Vec<f32> {
    t.f32()
}

#[test]
fn every_liger_case_matches_through_every_log_prob_path() {
    let root = fixtures_root().join("grpo");
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("cases.json")).unwrap()).unwrap();
    let inputs: HashMap<String, FixtureTensor> =
        read_tensors(&root.join("inputs.safetensors")).unwrap();
    let (b, t, h_dim, v) = {
        let s = &cases["shapes"];
        let g = |k: &str| s[k].as_u64().unwrap() as usize;
        (g("batch"), g("seq"), g("hidden"), g("vocab"))
    };
    let device = Device::flex();
    let hidden = Tensor::<2>::from_data(
        TensorData::new(f32s(&inputs["hidden"]), [b * t, h_dim]),
        &device,
    );
    let weight = Tensor::<2>::from_data(
        TensorData::new(f32s(&inputs["weight"]), [v, h_dim]),
        &device,
    );
    let ids: Vec<i64> = inputs["selected_token_ids"]
        .values
        .iter()
        .map(|&x| x as i64)
        .collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(ids, [b * t]), &device);
    let mask = &inputs["completion_mask"].values;
    // Only real completion tokens enter the fused op; padding cells stay out of the grid.
    let real: Vec<usize> = (0..b * t).filter(|&i| mask[i] != 0.0).collect();
    let pick = |name: &str| -> Vec<f32> {
        real.iter()
            .map(|&i| inputs[name].values[i] as f32)
            .collect()
    };
    let idx = Tensor::<1, Int>::from_data(
        TensorData::new(
            real.iter().map(|&i| i as i64).collect::<Vec<_>>(),
            [real.len()],
        ),
        &device,
    );
    let hidden_real = hidden.clone().select(0, idx.clone());
    let targets_real = targets.select(0, idx.clone());
    let norm = StepNormalizer {
        sequences: b,
        tokens: real.len(),
    };

    let list = cases["cases"].as_array().expect("cases list");
    assert!(!list.is_empty());
    for case in list {
        let name = case["name"].as_str().unwrap();
        let cfg = config(case);
        cfg.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected = read_tensors(&root.join(format!("case_{name}.safetensors"))).unwrap();
        let batch = LossBatch {
            sequences: b,
            width: t,
            cells: real.clone(),
            advantages: inputs["advantages"].f32(),
            old_logps: Some(pick("old_logps")),
            ref_logps: (cfg.beta != 0.0).then(|| pick("ref_logps")),
            is_ratio: case
                .get("use_is_ratio")
                .and_then(Value::as_bool)
                .unwrap_or(false)
                .then(|| pick("is_ratio")),
        };
        let chunk_sizes = [
            ChunkSizes {
                tokens: 7,
                vocab: 13,
            },
            ChunkSizes {
                tokens: 64,
                vocab: 97,
            },
            ChunkSizes::default(),
        ];
        let paths = chunk_sizes
            .into_iter()
            .flat_map(|c| [LogProbPath::Fused(c), LogProbPath::FusedAutodiff(c)])
            .chain([LogProbPath::Reference]);
        for path in paths {
            let what = format!("{name} {path:?}");
            let h = hidden_real.clone().autodiff().require_grad();
            let w = weight.clone().autodiff().require_grad();
            let loss = grpo_loss(
                path,
                &cfg,
                norm,
                &batch,
                h.clone(),
                w.clone(),
                targets_real.clone().autodiff(),
            )
            .unwrap();
            let stats = loss.stats;
            let e = rel(&[stats.loss as f32], &expected["loss"].values);
            assert!(
                e <= TOL,
                "{what}: loss {} vs {:?} (rel {e:e})",
                stats.loss,
                expected["loss"].values
            );
            let grads = loss.objective.backward();
            // Scatter the real-token gradient rows back to the [B·T, H] layout of the reference.
            let gh_full = Tensor::<2>::zeros([b * t, h_dim], &device).select_assign(
                0,
                idx.clone(),
                h.grad(&grads).unwrap(),
                burn::tensor::IndexingUpdateOp::Add,
            );
            let e = rel(
                &gh_full.into_data().try_to_vec::<f32>().unwrap(),
                &expected["grad_hidden"].values,
            );
            assert!(e <= TOL, "{what}: grad_hidden rel {e:e}");
            let e = rel(
                &w.grad(&grads)
                    .unwrap()
                    .into_data()
                    .try_to_vec::<f32>()
                    .unwrap(),
                &expected["grad_weight"].values,
            );
            assert!(e <= TOL, "{what}: grad_weight rel {e:e}");
            let e = rel(&[stats.clip_ratio() as f32], &expected["clip_ratio"].values);
            assert!(
                e <= TOL,
                "{what}: clip_ratio {} vs {:?}",
                stats.clip_ratio(),
                expected["clip_ratio"].values
            );
            if let Some(kl) = expected.get("kl") {
                let e = rel(&[stats.kl() as f32], &kl.values);
                assert!(e <= TOL, "{what}: kl {} vs {:?}", stats.kl(), kl.values);
            }
        }
    }
}
