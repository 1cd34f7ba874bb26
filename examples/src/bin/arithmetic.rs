//! GRPO on multi-digit arithmetic word problems (`#### n` answers) with a tiny model from scratch.
//!
//! `cargo run --release -p grail-examples --bin arithmetic [-- --config job.toml]`

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use grail::Grpo;
use grail::config::{EnvSection, GrpoConfig, ResumeFrom};
use grail::tasks::ArithmeticConfig;
use grail_examples::RunFlags;

#[derive(Parser, Debug)]
#[command(about = "GRPO on arithmetic word problems with a tiny model trained from scratch")]
struct Args {
    /// A job TOML (its [env] is used if it is an arithmetic one).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Digits per operand.
    #[arg(long)]
    digits: Option<u32>,
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
        None => GrpoConfig {
            output_dir: "runs/arithmetic".into(),
            ..GrpoConfig::default()
        },
    };
    if !matches!(cfg.env, EnvSection::Arithmetic(_)) {
        cfg.env = EnvSection::Arithmetic(ArithmeticConfig::default());
    }
    if let (Some(d), EnvSection::Arithmetic(a)) = (args.digits, &mut cfg.env) {
        a.digits = d;
    }
    cfg.validate()?;
    if args.resume {
        cfg.resume_from_checkpoint = ResumeFrom::Latest(true);
    }
    cfg.overwrite_output_dir |= args.overwrite_output_dir;
    args.run.apply(&mut cfg)?;
    Grpo::new(cfg).run_and_report()
}
