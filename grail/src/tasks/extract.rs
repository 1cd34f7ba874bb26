//! Answer extraction in the styles reward functions meet: GSM8K's `#### 42` and LaTeX's
//! `\boxed{42}`.

/// The answer after the last `####` (GSM8K style), trimmed, with thousands separators removed.
pub fn extract_hash_answer(text: &str) -> Option<String> {
    let (_, tail) = text.rsplit_once("####")?;
    let answer: String = tail
        .split_whitespace()
        .next()?
        .chars()
        .filter(|c| *c != ',')
        .collect();
    let answer = answer.trim_end_matches('.').to_string();
    (!answer.is_empty()).then_some(answer)
}

/// The content of the last `\boxed{...}` (braces balanced), trimmed.
pub fn extract_boxed_answer(text: &str) -> Option<String> {
    let start = text.rfind("\\boxed{")? + "\\boxed{".len();
    let mut depth = 1;
    for (i, c) in text[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    let inner = text[start..start + i].trim().replace(',', "");
                    return (!inner.is_empty()).then_some(inner);
                }
            }
            _ => {}
        }
    }
    None
}

/// `\boxed{}` if present, else `####`.
pub fn extract_answer(text: &str) -> Option<String> {
    extract_boxed_answer(text).or_else(|| extract_hash_answer(text))
}

/// Whether two answers are the same number (or, failing that, the same string).
pub fn answers_match(predicted: &str, reference: &str) -> bool {
    match (
        predicted.parse::<f64>(),
        reference.trim().replace(',', "").parse::<f64>(),
    ) {
        (Ok(a), Ok(b)) => (a - b).abs() < 1e-9,
        _ => predicted.trim() == reference.trim(),
    }
}
