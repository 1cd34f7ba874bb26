//! A task from plain data and plain functions, as TRL takes a dataset and `reward_funcs`: rows of
//! (prompt, answer) and named, weighted reward closures, without implementing a trait.
//!
//! ```
//! use grail::Task;
//!
//! let task = Task::from_rows((0..100).map(|i| (format!("{i} + {i} ="), (2 * i).to_string())))
//!     .reward("correct", 1.0, |prompt, completion| {
//!         (completion.text.trim() == prompt.answer) as u8 as f32
//!     });
//! assert_eq!(task.len(), 100);
//! ```

use std::sync::Arc;

use grail_core::tokenizer::Tokenizer;
use grail_rollout::{Completion, Dataset, Environment, Prompt, Reward, Row, Split};

/// Rows of (prompt, answer) and the rewards that judge completions of them. The run tokenizes
/// the prompts with its tokenizer and splits the rows into train and held-out by a hash of the
/// prompt; the answer is also the SFT warm-up's target.
#[derive(Clone, Default)]
pub struct Task {
    rows: Vec<Row>,
    rewards: Vec<Reward>,
}

impl Task {
    /// A task over `rows` of (prompt, answer), with no rewards yet.
    pub fn from_rows<P: Into<String>, A: Into<String>>(
        rows: impl IntoIterator<Item = (P, A)>,
    ) -> Self {
        let rows = rows
            .into_iter()
            .map(|(prompt, answer)| {
                let answer = answer.into();
                Row {
                    prompt: prompt.into(),
                    completion: Some(answer.clone()),
                    answer,
                }
            })
            .collect();
        Self {
            rows,
            rewards: Vec::new(),
        }
    }

    /// Adds a reward function `name` (metrics: `reward/<name>`) with `weight` in the total reward.
    /// It sees the prompt (with `answer`) and the completion (ids, text, whether it finished);
    /// a panic or a NaN fails the group, which is counted and logged.
    pub fn reward(
        mut self,
        name: impl Into<String>,
        weight: f32,
        func: impl Fn(&Prompt, &Completion) -> f32 + Send + Sync + 'static,
    ) -> Self {
        self.rewards.push(Reward::new(name, weight, func));
        self
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Every prompt and answer, to train a tokenizer on.
    pub fn texts(&self) -> impl Iterator<Item = String> + '_ {
        self.rows
            .iter()
            .map(|r| format!("{} {}", r.prompt, r.answer))
    }

    /// The environment of `split`, tokenizing with `tokenizer`.
    pub fn environment(
        &self,
        split: Split,
        tokenizer: Arc<Tokenizer>,
    ) -> anyhow::Result<Arc<dyn Environment>> {
        if self.rewards.is_empty() {
            anyhow::bail!("the task has no reward functions (add one with Task::reward)");
        }
        Ok(Arc::new(Dataset::from_rows(
            self.rows.iter().cloned(),
            split,
            tokenizer,
            self.rewards.clone(),
        )?))
    }
}
