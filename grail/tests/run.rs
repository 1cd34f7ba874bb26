//! The RL job end to end in miniature, and the job config's errors.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use grail::GrpoConfig;
use grail::runner::{load_checkpoint, run};
use grail_testkit::tiny_job_toml;

fn err(toml: &str) -> String {
    format!(
        "{:#}",
        GrpoConfig::from_toml(toml).expect_err("config should be rejected")
    )
}

#[test]
fn config_errors_name_the_key_or_path() {
    let m = err("[grpo]\nlearnig_rate = 1e-3\n");
    assert!(m.contains("learnig_rate"), "unknown key: {m}");
    let m = err("seed = \"zero\"\n");
    assert!(m.contains("seed"), "wrong type: {m}");
    let m = err("[grpo]\nnum_generations = 1\n");
    assert!(m.contains("grpo.num_generations"), "out of range: {m}");
    let m = err("[grpo]\nlearning_rate = -1.0\n");
    assert!(m.contains("learning_rate"), "out of range: {m}");
    let m = err("[model]\npath = \"/nonexistent/model\"\n");
    assert!(
        m.contains("model.path") && m.contains("/nonexistent/model"),
        "missing path: {m}"
    );
    let m = err("[env]\nkind = \"chess\"\n");
    assert!(m.contains("chess"), "unknown env: {m}");
    let m = err("[env]\nkind = \"countdown\"\nnumbers = 9\n");
    assert!(
        m.contains("env.countdown.numbers") || m.contains("numbers"),
        "{m}"
    );
    let m = err("[grpo]\ntemperature = 0.0\n");
    assert!(
        m.contains("grpo.temperature") && m.contains("every completion of a prompt is the same"),
        "temperature 0 would make every group zero-spread: {m}"
    );
    let m = err("[grpo]\ntop_p = 1.5\n");
    assert!(m.contains("top_p"), "{m}");
    let m = err("[grpo]\nimportance_sampling_cap = 0.5\n");
    assert!(m.contains("importance_sampling_cap"), "{m}");
    let m = err("[grpo]\nimportance_sampling_mode = \"sequence_clip\"\n");
    assert!(m.contains("sequence_clip"), "{m}");
    // The roles of a run over processes: a store for those that need one, only there.
    let m = err("role = \"trainer\"\n");
    assert!(m.contains("`role` = \"trainer\" needs `store`"), "{m}");
    let m = err("store = \"file:///tmp/s\"\n");
    assert!(m.contains("`store`") && m.contains("role = \"all\""), "{m}");
    let m = err("role = \"rollout\"\nstore = \"memory://\"\n");
    assert!(
        m.contains("file:///absolute/path") && m.contains("s3://"),
        "{m}"
    );
    let m = err("role = \"rollout\"\nstore = \"file:///tmp/s\"\nworker_id = \"a/b\"\n");
    assert!(m.contains("worker_id") && m.contains("a/b"), "{m}");
    let m = err("role = \"coordinator\"\n");
    assert!(m.contains("coordinator"), "{m}");
    let m = err("[grpo]\nweight_anchor_interval = 0\n");
    assert!(m.contains("grpo.weight_anchor_interval"), "{m}");
    // Peers' names for the pool-side limit are accepted.
    let aliased = GrpoConfig::from_toml("[grpo]\nmax_head_offpolicyness = 1\n").unwrap();
    assert_eq!(aliased.grpo.max_ahead, Some(1));
    let m = err("[grpo]\nprompt_truncation = \"right\"\n");
    assert!(
        m.contains("right") && m.contains("prompt_truncation"),
        "{m}"
    );
    let decayed = GrpoConfig::from_toml("[grpo]\nweight_decay = 0.01\n").unwrap();
    assert_eq!(decayed.trainer_config().weight_decay, 0.01);
    assert!(GrpoConfig::from_toml("").is_ok(), "every key has a default");
    let missing = GrpoConfig::from_file(std::path::Path::new("/nonexistent/job.toml")).unwrap_err();
    assert!(format!("{missing:#}").contains("/nonexistent/job.toml"));
}

#[test]
fn a_miniature_run_overlaps_saves_and_accounts_for_every_sample() {
    let dir = tempfile::tempdir().unwrap();
    let toml = tiny_job_toml(
        dir.path(),
        "",
        "max_steps = 6\nfilter_zero_std_groups = false\nin_flight_weight_updates = true",
        "prompts = 16\nevery = 3",
    );
    let cfg = GrpoConfig::from_toml(&toml).unwrap();
    let summary = run(&cfg, Arc::new(AtomicBool::new(false))).unwrap();
    assert_eq!(summary.steps, 6);
    assert!(
        (0.0..=1.0).contains(&summary.baseline_accuracy)
            && (0.0..=1.0).contains(&summary.final_accuracy)
    );
    // The pool generated while the trainer trained.
    assert!(summary.overlapped_steps > 0, "no overlap: {summary:?}");
    assert_eq!(
        summary.accounting["identity_holds"],
        serde_json::json!(true),
        "{}",
        summary.accounting
    );
    // The checkpoint loads back; the metrics parse, one line per step.
    assert!(summary.checkpoint.ends_with("checkpoint-6"));
    let model = load_checkpoint(&summary.checkpoint).unwrap();
    assert_eq!(model.config.hidden_size, 32);
    assert!(summary.checkpoint.join("tokenizer.json").is_file());
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&summary.metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    for key in [
        "reward_mean",
        "reward/correct",
        "entropy",
        "grad_norm",
        "lr",
        "tokens_per_s",
        "mfu",
        "packing_efficiency",
        "staleness_histogram",
        "token_staleness_histogram",
        "policy_version",
    ] {
        assert!(lines[0].get(key).is_some(), "metrics lack {key}");
    }
    // The default sequence_mask correction reports its ratios every step.
    for line in &lines {
        for key in [
            "importance_sampling_ratio_min",
            "importance_sampling_ratio_mean",
            "importance_sampling_ratio_max",
            "importance_sampling_masked_fraction",
            "behaviour_logp_diff_mean",
            "behaviour_logp_diff_max",
        ] {
            assert!(
                line[key].is_number(),
                "step {}: {key} = {}",
                line["step"],
                line[key]
            );
        }
    }
    assert!(lines[2]["eval_accuracy"].is_number(), "eval every 3 steps");
}

