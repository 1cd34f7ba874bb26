//! Your own data and your own reward, as plain closures (TRL's `reward_funcs`): GRPO on
//! "add two numbers" rows with a Hugging Face model directory.
//!
//! `cargo run --release -p grail-examples --bin custom_reward -- ../shared/fixtures/models/qwen2-tiny`

use grail::prelude::*;

fn main() -> anyhow::Result<()> {
    grail::init_logging();
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .unwrap_or("../shared/fixtures/models/qwen2-tiny".into());
    let output = args.next().unwrap_or("runs/custom_reward".into());

    // Any iterator of (prompt, answer) rows.
    let rows: Vec<(String, String)> = (0..400)
        .map(|i| {
            (
                format!("{} + {} =", i % 20, i / 20),
                (i % 20 + i / 20).to_string(),
            )
        })
        .collect();
    // The tiny fixture model ships no tokenizer: train one on the rows (a real model brings its own).
    let texts = rows.iter().flat_map(|(p, a)| [p.as_str(), a.as_str()]);
    let tokenizer = Tokenizer::train_bpe(texts, 300, &["<|endoftext|>"])?;

    let task = Task::from_rows(rows)
        .reward("correct", 1.0, |prompt, completion| {
            (completion.text.trim() == prompt.answer) as u8 as f32
        })
        .reward("short", 0.1, |_, completion| {
            (completion.ids.len() <= 4) as u8 as f32
        });

    let mut config = GrpoConfig {
        output_dir: output.into(),
        overwrite_output_dir: true,
        ..GrpoConfig::default()
    };
    config.sft.steps = 0;
    config.grpo.max_steps = 5;
    config.grpo.max_completion_length = 8;
    config.eval.prompts = 16;

    let summary = Grpo::new(config)
        .model(model)?
        .tokenizer(tokenizer)
        .task(task)
        .run()?;
    grail::report(&summary);
    Ok(())
}
