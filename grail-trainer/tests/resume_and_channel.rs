//! Resume is bit-identical; the channel runner trains, drops stale groups and publishes weights;
//! published weights reach a worker's `WeightState` exactly (sparse bf16 deltas and full updates),
//! and a worker that missed an update refuses the next delta.

use std::sync::Arc;

use burn::tensor::Device;
use grail_core::checkpoint::load_model;
use grail_core::model::{CausalLm, ModelConfig};
use grail_protocol::{Group, PoolMessage, Sample, SyncMode, WeightPayload, WireDtype};
use grail_rollout::WeightState;
use grail_trainer::channel::{ChannelRun, RunEvent};
use grail_trainer::config::TrainerConfig;
use grail_trainer::off_policy::ImportanceSamplingMode;
use grail_trainer::trainer::GrpoTrainer;
use grail_trainer::{PoolFeedback, WeightPublisher};

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

fn weights(t: &GrpoTrainer) -> Vec<(String, Vec<u32>)> {
    let WeightPayload::Full(tensors) = t.weight_update().payload else {
        panic!("full payload");
    };
    tensors
        .iter()
        .map(|n| {
            (
                n.name.clone(),
                n.values.iter().map(|v| v.to_bits()).collect(),
            )
        })
        .collect()
}

#[test]
fn resume_is_bit_identical() {
    let steps = 3;
    let mut straight = GrpoTrainer::new(model(), None, config()).unwrap();
    for s in 0..steps {
        straight.train_step(&batch(s, 0)).unwrap();
    }

    let mut first = GrpoTrainer::new(model(), None, config()).unwrap();
    first.train_step(&batch(0, 0)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    first.save_state(&state).unwrap();
    drop(first);
    let mut resumed = GrpoTrainer::load_state(&state, &Device::flex(), None).unwrap();
    assert_eq!(resumed.step(), 2);
    assert_eq!(resumed.version(), 2);
    for s in 1..steps {
        resumed.train_step(&batch(s, 0)).unwrap();
    }
    assert_eq!(resumed.step(), straight.step());
    assert_eq!(weights(&resumed), weights(&straight));
    // The saved weights are a regular HF checkpoint.
    assert!(load_model(&state, &Device::flex()).is_ok());
}

#[test]
fn channel_run_trains_drops_stale_and_publishes() {
    let (group_tx, group_rx) = flume::bounded(16);
    let (feedback_tx, feedback_rx) = flume::unbounded();
    let mut cfg = config();
    cfg.num_iterations = 1;
    let mut trainer = GrpoTrainer::new(model(), None, cfg).unwrap();
    let mut feedback = PoolFeedback::new(
        feedback_tx,
        WeightPublisher::new(SyncMode::Full, WireDtype::F32, trainer.model(), 0),
    );
    // Fresh, fresh, then a group two versions old at step 2 (max_staleness 1), then fresh ones.
    for g in batch(0, 0) {
        group_tx.send(g).unwrap();
    }
    for g in batch(1, 0) {
        group_tx.send(g).unwrap();
    }
    let mut stale = batch(2, 0);
    stale.truncate(1);
    group_tx.send(stale.remove(0)).unwrap();
    for g in batch(3, 2) {
        group_tx.send(g).unwrap();
    }
    let extra = batch(4, 3).remove(0);
    group_tx.send(extra).unwrap();
    drop(group_tx);
    let mut seen = Vec::new();
    let stats = trainer
        .run_from_channel(
            &group_rx,
            Some(&mut feedback),
            &ChannelRun::new(2, 1, 10),
            |_, e| {
                if let RunEvent::Step { metrics: m, .. } = e {
                    seen.push(m.step);
                }
                std::ops::ControlFlow::Continue(())
            },
        )
        .unwrap();
    assert_eq!(seen, vec![1, 2, 3]);
    assert_eq!(stats.dropped_stale, 3);
    assert_eq!(stats.trained, 18);
    assert_eq!(stats.unused_at_close, 3);
    assert_eq!(
        stats.received,
        stats.trained + stats.dropped_stale + stats.unused_at_close
    );
    // Weights after each step; every settled group reported back, the stale one at once.
    let messages: Vec<String> = feedback_rx
        .try_iter()
        .map(|m| match m {
            PoolMessage::Weights(u) => format!("w{}", u.version),
            PoolMessage::Consumed(n) => format!("c{n}"),
        })
        .collect();
    assert_eq!(messages, ["w1", "c2", "w2", "c4", "c5", "w3", "c7"]);
}

#[test]
fn a_silent_pool_is_a_stall_error_naming_the_cause() {
    let (group_tx, group_rx) = flume::bounded::<grail_protocol::Group>(4);
    let mut trainer = GrpoTrainer::new(model(), None, config()).unwrap();
    let run = ChannelRun {
        stall_timeout: Some(std::time::Duration::from_secs(2)),
        ..ChannelRun::new(2, 1, 3)
    };
    let mut waits = 0;
    let err = trainer
        .run_from_channel(&group_rx, None, &run, |_, e| {
            if let RunEvent::Waiting { .. } = e {
                waits += 1;
            }
            std::ops::ControlFlow::Continue(())
        })
        .unwrap_err();
    drop(group_tx);
    let msg = err.to_string();
    assert!(
        msg.contains("no group arrived from the rollout pool"),
        "{msg}"
    );
    assert!(waits >= 1, "the caller saw no waiting event");
    // A caller may also stop while waiting (Ctrl-C): the run returns at once, without error.
    let (_tx, rx) = flume::bounded::<grail_protocol::Group>(4);
    let stats = trainer
        .run_from_channel(&rx, None, &run, |_, _| std::ops::ControlFlow::Break(()))
        .unwrap();
    assert_eq!(stats.received, 0);
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
