//! GRPO on any Hugging Face model directory with the environment of a job config.
//!
//! `cargo run --release -p grail-examples --bin hf -- --config examples/configs/hf.toml`

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Parser;
use grail::GrpoConfig;
use grail::{report, run};

#[derive(Parser, Debug)]
#[command(about = "GRPO on a Hugging Face checkpoint")]
struct Args {
    /// The job TOML; `[model] path` must name the HF directory (or pass --model).
    #[arg(long)]
    config: PathBuf,
    /// Override `[model] path`.
    #[arg(long)]
    model: Option<PathBuf>,
}

fn main() -> Result<()> {
    grail::init_logging();
    let args = Args::parse();
    let mut cfg = GrpoConfig::from_file(&args.config)?;
    if let Some(m) = args.model {
        cfg.model.path = Some(m);
    }
    if cfg.model.path.is_none() {
        bail!(
            "the hf job needs `[model] path` in {} or --model",
            args.config.display()
        );
    }
    cfg.validate()?;
    let summary = run(&cfg, grail::stop_on_signals())?;
    report(&summary);
    Ok(())
}
