//! Group-relative advantages, as TRL's `GRPOTrainer` computes them.
//!
//! The reward of a sample is the weighted sum of its reward functions. Its advantage is
//! `r − mean(group)`, divided by the group's standard deviation (`scale_rewards = group`), by the
//! whole batch's (`batch`) or by nothing (`none`); standard deviations are unbiased (n − 1) and get
//! `1e-4` added, as in TRL. Groups whose rewards are all equal carry no signal; they can be
//! filtered out (and are counted).

use grail_protocol::Group;

use crate::error::{Result, TrainerError};

/// How rewards are scaled after centring (`scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// Divide by each group's standard deviation (GRPO).
    Group,
    /// Divide by the batch's standard deviation.
    Batch,
    /// No scaling (Dr. GRPO).
    None,
}

/// The advantages of a batch of groups.
#[derive(Debug, Clone, PartialEq)]
pub struct Advantages {
    /// One advantage per sample, per kept group, in order (`[group][sample]`).
    pub values: Vec<Vec<f32>>,
    /// Indices (into the input) of the groups kept.
    pub kept: Vec<usize>,
    /// Groups whose rewards had zero spread (filtered out when asked).
    pub zero_std_groups: usize,
    /// Mean total reward over all samples (before filtering).
    pub reward_mean: f64,
    /// Standard deviation of the total reward over all samples.
    pub reward_std: f64,
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// The weighted total reward of every sample; errors on empty groups, a wrong number of rewards,
/// or a NaN/infinite reward (naming the group and sample).
pub fn total_rewards(groups: &[Group], weights: &[f32]) -> Result<Vec<Vec<f64>>> {
    groups
        .iter()
        .enumerate()
        .map(|(g, group)| {
            if group.samples.is_empty() {
                return Err(TrainerError::Input(format!(
                    "group {g} (prompt {}) is empty",
                    group.prompt_id
                )));
            }
            group
                .samples
                .iter()
                .enumerate()
                .map(|(s, sample)| {
                    if sample.rewards.len() != weights.len() {
                        return Err(TrainerError::Input(format!(
                            "group {g} sample {s}: {} rewards for {} reward weights",
                            sample.rewards.len(),
                            weights.len()
                        )));
                    }
                    if let Some(bad) = sample.rewards.iter().find(|r| !r.is_finite()) {
                        return Err(TrainerError::Input(format!(
                            "group {g} sample {s}: reward {bad} is not finite"
                        )));
                    }
                    Ok(sample
                        .rewards
                        .iter()
                        .zip(weights)
                        .map(|(r, w)| (*r as f64) * (*w as f64))
                        .sum())
                })
                .collect()
        })
        .collect()
}

/// Group-relative advantages of `groups` with reward-function `weights`.
pub fn compute_advantages(
    groups: &[Group],
    weights: &[f32],
    scale: ScaleRewards,
    filter_zero_std: bool,
) -> Result<Advantages> {
    let rewards = total_rewards(groups, weights)?;
    let all: Vec<f64> = rewards.iter().flatten().copied().collect();
    let (reward_mean, reward_std) = mean_std(&all);
    let mut out = Advantages {
        values: Vec::new(),
        kept: Vec::new(),
        zero_std_groups: 0,
        reward_mean,
        reward_std,
    };
    for (g, r) in rewards.iter().enumerate() {
        let (mean, std) = mean_std(r);
        let zero_std = std.abs() < 1e-8;
        if zero_std {
            out.zero_std_groups += 1;
            if filter_zero_std {
                continue;
            }
        }
        let denom = match scale {
            ScaleRewards::Group => std + 1e-4,
            ScaleRewards::Batch => reward_std + 1e-4,
            ScaleRewards::None => 1.0,
        };
        out.values
            .push(r.iter().map(|x| ((x - mean) / denom) as f32).collect());
        out.kept.push(g);
    }
    Ok(out)
}
