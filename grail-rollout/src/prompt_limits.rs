//! Prompt length limits: what the pool (and evaluation) do with a prompt that is too long for the
//! run's `max_prompt_length` or, with its completion budget, for the model's context.

use crate::error::RolloutError;
use serde::{Deserialize, Serialize};

use crate::environment::Prompt;

/// What to do with a prompt longer than `max_prompt_length`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptTruncation {
    /// Keep its last `max_prompt_length` tokens, as TRL does (the end of a prompt, where the
    /// question and the chat template's generation prompt sit, matters most).
    #[default]
    Left,
    /// Stop the run with an error naming the prompt.
    Error,
}

/// The limits a prompt must fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptLimits {
    /// Longest prompt in tokens (`None`: no limit of its own).
    pub max_prompt_length: Option<usize>,
    /// What happens to a longer one.
    pub truncation: PromptTruncation,
    /// The completion budget that follows the prompt.
    pub max_completion_length: usize,
    /// The model's context (`max_position_embeddings`): prompt + completion must fit.
    pub max_positions: usize,
}

impl PromptLimits {
    /// `prompt` within the limits (truncated from the left when that is the rule), and whether
    /// it was truncated; an error naming the prompt when it cannot fit.
    pub fn apply(&self, mut prompt: Prompt) -> Result<(Prompt, bool), RolloutError> {
        let len = prompt.ids.len();
        let mut truncated = false;
        if let Some(max) = self.max_prompt_length
            && len > max
        {
            match self.truncation {
                PromptTruncation::Left => {
                    prompt.ids = std::sync::Arc::new(prompt.ids[len - max..].to_vec());
                    truncated = true;
                }
                PromptTruncation::Error => {
                    return Err(RolloutError::prompt(
                        prompt.id,
                        format!(
                            "{len} tokens, more than max_prompt_length = {max} \
                             (prompt_truncation = \"error\")"
                        ),
                    ));
                }
            }
        }
        let need = prompt.ids.len() + self.max_completion_length;
        if need > self.max_positions {
            return Err(RolloutError::prompt(
                prompt.id,
                format!(
                    "{} prompt tokens + max_completion_length {} = {need} positions, more than \
                     the model's max_position_embeddings {}: lower max_prompt_length or \
                     max_completion_length",
                    prompt.ids.len(),
                    self.max_completion_length,
                    self.max_positions
                ),
            ));
        }
        Ok((prompt, truncated))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(len: usize) -> Prompt {
        Prompt {
            id: 7,
            text: String::new(),
            ids: std::sync::Arc::new((0..len as u32).collect()),
            answer: String::new(),
            metadata: serde_json::Value::Null,
        }
    }

    fn limits(truncation: PromptTruncation) -> PromptLimits {
        PromptLimits {
            max_prompt_length: Some(4),
            truncation,
            max_completion_length: 3,
            max_positions: 8,
        }
    }

    #[test]
    fn long_prompts_are_cut_from_the_left_or_rejected_by_name() {
        let (p, cut) = limits(PromptTruncation::Left).apply(prompt(6)).unwrap();
        assert!(cut);
        assert_eq!(*p.ids, vec![2, 3, 4, 5]);
        let (p, cut) = limits(PromptTruncation::Left).apply(prompt(4)).unwrap();
        assert!(!cut);
        assert_eq!(p.ids.len(), 4);
        let e = limits(PromptTruncation::Error)
            .apply(prompt(6))
            .unwrap_err();
        assert!(e.to_string().contains("prompt 7: 6 tokens"), "{e}");
    }

    #[test]
    fn prompt_and_completion_must_fit_the_context() {
        let mut l = limits(PromptTruncation::Left);
        l.max_prompt_length = None;
        assert!(l.apply(prompt(5)).is_ok());
        let e = l.apply(prompt(6)).unwrap_err().to_string();
        assert!(
            e.contains("prompt 7") && e.contains("max_position_embeddings 8"),
            "{e}"
        );
    }
}
