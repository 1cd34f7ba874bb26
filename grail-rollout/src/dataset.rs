//! An environment over rows of prompt and reference answer, judged by given reward functions.

use std::sync::Arc;

use serde_json::json;

use grail_core::error::{GrailError, Result};
use grail_core::tokenizer::Tokenizer;

use crate::environment::{Environment, Prompt, Reward};
use crate::split::{EVAL_BUCKETS, Split};

/// One example of a [`Dataset`]: the prompt text, the reference answer its rewards judge
/// against, and the completion the SFT warm-up teaches (if any).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The prompt, as the model sees it.
    pub prompt: String,
    /// The reference answer (`Prompt::answer` for the rewards).
    pub answer: String,
    /// The SFT target; `None` leaves the example out of a warm-up.
    pub completion: Option<String>,
}

/// Prompt/answer rows with reward functions ([`Dataset::from_rows`]). Each row falls in the train or the held-out split by a
/// hash of its prompt; train cycles over its rows forever, held-out serves each row once.
pub struct Dataset {
    rows: Vec<Row>,
    split: Split,
    tokenizer: Arc<Tokenizer>,
    rewards: Vec<Reward>,
}

impl Dataset {
    /// The rows of `split` among `rows`, judged by `rewards`. No row in the split is an error.
    pub fn from_rows(
        rows: impl IntoIterator<Item = Row>,
        split: Split,
        tokenizer: Arc<Tokenizer>,
        rewards: Vec<Reward>,
    ) -> Result<Self> {
        let rows: Vec<Row> = rows
            .into_iter()
            .filter(|r| split.contains(&r.prompt))
            .collect();
        if rows.is_empty() {
            return Err(GrailError::Input(format!(
                "the dataset has no {split:?} rows (rows are split by a hash of the prompt, about \
                 1 in {EVAL_BUCKETS} held out)"
            )));
        }
        Ok(Self {
            rows,
            split,
            tokenizer,
            rewards,
        })
    }

    /// Rows in this split.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the split is empty (never: the constructors refuse that).
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The row prompt `index` comes from (train wraps around; held-out ends).
    fn row(&self, index: u64) -> Option<&Row> {
        match self.split {
            Split::Train => self.rows.get(index as usize % self.rows.len()),
            Split::Eval => self.rows.get(index as usize),
        }
    }
}

impl Environment for Dataset {
    fn prompt(&self, index: u64) -> Result<Option<Prompt>> {
        let Some(row) = self.row(index) else {
            return Ok(None);
        };
        let ids = self.tokenizer.encode(&row.prompt, false)?;
        Ok(Some(Prompt {
            id: index,
            ids: Arc::new(ids),
            answer: row.answer.clone(),
            metadata: json!(null),
            text: row.prompt.clone(),
        }))
    }
    fn rewards(&self) -> &[Reward] {
        &self.rewards
    }
    fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }
    fn reference_completion(&self, prompt: &Prompt) -> Option<String> {
        self.row(prompt.id)?.completion.clone()
    }
}
