//! The default job: a tiny Qwen2 from scratch learns countdown (reach a target with the given
//! numbers): BPE trained at start, SFT warm-up, then async GRPO.
//!
//! `cargo run --release -p grail-examples --bin countdown [-- --config job.toml]`

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use grail::Grpo;
use grail::GrpoConfig;
use grail::config::ResumeFrom;
use grail_examples::RunFlags;

#[derive(Parser, Debug)]
#[command(about = "GRPO on countdown with a tiny model trained from scratch")]
struct Args {
    /// A job TOML (defaults: the built-in countdown job, see grail::config).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override the seed.
    #[arg(long)]
    seed: Option<u64>,
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
    let mut cfg = match &args.config {
        Some(p) => GrpoConfig::from_file(p)?,
        None => GrpoConfig::default(),
    };
    if let Some(s) = args.seed {
        cfg.seed = s;
    }
    if args.resume {
        cfg.resume_from_checkpoint = ResumeFrom::Latest(true);
    }
    cfg.overwrite_output_dir |= args.overwrite_output_dir;
    args.run.apply(&mut cfg)?;
    Grpo::new(cfg).run_and_report()
}
