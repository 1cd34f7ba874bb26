//! Learning-rate schedules with linear warm-up, as transformers' `get_scheduler` defines them.

/// `lr_scheduler_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedulerType {
    /// Constant after warm-up.
    Constant,
    /// Linear decay to 0 at the last step.
    Linear,
    /// Half-cosine decay to 0 at the last step.
    Cosine,
}

/// The learning rate of optimizer step `step` (0-based): `base × factor`, where the factor rises
/// linearly from 0 over `warmup_steps`, then follows `kind` until `total_steps`.
pub fn learning_rate(
    base: f64,
    kind: LrSchedulerType,
    step: usize,
    warmup_steps: usize,
    total_steps: usize,
) -> f64 {
    if step < warmup_steps {
        return base * step as f64 / warmup_steps.max(1) as f64;
    }
    let progress =
        (step - warmup_steps) as f64 / (total_steps.saturating_sub(warmup_steps)).max(1) as f64;
    let factor = match kind {
        LrSchedulerType::Constant => 1.0,
        LrSchedulerType::Linear => (1.0 - progress).max(0.0),
        LrSchedulerType::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()),
    };
    base * factor
}
