//! A run's output directory: which run it belongs to, and its append-only `metrics.jsonl`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use grail_core::atomic;

use crate::checkpoint::{checkpoints, load_run_state};
use crate::config::{GrpoConfig, ResumeFrom};

/// The metrics file's name in `output_dir`.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Makes `cfg.output_dir` this run's: returns the checkpoint to resume from, if the config asks
/// for one. A new run refuses a directory that holds another run's metrics or checkpoints unless
/// `overwrite_output_dir` is set (then they are removed). Temporaries left by an interrupted
/// checkpoint write are removed either way.
pub fn claim(cfg: &GrpoConfig) -> Result<Option<PathBuf>> {
    let dir = &cfg.output_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    remove_temporaries(dir)?;
    let metrics = dir.join(METRICS_FILE);
    let existing = checkpoints(dir)?;
    match &cfg.resume_from_checkpoint {
        ResumeFrom::Path(p) => {
            load_run_state(p).context("config key `resume_from_checkpoint`")?;
            return Ok(Some(p.clone()));
        }
        ResumeFrom::Latest(true) => {
            let Some((_, newest)) = existing.last() else {
                bail!(
                    "config key `resume_from_checkpoint` = true: no checkpoint in {} (a run writes checkpoint-<step> directories every save_steps steps)",
                    dir.display()
                );
            };
            return Ok(Some(newest.clone()));
        }
        ResumeFrom::Latest(false) => {}
    }
    if metrics.exists() || !existing.is_empty() {
        if !cfg.overwrite_output_dir {
            bail!(
                "output_dir {} holds another run ({}{} checkpoints): set overwrite_output_dir = true to replace it, \
                 or resume_from_checkpoint = true to continue it",
                dir.display(),
                if metrics.exists() {
                    "metrics.jsonl, "
                } else {
                    ""
                },
                existing.len()
            );
        }
        if metrics.exists() {
            std::fs::remove_file(&metrics)
                .with_context(|| format!("removing {}", metrics.display()))?;
        }
        for (_, old) in existing {
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
    }
    Ok(None)
}

/// Removes `.checkpoint-*.tmp-*` directories and other `.*.tmp-*` files an interrupted write
/// left behind.
fn remove_temporaries(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') && name.contains(".tmp-") {
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// `metrics.jsonl`: one JSON object per GRPO step, appended and flushed as each step ends.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens the log of a run in `dir`. A resumed run (`resumed_at` = its checkpoint's step)
    /// keeps the lines of steps up to that one and drops later ones, which the interrupted
    /// attempt wrote after its last checkpoint and the resumed run will write again; the kept
    /// lines are returned. The log is appended to, never truncated.
    pub fn open(dir: &Path, resumed_at: Option<usize>) -> Result<(Self, Vec<serde_json::Value>)> {
        let path = dir.join(METRICS_FILE);
        let mut kept = Vec::new();
        if let Some(step) = resumed_at
            && path.exists()
        {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            // A line cut short by a kill does not parse and goes too.
            kept = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v["step"].as_u64().is_some_and(|s| s as usize <= step))
                .collect();
            let mut out = String::new();
            for v in &kept {
                out.push_str(&v.to_string());
                out.push('\n');
            }
            if out != text {
                atomic::write_file(&path, out.as_bytes())?;
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok((Self { path, file }, kept))
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line (a single write, so a kill leaves whole lines or a torn last one).
    pub fn append(&mut self, line: &serde_json::Value) -> Result<()> {
        let mut text = line.to_string();
        text.push('\n');
        self.file
            .write_all(text.as_bytes())
            .and_then(|()| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}