/// A small synchronous job (one rollout worker, `max_ahead = 0`: every batch is generated with
/// the weights of the step before it, so the whole pipeline is deterministic).
fn sync_job(dir: &std::path::Path, max_steps: usize, extra: &str) -> GrpoConfig {
    GrpoConfig::from_toml(&tiny_job_toml(
        dir,
        &format!("save_steps = 2\n{extra}"),
        &format!("max_steps = {max_steps}\nmax_ahead = 0\nrollout_workers = 1"),
        "prompts = 8\nevery = 0",
    ))
    .unwrap()
}

fn metric_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The run's weights, as the raw bytes of its final checkpoint.
fn weights(summary: &grail::RunSummary) -> Vec<u8> {
    std::fs::read(summary.checkpoint.join("model.safetensors")).unwrap()
}

#[test]
fn a_run_stopped_at_step_k_and_resumed_equals_the_uninterrupted_run() {
    let no_stop = || Arc::new(AtomicBool::new(false));
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = run(&sync_job(straight_dir.path(), 6, ""), no_stop()).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let first = run(&sync_job(dir.path(), 3, ""), no_stop()).unwrap();
    assert_eq!(first.steps, 3);
    assert!(first.checkpoint.ends_with("checkpoint-3"));
    // A new run into the same directory is refused: it would mix two runs' output.
    let again = run(&sync_job(dir.path(), 6, ""), no_stop()).unwrap_err();
    let msg = format!("{again:#}");
    assert!(
        msg.contains("holds another run") && msg.contains("overwrite_output_dir"),
        "{msg}"
    );
    let resumed = run(
        &sync_job(dir.path(), 6, "resume_from_checkpoint = true"),
        no_stop(),
    )
    .unwrap();
    assert_eq!(
        resumed.resumed_from.as_deref(),
        Some(first.checkpoint.as_path())
    );
    assert_eq!(resumed.steps, 6);
    assert_eq!(resumed.baseline_accuracy, straight.baseline_accuracy);
    assert!(
        weights(&resumed) == weights(&straight),
        "resumed weights differ from the uninterrupted run's"
    );
    let (a, b) = (
        metric_lines(&straight.metrics),
        metric_lines(&resumed.metrics),
    );
    let steps: Vec<u64> = b.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(
        steps,
        [1, 2, 3, 4, 5, 6],
        "every step once, appended on resume"
    );
    for (x, y) in a.iter().zip(&b) {
        for key in ["reward_mean", "loss", "grad_norm", "policy_version"] {
            assert_eq!(x[key], y[key], "step {}: {key}", x["step"]);
        }
    }
    for s in [&straight, &resumed] {
        assert_eq!(s.accounting["identity_holds"], true, "{}", s.accounting);
    }
    assert_eq!(
        resumed.accounting["trained"], straight.accounting["trained"],
        "{} vs {}",
        resumed.accounting, straight.accounting
    );
    // Periodic checkpoints were written every 2 steps; each is a loadable HF model.
    for step in [2, 4, 6] {
        let ckpt = dir.path().join(format!("checkpoint-{step}"));
        assert!(load_checkpoint(&ckpt).is_ok(), "{}", ckpt.display());
        assert!(ckpt.join("tokenizer.json").is_file());
    }
    // overwrite_output_dir starts afresh.
    let fresh = run(
        &sync_job(dir.path(), 2, "overwrite_output_dir = true"),
        no_stop(),
    )
    .unwrap();
    assert_eq!(fresh.steps, 2);
    assert_eq!(metric_lines(&fresh.metrics).len(), 2);
    assert!(!dir.path().join("checkpoint-6").exists());
}

#[test]
fn a_pretrained_model_without_its_tokenizer_is_refused() {
    let model = grail_testkit::model_dirs().remove(0);
    assert!(!model.join("tokenizer.json").exists());
    let out = tempfile::tempdir().unwrap();
    let cfg = GrpoConfig::from_toml(&format!(
        "output_dir = \"{}\"\n[model]\npath = \"{}\"\n",
        out.path().display(),
        model.display()
    ))
    .unwrap();
    let msg = format!(
        "{:#}",
        run(&cfg, Arc::new(AtomicBool::new(false))).unwrap_err()
    );
    assert!(
        msg.contains("model.path") && msg.contains("tokenizer.json"),
        "{msg}"
    );
}
