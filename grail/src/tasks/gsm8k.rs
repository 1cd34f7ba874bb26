//! GSM8K (Cobbe et al., 2021) as TRL, verl and grail post-train on it: each question is the
//! user turn of the model's chat template, and a completion is correct when its final number
//! equals the reference answer. Training draws from `train.jsonl`; held-out accuracy is
//! measured on a fixed, seeded subset of `test.jsonl`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use grail_core::error::{GrailError, Result};
use grail_core::tokenizer::{ChatMessage, Tokenizer};
use grail_rollout::{Completion, Environment, Prompt, Reward, Split};
use serde_json::json;

use super::completion_text;
use super::extract::{
    answers_match, extract_final_number, extract_hash_answer, extract_marked_number, parse_number,
};
use super::jsonl::parse_lines;

/// Where the problems come from and how they are asked.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gsm8kConfig {
    /// Training problems, GSM8K's JSONL layout (`question`, and an `answer` ending in
    /// `#### <n>`). Default "../shared/data/gsm8k/train.jsonl" (relative to the working
    /// directory: the repository root for the README's commands).
    pub train: PathBuf,
    /// Held-out problems, same layout; a question that is also in `train` is left out. Default
    /// "../shared/data/gsm8k/test.jsonl".
    pub test: PathBuf,
    /// The system turn. Default: none, so the chat template's own default applies (SmolLM2's and
    /// Qwen's insert one).
    pub system_prompt: Option<String>,
    /// Appended to each question in the user turn ("" for none). Default verl's: `Let's think
    /// step by step and output the final answer after "####".`
    pub instruction: String,
}

impl Default for Gsm8kConfig {
    fn default() -> Self {
        Self {
            train: PathBuf::from("../shared/data/gsm8k/train.jsonl"),
            test: PathBuf::from("../shared/data/gsm8k/test.jsonl"),
            system_prompt: None,
            instruction: "Let's think step by step and output the final answer after \"####\"."
                .into(),
        }
    }
}

/// One GSM8K problem.
#[derive(Debug, Clone, PartialEq)]
pub struct Gsm8kProblem {
    /// The word problem.
    pub question: String,
    /// The worked solution without its `<<a*b=c>>` calculator annotations, ending in `#### n`.
    pub solution: String,
    /// The final answer, without thousands separators (`1,200` → `1200`).
    pub answer: String,
}

/// Reads GSM8K's JSONL layout: one object a line with a string `question` and a string
/// `answer` whose last `#### ` is followed by a number. Any other line is an error naming the
/// file and line; so is a file without problems.
pub fn read_gsm8k(path: &std::path::Path) -> Result<Vec<Gsm8kProblem>> {
    let problems = parse_lines(path, |v| {
        let text = |key: &str| {
            v.get(key)
                .and_then(|s| s.as_str())
                .ok_or_else(|| format!("no string `{key}`"))
        };
        let (question, worked) = (text("question")?, text("answer")?);
        let answer = extract_hash_answer(worked)
            .filter(|a| parse_number(a).is_some())
            .ok_or("the `answer` does not end in `#### <number>`")?;
        Ok(Gsm8kProblem {
            question: question.to_string(),
            solution: strip_calculator_annotations(worked),
            answer,
        })
    })?;
    if problems.is_empty() {
        return Err(GrailError::Json {
            path: path.to_path_buf(),
            message: "no problems in the file".into(),
        });
    }
    Ok(problems)
}

/// `48/2 = <<48/2=24>>24` → `48/2 = 24`: the annotations drove the dataset authors' calculator,
/// they are not part of the solution a model should write.
fn strip_calculator_annotations(solution: &str) -> String {
    let mut out = String::with_capacity(solution.len());
    let mut rest = solution;
    while let Some(open) = rest.find("<<") {
        let Some(close) = rest[open..].find(">>") else {
            break;
        };
        out.push_str(&rest[..open]);
        rest = &rest[open + close + 2..];
    }
    out.push_str(rest);
    out
}

/// GSM8K's rewards, TRL style: `format` (0.1: a finished completion gives its answer as
/// `#### n` or `\boxed{n}`) and `correct` (1.0: its final number, the boxed one, else the one
/// after `####`, else the last in the text, equals the reference answer numerically).
pub fn gsm8k_rewards() -> Vec<Reward> {
    vec![
        Reward::new("format", 0.1, |_p: &Prompt, c: &Completion| {
            (c.finished && extract_marked_number(completion_text(c)).is_some()) as u8 as f32
        }),
        Reward::new("correct", 1.0, |p: &Prompt, c: &Completion| {
            extract_final_number(completion_text(c)).is_some_and(|n| answers_match(&n, &p.answer))
                as u8 as f32
        }),
    ]
}

