//! Built-in environments: **countdown** (reach a target with the given numbers and `+ − × ÷`)
//! and **arithmetic** (multi-digit word problems answered GSM8K-style, `#### n`), procedurally
//! generated from a seed with exact verifiers; **GSM8K** (grade-school math word problems in the
//! model's chat template, train and test files); and a **JSONL dataset** (`{"prompt", "answer"}`
//! lines) with the same extractors.
//!
//! Every environment has a train and a held-out split that never share an instance: by a hash
//! of the instance ([`Split::contains`](grail_rollout::Split::contains)), or, for GSM8K, by file.

use grail_rollout::{Completion, Prompt, Reward};
use rand::SeedableRng;
use rand::rngs::StdRng;

mod arithmetic;
mod countdown;
pub mod expr;
pub mod extract;
mod gsm8k;
mod jsonl;

pub use arithmetic::{Arithmetic, ArithmeticConfig, arithmetic_task};
pub use countdown::{Countdown, CountdownConfig, CountdownTask, countdown_task};
pub use gsm8k::{Gsm8k, Gsm8kConfig, Gsm8kProblem, gsm8k_rewards, read_gsm8k};
pub use jsonl::open_jsonl;

use extract::{answers_match, extract_answer};

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

/// Rewards of tasks answered `#### n` or `\boxed{n}`: `format` (0.1, such an answer in a
/// finished completion) and `correct` (1.0, it matches the reference answer).
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
