//! Countdown: reach a target with the given numbers and `+ − × ÷`, each number used at most once.

use std::sync::Arc;

use grail_core::error::{GrailError, Result};
use grail_core::tokenizer::Tokenizer;
use grail_rollout::{Completion, Environment, Prompt, Reward, Split};
use rand::RngExt;
use serde_json::json;

use super::expr::evaluate;
use super::{completion_text, rng_for};

/// Countdown difficulty.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CountdownConfig {
    /// How many numbers are given (2–6).
    pub numbers: usize,
    /// Numbers are drawn from 1..=max_number.
    pub max_number: u32,
    /// Largest target.
    pub max_target: i64,
}

impl Default for CountdownConfig {
    fn default() -> Self {
        Self {
            numbers: 3,
            max_number: 9,
            max_target: 99,
        }
    }
}

impl CountdownConfig {
    /// Checks ranges, naming the key.
    pub fn validate(&self) -> Result<()> {
        if !(2..=6).contains(&self.numbers) {
            return Err(GrailError::config(
                "env.countdown.numbers",
                self.numbers,
                "must be in 2..=6",
            ));
        }
        if !(2..=1000).contains(&self.max_number) {
            return Err(GrailError::config(
                "env.countdown.max_number",
                self.max_number,
                "must be in 2..=1000",
            ));
        }
        if self.max_target < 1 {
            return Err(GrailError::config(
                "env.countdown.max_target",
                self.max_target,
                "must be ≥ 1",
            ));
        }
        Ok(())
    }
}

/// One countdown instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountdownTask {
    /// The numbers, in prompt order.
    pub numbers: Vec<i64>,
    /// The target.
    pub target: i64,
    /// A solution (the expression the target was built from).
    pub solution: String,
}

impl CountdownTask {
    /// The prompt text.
    pub fn prompt(&self) -> String {
        let nums: Vec<String> = self.numbers.iter().map(|n| n.to_string()).collect();
        format!("nums {} target {} =", nums.join(" "), self.target)
    }

    /// The value of `expression` if it is well formed and uses each given number at most once.
    pub fn value_of(&self, expression: &str) -> Option<f64> {
        let e = evaluate(expression)?;
        let mut pool = self.numbers.clone();
        for n in &e.numbers {
            let i = pool.iter().position(|p| p == n)?;
            pool.swap_remove(i);
        }
        Some(e.value.num as f64 / e.value.den as f64)
    }

    /// Whether `expression` reaches the target using each given number at most once.
    pub fn is_solution(&self, expression: &str) -> bool {
        self.value_of(expression) == Some(self.target as f64)
    }

    /// `1 − |value − target| / target`, floored at 0 (0 for an invalid expression).
    pub fn closeness(&self, expression: &str) -> f64 {
        self.value_of(expression).map_or(0.0, |v| {
            (1.0 - (v - self.target as f64).abs() / self.target.max(1) as f64).max(0.0)
        })
    }
}

/// The task a countdown prompt's metadata describes.
fn task_of(p: &Prompt) -> CountdownTask {
    CountdownTask {
        numbers: serde_json::from_value(p.metadata["numbers"].clone()).unwrap_or_default(),
        target: p.metadata["target"].as_i64().unwrap_or(i64::MIN),
        solution: String::new(),
    }
}

/// The `index`-th countdown instance of `split` for `seed` (deterministic).
pub fn countdown_task(cfg: &CountdownConfig, seed: u64, split: Split, index: u64) -> CountdownTask {
    for attempt in 0.. {
        let mut rng = rng_for(seed, index, attempt);
        let numbers: Vec<i64> = (0..cfg.numbers)
            .map(|_| rng.random_range(1..=cfg.max_number as i64))
            .collect();
        let mut order: Vec<usize> = (0..numbers.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let mut text = numbers[order[0]].to_string();
        let mut value = numbers[order[0]];
        let mut low_precedence = false;
        for &i in &order[1..] {
            let n = numbers[i];
            match rng.random_range(0..3) {
                0 => {
                    text = format!("{text}+{n}");
                    value += n;
                    low_precedence = true;
                }
                1 => {
                    text = format!("{text}-{n}");
                    value -= n;
                    low_precedence = true;
                }
                _ => {
                    if low_precedence {
                        text = format!("({text})");
                    }
                    text = format!("{text}*{n}");
                    value *= n;
                    low_precedence = false;
                }
            }
        }
        if value < 1 || value > cfg.max_target {
            continue;
        }
        let task = CountdownTask {
            numbers,
            target: value,
            solution: text,
        };
        if split.contains(&task.prompt()) {
            return task;
        }
    }
    unreachable!("the attempt loop only ends by returning")
}

/// The countdown environment.
pub struct Countdown {
    cfg: CountdownConfig,
    seed: u64,
    split: Split,
    tokenizer: Arc<Tokenizer>,
    rewards: Vec<Reward>,
}

impl Countdown {
    /// Rewards: `format` (weight 0.1: the completion is a well-formed expression that ended on
    /// its own), `close` (weight 0.3: `1 − |value − target| / target`, floored at 0, for a valid
    /// expression over the given numbers: a dense signal on the way to exact answers) and
    /// `correct` (weight 1: it reaches the target using each number at most once).
    pub fn new(
        cfg: CountdownConfig,
        seed: u64,
        split: Split,
        tokenizer: Arc<Tokenizer>,
    ) -> Result<Self> {
        cfg.validate()?;
        let rewards = vec![
            Reward::new("format", 0.1, |_p: &Prompt, c: &Completion| {
                (c.finished && evaluate(completion_text(c)).is_some()) as u8 as f32
            }),
            Reward::new("close", 0.3, |p: &Prompt, c: &Completion| {
                task_of(p).closeness(completion_text(c)) as f32
            }),
            Reward::new("correct", 1.0, |p: &Prompt, c: &Completion| {
                task_of(p).is_solution(completion_text(c)) as u8 as f32
            }),
        ];
        Ok(Self {
            cfg,
            seed,
            split,
            tokenizer,
            rewards,
        })
    }

    /// The instance behind prompt `index`.
    pub fn task(&self, index: u64) -> CountdownTask {
        countdown_task(&self.cfg, self.seed, self.split, index)
    }
}

impl Environment for Countdown {
    fn reference_completion(&self, prompt: &Prompt) -> Option<String> {
        Some(prompt.answer.clone())
    }
    fn prompt(&self, index: u64) -> Result<Option<Prompt>> {
        let task = self.task(index);
        let text = task.prompt();
        let ids = self.tokenizer.encode(&text, false)?;
        Ok(Some(Prompt {
            id: index,
            ids: Arc::new(ids),
            answer: task.solution.clone(),
            metadata: json!({"numbers": task.numbers, "target": task.target}),
            text,
        }))
    }
    fn rewards(&self) -> &[Reward] {
        &self.rewards
    }
    fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }
}
