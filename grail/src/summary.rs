//! What a run produced, and how it is reported at the end.

use std::path::PathBuf;

/// What a run produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSummary {
    /// Held-out accuracy after the SFT warm-up, before GRPO.
    pub baseline_accuracy: f64,
    /// Held-out accuracy after GRPO.
    pub final_accuracy: f64,
    /// GRPO optimizer steps taken.
    pub steps: usize,
    /// Wall time of this process's part of the run.
    pub seconds: f64,
    /// Wall time of the SFT warm-up.
    pub sft_seconds: f64,
    /// Wall time of GRPO, over every attempt of a resumed run.
    pub grpo_seconds: f64,
    /// The seed.
    pub seed: u64,
    /// The checkpoint this run resumed from, if any.
    pub resumed_from: Option<PathBuf>,
    /// The final checkpoint (`checkpoint-<step>`: HF layout + tokenizer + train state).
    pub checkpoint: PathBuf,
    /// Per-step metrics (JSONL).
    pub metrics: PathBuf,
    /// Reward and accuracy plot (PNG), when a font was available to draw it.
    pub plot: Option<PathBuf>,
    /// Steps during which the pool generated samples while the trainer trained (overlap).
    pub overlapped_steps: usize,
    /// Pool and trainer sample accounting ([`Accounting`](crate::checkpoint::Accounting) with `identity_holds`), over every
    /// attempt of a resumed run.
    pub accounting: serde_json::Value,
    /// With a store: samples in the rollout objects the trainer refused, by worker and reason
    /// (`schema`, `identity`, `claim`, `prompt`, `termination`, `rewards`, `logprob`,
    /// `sketches`, `duplicate`, `quarantined`, ...); they sum to the accounting's `rejected`
    /// less the samples of objects that could not be decoded.
    pub rollouts_refused:
        std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
}

/// Prints the end-of-run table (stderr) and the summary JSON line (stdout, last line).
pub fn report(summary: &RunSummary) {
    eprintln!();
    eprintln!(
        "  held-out accuracy after SFT  {:>6.1}%",
        summary.baseline_accuracy * 100.0
    );
    eprintln!(
        "  held-out accuracy after GRPO {:>6.1}%",
        summary.final_accuracy * 100.0
    );
    eprintln!(
        "  GRPO steps {:>5}   time {:.0}s (SFT {:.0}s, GRPO {:.0}s)",
        summary.steps, summary.seconds, summary.sft_seconds, summary.grpo_seconds
    );
    eprintln!("  checkpoint {}", summary.checkpoint.display());
    eprintln!("  metrics    {}", summary.metrics.display());
    if let Some(p) = &summary.plot {
        eprintln!("  plot       {}", p.display());
    }
    for (worker, reasons) in &summary.rollouts_refused {
        let reasons: Vec<String> = reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
        eprintln!(
            "  refused from worker {worker}: {} samples",
            reasons.join(", ")
        );
    }
    println!(
        "{}",
        serde_json::to_string(summary).expect("summary serialises")
    );
}

/// Prints a rollout worker's end (stderr) and its summary JSON line (stdout, last line).
pub fn report_worker(summary: &crate::rollout_worker::WorkerSummary) {
    let c = &summary.counters;
    eprintln!();
    eprintln!(
        "  worker {}: {} samples generated, {} written, {} failed, {} unsent at shutdown",
        summary.worker_id, c.generated, c.sent, c.failed, c.unsent_at_shutdown
    );
    eprintln!(
        "  last weights version {}   time {:.0}s   store {}",
        summary.version, summary.seconds, summary.store
    );
    println!(
        "{}",
        serde_json::to_string(summary).expect("summary serialises")
    );
}
