//! The RL job end to end in miniature, and the job config's errors.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use grail::GrpoConfig;
use grail::runner::{load_checkpoint, run};

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
    // Peers' names for the pool-side limit are accepted.
    let aliased = GrpoConfig::from_toml("[grpo]\nmax_head_offpolicyness = 1\n").unwrap();
    assert_eq!(aliased.grpo.max_ahead, Some(1));
    assert!(GrpoConfig::from_toml("").is_ok(), "every key has a default");
    let missing = GrpoConfig::from_file(std::path::Path::new("/nonexistent/job.toml")).unwrap_err();
    assert!(format!("{missing:#}").contains("/nonexistent/job.toml"));
}

#[test]
fn a_miniature_run_overlaps_saves_and_accounts_for_every_sample() {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"
output_dir = "{}"
[model]
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 2
num_key_value_heads = 1
intermediate_size = 64
[tokenizer]
vocab_size = 300
[sft]
steps = 10
batch_size = 16
[grpo]
max_steps = 6
prompts_per_step = 4
num_generations = 4
max_completion_length = 8
filter_zero_std_groups = false
in_flight_weight_updates = true
[eval]
prompts = 16
every = 3
"#,
        dir.path().display()
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
            "is_ratio_min",
            "is_ratio_mean",
            "is_ratio_max",
            "is_masked_fraction",
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
