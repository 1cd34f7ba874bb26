//! The README's crate example is `custom_reward` itself, and it trains on a fixture model.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[test]
fn the_readme_shows_the_custom_reward_example_verbatim() {
    let readme = include_str!("../../README.md");
    let example = include_str!("../src/bin/custom_reward.rs");
    let section = &readme[readme
        .find("## Using grail as a crate")
        .expect("the README has a crate section")..];
    let start = section.find("```rust\n").expect("a rust block") + "```rust\n".len();
    let block = &section[start..start + section[start..].find("```").unwrap()];
    assert_eq!(
        block, example,
        "README.md's first rust block under \"Using grail as a crate\" must equal examples/src/bin/custom_reward.rs"
    );
}

/// A fixture model whose vocabulary size passes `fits`.
fn fixture_with_vocab(fits: impl Fn(u64) -> bool) -> Option<PathBuf> {
    grail_testkit::model_dirs().into_iter().find(|d| {
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
        config["vocab_size"].as_u64().is_some_and(&fits)
    })
}

/// Runs the example on `model`, writing to `out`.
fn run_example(model: &Path, out: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_custom_reward"))
        .arg(model)
        .arg(out)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

#[test]
fn custom_reward_trains_on_a_fixture_model() {
    // A fixture whose vocabulary holds the example's 300-token BPE.
    let model = fixture_with_vocab(|v| v >= 300)
        .expect("a fixture model with a vocabulary of at least 300");
    let out = tempfile::tempdir().unwrap();
    let run = run_example(&model, out.path());
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stdout = String::from_utf8(run.stdout).unwrap();
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["steps"], 5);
    assert_eq!(summary["accounting"]["identity_holds"], true);
    let metrics = std::fs::read_to_string(out.path().join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    for key in ["reward/correct", "reward/short"] {
        assert!(first[key].is_number(), "metrics lack {key}");
    }
}

#[test]
fn a_tokenizer_larger_than_the_models_vocabulary_is_refused_before_training() {
    // The example's 300-token BPE on a fixture whose vocabulary is smaller, if there is one.
    let Some(model) = fixture_with_vocab(|v| v < 300) else {
        eprintln!("no fixture model with a vocabulary under 300; not run");
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let run = run_example(&model, out.path());
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("smaller than the tokenizer's"), "{stderr}");
}
