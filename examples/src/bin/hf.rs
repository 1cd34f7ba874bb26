//! GRPO on any Hugging Face model directory with the environment of a job config.
//!
//! `cargo run --release -p grail-examples --bin hf -- --config examples/configs/hf.toml`

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Parser;
use grail_examples::job::JobConfig;
use grail_examples::run::{report, run_job};

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
    grail_examples::init_logging();
    let args = Args::parse();
    let mut cfg = JobConfig::from_file(&args.config)?;
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
    let summary = run_job(&cfg, grail_examples::ctrl_c_flag())?;
    report(&summary);
    Ok(())
}
