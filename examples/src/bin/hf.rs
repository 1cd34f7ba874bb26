//! GRPO on any Hugging Face model directory with the environment of a job config.
//!
//! `cargo run --release -p grail-examples --bin hf -- --config examples/configs/hf.toml`

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Parser;
use grail::Grpo;
use grail::GrpoConfig;
use grail::config::ResumeFrom;
use grail_examples::RunFlags;

#[derive(Parser, Debug)]
#[command(about = "GRPO on a Hugging Face checkpoint")]
struct Args {
    /// The job TOML; `[model] path` must name the HF directory (or pass --model).
    #[arg(long)]
    config: PathBuf,
    /// Override `[model] path`.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Continue the run in output_dir from its newest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Replace a previous run in output_dir.
    #[arg(long)]
    overwrite_output_dir: bool,
    #[command(flatten)]
    run: RunFlags,
}

fn main() -> Result<()> {
    grail::init_logging();
    let args = Args::parse();
    let mut cfg = GrpoConfig::from_file(&args.config)?;
    if let Some(m) = args.model {
        cfg.model.path = Some(m);
    }
    args.run.apply(&mut cfg)?;
    // A rollout worker takes its model from the store.
    if cfg.model.path.is_none() && cfg.role != grail::config::Role::Rollout {
        bail!(
            "the hf job needs `[model] path` in {} or --model",
            args.config.display()
        );
    }
    cfg.validate()?;
    if args.resume {
        cfg.resume_from_checkpoint = ResumeFrom::Latest(true);
    }
    cfg.overwrite_output_dir |= args.overwrite_output_dir;
    Grpo::new(cfg).run_and_report()
}
