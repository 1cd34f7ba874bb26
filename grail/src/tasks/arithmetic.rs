//! Arithmetic: multi-digit word problems, answered GSM8K-style (`#### n`).

use std::sync::Arc;

use grail_core::error::{GrailError, Result};
use grail_core::tokenizer::Tokenizer;
use grail_rollout::{Environment, Prompt, Reward, Split};
use rand::RngExt;
use serde_json::json;

use super::{answer_rewards, rng_for};

/// Arithmetic difficulty.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArithmeticConfig {
    /// Digits of each operand (1–6).
    pub digits: u32,
}

impl Default for ArithmeticConfig {
    fn default() -> Self {
        Self { digits: 2 }
    }
}

/// The `index`-th arithmetic problem: `(question, answer)`.
pub fn arithmetic_task(
    cfg: &ArithmeticConfig,
    seed: u64,
    split: Split,
    index: u64,
) -> (String, i64) {
    let hi = 10i64.pow(cfg.digits);
    let lo = if cfg.digits > 1 { hi / 10 } else { 0 };
    for attempt in 0.. {
        let mut rng = rng_for(seed ^ 0xA5A5, index, attempt);
        let (a, b) = (rng.random_range(lo..hi), rng.random_range(lo..hi));
        let (q, ans) = match rng.random_range(0..3) {
            0 => (format!("What is {a} plus {b}?"), a + b),
            1 => (format!("What is {a} minus {b}?"), a - b),
            _ => (format!("What is {a} times {b}?"), a * b),
        };
        if split.contains(&q) {
            return (q, ans);
        }
    }
    unreachable!("the attempt loop only ends by returning")
}

/// Multi-digit word problems, answered as `#### n` (or `\boxed{n}`).
pub struct Arithmetic {
    cfg: ArithmeticConfig,
    seed: u64,
    split: Split,
    tokenizer: Arc<Tokenizer>,
    rewards: Vec<Reward>,
}

impl Arithmetic {
    /// Rewards: `format` (0.1) and `correct` (1), as for countdown.
    pub fn new(
        cfg: ArithmeticConfig,
        seed: u64,
        split: Split,
        tokenizer: Arc<Tokenizer>,
    ) -> Result<Self> {
        if !(1..=6).contains(&cfg.digits) {
            return Err(GrailError::config(
                "env.arithmetic.digits",
                cfg.digits,
                "must be in 1..=6",
            ));
        }
        Ok(Self {
            cfg,
            seed,
            split,
            tokenizer,
            rewards: answer_rewards(),
        })
    }
}

impl Environment for Arithmetic {
    fn reference_completion(&self, prompt: &Prompt) -> Option<String> {
        Some(format!("#### {}", prompt.answer))
    }
    fn prompt(&self, index: u64) -> Result<Option<Prompt>> {
        let (q, ans) = arithmetic_task(&self.cfg, self.seed, self.split, index);
        let ids = self.tokenizer.encode(&q, false)?;
        Ok(Some(Prompt {
            id: index,
            ids: Arc::new(ids),
            answer: ans.to_string(),
            metadata: json!(null),
            text: q,
        }))
    }
    fn rewards(&self) -> &[Reward] {
        &self.rewards
    }
    fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }
}
