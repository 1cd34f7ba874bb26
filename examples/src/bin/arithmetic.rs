//! GRPO on multi-digit arithmetic word problems (`#### n` answers) with a tiny model from scratch.
//!
//! `cargo run --release -p grail-examples --bin arithmetic [-- --config job.toml]`

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use grail_core::env::ArithmeticConfig;
use grail_examples::job::{EnvSection, JobConfig};
use grail_examples::run::{report, run_job};

#[derive(Parser, Debug)]
#[command(about = "GRPO on arithmetic word problems with a tiny model trained from scratch")]
struct Args {
    /// A job TOML (its [env] is used if it is an arithmetic one).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Digits per operand.
    #[arg(long)]
    digits: Option<u32>,
}

fn main() -> Result<()> {
    grail_examples::init_logging();
    let args = Args::parse();
    let mut cfg = match &args.config {
        Some(p) => JobConfig::from_file(p)?,
        None => JobConfig {
            output_dir: "runs/arithmetic".into(),
            ..JobConfig::default()
        },
    };
    if !matches!(cfg.env, EnvSection::Arithmetic(_)) {
        cfg.env = EnvSection::Arithmetic(ArithmeticConfig::default());
    }
    if let (Some(d), EnvSection::Arithmetic(a)) = (args.digits, &mut cfg.env) {
        a.digits = d;
    }
    cfg.validate()?;
    let summary = run_job(&cfg, grail_examples::ctrl_c_flag())?;
    report(&summary);
    Ok(())
}
