//! The trainer's published weights reach a worker exactly: sparse bf16 deltas and full updates
//! leave a [`WeightState`] holding the trainer's weights rounded to bf16, and a worker that
//! missed an update refuses the next delta.

use std::sync::Arc;

use burn::tensor::Device;
use grail_core::model::{CausalLm, ModelConfig};
use grail_protocol::{Group, Sample, SyncMode, WeightPayload, WireDtype};
use grail_rollout::WeightState;
use grail_trainer::WeightPublisher;
use grail_trainer::config::TrainerConfig;
use grail_trainer::off_policy::ImportanceSamplingMode;
use grail_trainer::trainer::GrpoTrainer;

fn model() -> CausalLm {
    CausalLm::init(
        &ModelConfig::builder()
            .vocab_size(48)
            .hidden_size(32)
            .intermediate_size(64)
            .num_hidden_layers(2)
            .num_attention_heads(4)
            .num_key_value_heads(2)
            .max_position_embeddings(64)
            .build()
            .unwrap(),
        11,
        &Device::flex().autodiff(),
    )
}

fn batch(step: usize, version: u64) -> Vec<Group> {
    (0..2)
        .map(|g| Group {
            prompt_id: (step * 2 + g) as u64,
            prompt_ids: Arc::new(vec![1 + g as u32, 2, 3 + step as u32 % 7]),
            samples: (0..3)
                .map(|s| {
                    let c = 2 + (step + s + g) % 4;
                    Sample::new(
                        (0..c)
                            .map(|t| ((t * 5 + s * 3 + step) % 48) as u32)
                            .collect(),
                        vec![-3.0; c],
                        vec![((s * 7 + g + step) % 5) as f32],
                        version,
                    )
                })
                .collect(),
        })
        .collect()
}

fn config() -> TrainerConfig {
    TrainerConfig {
        learning_rate: 1e-2,
        weight_decay: 0.01,
        warmup_steps: 2,
        max_steps: 6,
        lr_scheduler_type: grail_trainer::schedule::LrSchedulerType::Cosine,
        num_iterations: 2,
        importance_sampling_mode: ImportanceSamplingMode::TokenTruncate,
        importance_sampling_cap: 2.0,
        ..TrainerConfig::default()
    }
}

#[test]
fn delta_sync_reproduces_the_trainers_bf16_weights_exactly() {
    let initial = model();
    let mut delta_state = WeightState::new(&initial, 0, WireDtype::Bf16);
    let mut full_state = WeightState::new(&initial, 0, WireDtype::Bf16);
    let mut delta = WeightPublisher::new(SyncMode::Delta, WireDtype::Bf16, &initial, 0);
    let mut full = WeightPublisher::new(SyncMode::Full, WireDtype::Bf16, &initial, 0);
    let mut cfg = config();
    cfg.learning_rate = 1e-6; // TRL's default: most bf16 values do not move in a step
    let mut trainer = GrpoTrainer::new(initial, None, cfg).unwrap();
    let mut ratios = Vec::new();
    for s in 0..4 {
        trainer.train_step(&batch(s, trainer.version())).unwrap();
        let d = delta.publish(trainer.version(), trainer.model());
        let f = full.publish(trainer.version(), trainer.model());
        ratios.push(d.payload.wire_bytes() as f64 / delta.full_bytes() as f64);
        delta_state.apply(&d).unwrap();
        full_state.apply(&f).unwrap();
        assert_eq!(
            delta_state.tensors(),
            full_state.tensors(),
            "step {s}: delta and full disagree"
        );
    }
    // Exactly the trainer's weights rounded to bf16.
    let WeightPayload::Full(exact) = trainer.weight_update().payload else {
        panic!()
    };
    let mut exact = exact.as_ref().clone();
    exact.sort_by(|a, b| a.name.cmp(&b.name));
    for (mine, theirs) in delta_state.tensors().iter().zip(&exact) {
        assert_eq!(mine.name, theirs.name);
        assert!(
            mine.values
                .iter()
                .zip(&theirs.values)
                .all(|(a, b)| *a == half::bf16::from_f32(*b).to_f32())
        );
    }
    assert!(
        ratios.iter().all(|&r| r < 0.5),
        "delta bytes / full bytes: {ratios:?}"
    );
    // A worker that missed an update refuses the next delta instead of drifting.
    trainer.train_step(&batch(9, trainer.version())).unwrap();
    let _skipped = delta.publish(trainer.version(), trainer.model());
    trainer.train_step(&batch(10, trainer.version())).unwrap();
    let next = delta.publish(trainer.version(), trainer.model());
    assert!(
        delta_state
            .apply(&next)
            .unwrap_err()
            .to_string()
            .contains("in order")
    );
}
