//! Built-in environments, procedurally generated from a seed with exact verifiers:
//! **countdown** (reach a target with the given numbers and `+ − × ÷`), **arithmetic** (multi-digit
//! word problems answered GSM8K-style, `#### n`), and a **JSONL dataset** (`{"prompt", "answer"}`
//! lines, e.g. GSM8K) with the same extractors.
//!
//! Every environment has a train and a held-out split that never share an instance: an instance is
//! held out exactly when a hash of its content falls in the held-out bucket.

use std::path::Path;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::json;

use super::expr::evaluate;
use super::extract::{answers_match, extract_answer};
use super::{Completion, Environment, Prompt, Reward};
use crate::error::{GrailError, Result};
use crate::tokenizer::Tokenizer;

/// Which side of the train / held-out split an environment serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Training prompts.
    Train,
    /// Held-out prompts (accuracy is measured on these).
    Eval,
}

/// One instance in ten is held out.
const EVAL_BUCKETS: u64 = 10;

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn in_split(key: &str, split: Split) -> bool {
    fnv(key.as_bytes()).is_multiple_of(EVAL_BUCKETS) == (split == Split::Eval)
}

fn rng_for(seed: u64, index: u64, attempt: u64) -> StdRng {
    StdRng::seed_from_u64(
        seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ attempt.wrapping_mul(0xD6E8_FEB8_6659_FD93),
    )
}

/// Text of a completion without its end-of-sequence marker.
fn completion_text(c: &Completion) -> &str {
    c.text.trim()
}

// ---------------------------------------------------------------- countdown

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
        if in_split(&task.prompt(), split) {
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

// ---------------------------------------------------------------- answer-style tasks

fn answer_rewards() -> Vec<Reward> {
    vec![
        Reward::new("format", 0.1, |_p: &Prompt, c: &Completion| {
            (c.finished && extract_answer(completion_text(c)).is_some()) as u8 as f32
        }),
        Reward::new("correct", 1.0, |p: &Prompt, c: &Completion| {
            extract_answer(completion_text(c)).is_some_and(|a| answers_match(&a, &p.answer)) as u8
                as f32
        }),
    ]
}

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
        if in_split(&q, split) {
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

/// Prompt/answer rows with reward functions: a JSONL file ([`Dataset::open_jsonl`]) or rows
/// from anywhere ([`Dataset::from_rows`]). Each row falls in the train or the held-out split by a
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
            .filter(|r| in_split(&r.prompt, split))
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

    /// Reads `path` (UTF-8, with or without a byte-order mark): one object per line with a string
    /// `prompt` (or `question`, as GSM8K names it) and an `answer` (a number, or text whose
    /// `#### n` / `\boxed{n}` / plain value is the answer); a line that is not is an error naming
    /// the file and line. Rewards: `format` (0.1, a `#### n` or `\boxed{n}` answer in a finished
    /// completion) and `correct` (1.0); the SFT target is `#### <answer>`.
    pub fn open_jsonl(path: &Path, split: Split, tokenizer: Arc<Tokenizer>) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| GrailError::io(path, e))?;
        // Editors on Windows start UTF-8 files with a byte-order mark.
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let mut rows = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let bad = |m: String| GrailError::Json {
                path: path.to_path_buf(),
                message: format!("line {}: {m}", i + 1),
            };
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
            let prompt = v
                .get("prompt")
                .or_else(|| v.get("question"))
                .and_then(|p| p.as_str())
                .ok_or_else(|| bad("no string `prompt` (or `question`)".into()))?;
            let answer = match v.get("answer") {
                Some(serde_json::Value::String(s)) => {
                    extract_answer(s).unwrap_or_else(|| s.trim().to_string())
                }
                Some(serde_json::Value::Number(n)) => n.to_string(),
                _ => return Err(bad("no string or number `answer`".into())),
            };
            rows.push(Row {
                prompt: prompt.to_string(),
                completion: Some(format!("#### {answer}")),
                answer,
            });
        }
        Self::from_rows(rows, split, tokenizer, answer_rewards()).map_err(|e| GrailError::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
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
