//! The environment's side of checking a group an untrusted worker sent: the prompt is the
//! environment's prompt for the claimed index, every completion ends where the run's generation
//! stops, and the rewards are recomputed by the trainer's own reward functions — the worker's
//! are compared (an inflated reward is a rejection) and then replaced, so a reward that trains
//! is never the worker's.
//!
//! The model's side (sketches, log-probs, sampled tokens) is [`crate::verify`].

use grail_protocol::Group;

use crate::environment::{Completion, Environment, Prompt, score};
use crate::generate::{FinishReason, GenerationConfig, finish_reason};
use crate::verify::Rejection;

/// Relative difference between a worker's reward and the recomputed one that still counts as
/// equal (the same function on the same completion: only a reward that sums in another order
/// differs at all).
pub const REWARD_TOLERANCE: f32 = 1e-5;

/// Checks `group` against `prompt` (the environment's, within the run's prompt limits) and the
/// run's `generation` settings, and replaces its rewards with `env`'s; the first failure found,
/// naming the sample, otherwise.
pub fn check_group(
    env: &dyn Environment,
    prompt: &Prompt,
    generation: &GenerationConfig,
    group: &mut Group,
) -> Result<(), (usize, Rejection)> {
    if group.prompt_ids.as_slice() != prompt.ids.as_slice() {
        let why = match group
            .prompt_ids
            .iter()
            .zip(prompt.ids.iter())
            .position(|(a, b)| a != b)
        {
            Some(at) => format!("token {at} differs"),
            None => format!(
                "{} tokens, the environment's has {}",
                group.prompt_ids.len(),
                prompt.ids.len()
            ),
        };
        let rejection = Rejection::Prompt {
            prompt_id: group.prompt_id,
            why,
        };
        return Err((0, rejection));
    }
    let decode = |ids: &[u32]| env.decode(ids);
    let decode: &(dyn Fn(&[u32]) -> String + Sync) = &decode;
    for (i, sample) in group.samples.iter_mut().enumerate() {
        let ids = &sample.completion_ids;
        let early =
            (1..ids.len()).find(|&n| finish_reason(&ids[..n], generation, Some(decode)).is_some());
        let finish = finish_reason(ids, generation, Some(decode));
        let Some(finish) = finish.filter(|_| early.is_none()) else {
            let rejection = Rejection::Termination {
                tokens: ids.len(),
                stops_after: early,
            };
            return Err((i, rejection));
        };
        let completion = Completion {
            ids: ids.clone(),
            text: env.decode(ids),
            finished: finish != FinishReason::Length,
        };
        let recomputed = score(env, prompt, &completion);
        let equal = |r: &[f32]| {
            r.len() == sample.rewards.len()
                && r.iter()
                    .zip(&sample.rewards)
                    .all(|(a, b)| (a - b).abs() <= REWARD_TOLERANCE * a.abs().max(1.0))
        };
        match recomputed {
            Ok(r) if equal(&r) => sample.rewards = r,
            recomputed => {
                let rejection = Rejection::Rewards {
                    claimed: sample.rewards.clone(),
                    recomputed,
                };
                return Err((i, rejection));
            }
        }
    }
    Ok(())
}
