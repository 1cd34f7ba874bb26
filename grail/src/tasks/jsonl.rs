//! Prompt/answer rows from a JSONL file (GSM8K's layout among others), judged by the answer
//! extractors.

use std::path::Path;
use std::sync::Arc;

use grail_core::error::{GrailError, Result};
use grail_core::tokenizer::Tokenizer;
use grail_rollout::{Dataset, Row, Split};

use super::answer_rewards;
use super::extract::extract_answer;

/// Reads `path` (UTF-8, with or without a byte-order mark): one object per line with a string
/// `prompt` (or `question`, as GSM8K names it) and an `answer` (a number, or text whose
/// `#### n` / `\boxed{n}` / plain value is the answer); a line that is not is an error naming
/// the file and line. Rewards: `format` (0.1, a `#### n` or `\boxed{n}` answer in a finished
/// completion) and `correct` (1.0); the SFT target is `#### <answer>`.
pub fn open_jsonl(path: &Path, split: Split, tokenizer: Arc<Tokenizer>) -> Result<Dataset> {
    let rows = parse_lines(path, |v| {
        let prompt = v
            .get("prompt")
            .or_else(|| v.get("question"))
            .and_then(|p| p.as_str())
            .ok_or("no string `prompt` (or `question`)")?;
        let answer = match v.get("answer") {
            Some(serde_json::Value::String(s)) => {
                extract_answer(s).unwrap_or_else(|| s.trim().to_string())
            }
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => return Err("no string or number `answer`".into()),
        };
        Ok(Row {
            prompt: prompt.to_string(),
            completion: Some(format!("#### {answer}")),
            answer,
        })
    })?;
    Dataset::from_rows(rows, split, tokenizer, answer_rewards()).map_err(|e| GrailError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Every non-blank line of `path` (UTF-8, with or without a byte-order mark) parsed as JSON and
/// then by `parse`; a line that fails either is an error naming the file and line.
pub(super) fn parse_lines<T>(
    path: &Path,
    mut parse: impl FnMut(&serde_json::Value) -> std::result::Result<T, String>,
) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).map_err(|e| GrailError::io(path, e))?;
    // Editors on Windows start UTF-8 files with a byte-order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = |m: String| GrailError::Json {
            path: path.to_path_buf(),
            message: format!("line {}: {m}", i + 1),
        };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        out.push(parse(&v).map_err(bad)?);
    }
    Ok(out)
}
