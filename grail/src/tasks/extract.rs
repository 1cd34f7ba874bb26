//! Answer extraction in the styles reward functions meet: GSM8K's `#### 42`, LaTeX's
//! `\boxed{42}`, and, failing both, the last number of the text.

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

/// Every number in `text`, in order, as written but without thousands separators or currency
/// signs: `1,200` → `1200`, `$72.50` → `72.50`, `-3` → `-3`. A `-` is a sign only where it
/// cannot be a subtraction (not right after a letter, digit or closing bracket), so `16-3`
/// holds `16` and `3`; a `,` separates thousands only before exactly three digits that follow
/// at most three, so `1,2,3` holds three numbers; a `.` is a decimal point only before a digit,
/// so a sentence may end in `72.`.
pub fn numbers(text: &str) -> Vec<String> {
    // Digits, signs and separators are ASCII, so byte positions are char boundaries here.
    let b = text.as_bytes();
    let digit = |i: usize| b.get(i).is_some_and(u8::is_ascii_digit);
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !digit(i) {
            i += 1;
            continue;
        }
        let mut number = String::new();
        if negative_sign_before(b, i) {
            number.push('-');
        }
        let start = i;
        while digit(i) {
            i += 1;
        }
        number.push_str(&text[start..i]);
        if i - start <= 3 {
            while b.get(i) == Some(&b',') && (1..=3).all(|k| digit(i + k)) && !digit(i + 4) {
                number.push_str(&text[i + 1..i + 4]);
                i += 4;
            }
        }
        if b.get(i) == Some(&b'.') && digit(i + 1) {
            let start = i;
            i += 1;
            while digit(i) {
                i += 1;
            }
            number.push_str(&text[start..i]);
        }
        out.push(number);
    }
    out
}

/// Whether the number starting at byte `start` has a minus sign (`-5`, `-$5`, `= -5`).
fn negative_sign_before(b: &[u8], start: usize) -> bool {
    let mut p = start;
    if p > 0 && b[p - 1] == b'$' {
        p -= 1;
        if p > 0 && b[p - 1] == b'\\' {
            p -= 1;
        }
    }
    if p == 0 || b[p - 1] != b'-' {
        return false;
    }
    p -= 1;
    p == 0 || !(b[p - 1].is_ascii_alphanumeric() || matches!(b[p - 1], b')' | b']' | b'}'))
}

/// The number given in the requested form: the first number in the last `\boxed{}`, else the
/// number right after the last `####` (e.g. `#### $1,200.` → `1200`); `None` without one.
pub fn extract_marked_number(text: &str) -> Option<String> {
    let boxed = extract_boxed_answer(text).and_then(|a| numbers(&a).into_iter().next());
    boxed.or_else(|| {
        let (_, tail) = text.rsplit_once("####")?;
        numbers(tail.split_whitespace().next()?).into_iter().next()
    })
}

/// The final number of a free-form solution: [`extract_marked_number`] if the text has one in
/// the requested form, else its last number; `None` when the text has no number at all.
pub fn extract_final_number(text: &str) -> Option<String> {
    extract_marked_number(text).or_else(|| numbers(text).pop())
}

/// The value of an answer written as a plain number, allowing a leading `$` (or `\$`),
/// thousands separators and a trailing `.`: `$1,200.` → 1200.
pub fn parse_number(answer: &str) -> Option<f64> {
    let s = answer.trim();
    let s = s
        .strip_prefix("\\$")
        .or_else(|| s.strip_prefix('$'))
        .unwrap_or(s);
    let s: String = s
        .trim_end_matches('.')
        .chars()
        .filter(|c| *c != ',')
        .collect();
    s.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// Whether two answers are the same number ([`parse_number`]; `72`, `72.0` and `$72` agree),
/// or, failing that, the same string.
pub fn answers_match(predicted: &str, reference: &str) -> bool {
    match (parse_number(predicted), parse_number(reference)) {
        (Some(a), Some(b)) => (a - b).abs() < 1e-9,
        _ => predicted.trim() == reference.trim(),
    }
}