/// The GSM8K environment of one split. Train serves `train` in a seeded shuffled order and
/// cycles; held-out serves `test` (less any question also in `train`) once, in a seeded
/// shuffled order, so the first N held-out prompts are a fixed subset for a seed.
///
/// A prompt is the chat template of the tokenizer rendered for the optional system turn and the
/// user turn (question, then instruction) with the generation prompt, as transformers'
/// `apply_chat_template(..., add_generation_prompt=True)` renders it. A tokenizer without a
/// chat template (a base model's) gets a plain prompt instead: the system prompt and a blank
/// line if any, then `Question: <user turn>\nAnswer:`.
pub struct Gsm8k {
    problems: Vec<Gsm8kProblem>,
    split: Split,
    cfg: Gsm8kConfig,
    tokenizer: Arc<Tokenizer>,
    rewards: Vec<Reward>,
}

impl Gsm8k {
    /// Reads the file of `split` ([`read_gsm8k`]; held-out also reads `train` to leave out
    /// shared questions) and orders it by `seed`. The first prompt is rendered here, so a chat
    /// template that fails is an error now rather than mid-run.
    pub fn open(
        cfg: &Gsm8kConfig,
        seed: u64,
        split: Split,
        tokenizer: Arc<Tokenizer>,
    ) -> Result<Self> {
        let mut problems = match split {
            Split::Train => read_gsm8k(&cfg.train)?,
            Split::Eval => {
                let train: HashSet<String> = read_gsm8k(&cfg.train)?
                    .into_iter()
                    .map(|p| p.question)
                    .collect();
                let test: Vec<Gsm8kProblem> = read_gsm8k(&cfg.test)?
                    .into_iter()
                    .filter(|p| !train.contains(&p.question))
                    .collect();
                if test.is_empty() {
                    return Err(GrailError::Input(format!(
                        "every question of {} is also in {}: nothing is held out",
                        cfg.test.display(),
                        cfg.train.display()
                    )));
                }
                test
            }
        };
        // Ordered by a hash of the seed and the question (not by `rand`, whose streams may change
        // between versions): the order, and so the held-out subset, depends on nothing else.
        let salt = seed ^ if split == Split::Eval { 0x5EED_E7A1 } else { 0 };
        problems.sort_by_cached_key(|p| (order_key(salt, &p.question), p.question.clone()));
        if tokenizer.chat_template.is_none() {
            tracing::warn!(
                "the tokenizer has no chat template: GSM8K prompts are plain \"Question: ... \
                 Answer:\" text"
            );
        }
        let env = Self {
            problems,
            split,
            cfg: cfg.clone(),
            tokenizer,
            rewards: gsm8k_rewards(),
        };
        env.prompt_text(&env.problems[0].question)?;
        Ok(env)
    }

    /// Problems in this split.
    pub fn len(&self) -> usize {
        self.problems.len()
    }

    /// Whether the split is empty (never: [`Gsm8k::open`] refuses that).
    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    /// The problem prompt `index` asks (train wraps around; held-out ends).
    pub fn problem(&self, index: u64) -> Option<&Gsm8kProblem> {
        match self.split {
            Split::Train => self.problems.get(index as usize % self.problems.len()),
            Split::Eval => self.problems.get(index as usize),
        }
    }

    /// The prompt text the model sees for `question` (see [`Gsm8k`]).
    pub fn prompt_text(&self, question: &str) -> Result<String> {
        let user = match self.cfg.instruction.trim() {
            "" => question.to_string(),
            instruction => format!("{question} {instruction}"),
        };
        let system = self.cfg.system_prompt.as_deref();
        if self.tokenizer.chat_template.is_none() {
            let system = system.map(|s| format!("{s}\n\n")).unwrap_or_default();
            return Ok(format!("{system}Question: {user}\nAnswer:"));
        }
        let mut messages: Vec<ChatMessage> = system
            .map(|s| ChatMessage::new("system", s))
            .into_iter()
            .collect();
        messages.push(ChatMessage::new("user", user));
        self.tokenizer.apply_chat_template(&messages, true)
    }
}

/// A well-mixed 64-bit hash of `salt` and `text` (FNV-1a, then SplitMix64's finalizer).
fn order_key(salt: u64, text: &str) -> u64 {
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64 ^ salt, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    let h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 31)
}

impl Environment for Gsm8k {
    fn prompt(&self, index: u64) -> Result<Option<Prompt>> {
        let Some(problem) = self.problem(index) else {
            return Ok(None);
        };
        let text = self.prompt_text(&problem.question)?;
        // The template already holds any special tokens (BOS included) the model expects.
        let ids = self.tokenizer.encode(&text, false)?;
        Ok(Some(Prompt {
            id: index,
            ids: Arc::new(ids),
            answer: problem.answer.clone(),
            metadata: json!(null),
            text,
        }))
    }
    fn rewards(&self) -> &[Reward] {
        &self.rewards
    }
    fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }
    fn reference_completion(&self, prompt: &Prompt) -> Option<String> {
        Some(self.problem(prompt.id)?.solution.clone())
    }
}
