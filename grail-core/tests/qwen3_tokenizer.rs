//! The real Qwen3 tokenizer (a 151k-token byte-level BPE, fetched by `scripts/qwen3-tokenizer.sh`)
//! against transformers: for each case of `tests/data/qwen3_tokenizer.json` (written by
//! `scripts/qwen3_tokenizer_reference.py`), the ids of varied texts, their decodings, and chat
//! renders with Qwen3's `enable_thinking` switch and their ids. Skipped, with the reason printed,
//! when the tokenizer is absent. Every mismatch is collected and reported with its case's name.

use std::path::Path;

use grail_core::tokenizer::{ChatMessage, Tokenizer, render_chat_template_with};
use grail_testkit::qwen3_tokenizer_dir;
use serde::Deserialize;
use serde_json::{Value, json};

/// The reference file; fields this test does not check (provenance) are ignored.
#[derive(Deserialize)]
struct Reference {
    vocab_size: usize,
    eos_token_id: u32,
    pad_token_id: u32,
    encode: Vec<EncodeCase>,
    chat: Vec<ChatCase>,
}

/// A text, its ids without special tokens, and transformers' decodings of those ids.
#[derive(Deserialize)]
struct EncodeCase {
    name: String,
    text: String,
    ids: Vec<u32>,
    decoded: String,
    decoded_skip_special: String,
}

/// A conversation, the variables passed besides it, transformers' render and its ids.
#[derive(Deserialize)]
struct ChatCase {
    name: String,
    messages: Vec<Message>,
    add_generation_prompt: bool,
    /// Extra template variables as `apply_chat_template(**extra)` got them: `{}` or
    /// `{"enable_thinking": bool}`.
    extra: Value,
    rendered: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

/// Qwen3's vocabulary is 151,643 BPE tokens plus its added tokens.
const MIN_VOCAB: usize = 151_000;

fn reference() -> Reference {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/qwen3_tokenizer.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Records a mismatch of `what` in case `name` (both values shown) instead of stopping at the
/// first, so one run shows every case that differs.
fn check<T: PartialEq + std::fmt::Debug>(
    failures: &mut Vec<String>,
    name: &str,
    what: &str,
    ours: T,
    transformers: T,
) {
    if ours != transformers {
        failures.push(format!(
            "case `{name}`: {what} differ\n    ours:         {ours:?}\n    transformers: {transformers:?}"
        ));
    }
}

#[test]
fn qwen3_tokenizer_matches_transformers() {
    let Some(dir) = qwen3_tokenizer_dir("qwen3_tokenizer_matches_transformers") else {
        return;
    };
    let reference = reference();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert!(
        tok.vocab_size() >= MIN_VOCAB,
        "vocab size {} < {MIN_VOCAB}: {} is not the full Qwen3 tokenizer",
        tok.vocab_size(),
        dir.display()
    );
    assert_eq!(tok.vocab_size(), reference.vocab_size, "vocab size");
    assert_eq!(tok.eos_id(), Some(reference.eos_token_id), "eos id");
    assert_eq!(tok.pad_id(), Some(reference.pad_token_id), "pad id");
    assert!(!reference.encode.is_empty() && !reference.chat.is_empty());

    let mut failures = Vec::new();
    for case in &reference.encode {
        let name = case.name.as_str();
        match tok.encode(&case.text, false) {
            Ok(ids) => check(&mut failures, name, "ids", ids, case.ids.clone()),
            Err(e) => failures.push(format!("case `{name}`: encode failed: {e}")),
        }
        // Qwen3 adds no bos/eos (the reference script checks this on the Python side).
        match tok.encode(&case.text, true) {
            Ok(ids) => check(
                &mut failures,
                name,
                "ids with add_special_tokens",
                ids,
                case.ids.clone(),
            ),
            Err(e) => failures.push(format!("case `{name}`: encode (specials) failed: {e}")),
        }
        for (skip, expected) in [(false, &case.decoded), (true, &case.decoded_skip_special)] {
            let what = format!("decodings (skip_special_tokens={skip})");
            match tok.decode(&case.ids, skip) {
                Ok(text) => check(&mut failures, name, &what, &text, expected),
                Err(e) => failures.push(format!("case `{name}`: {what} failed: {e}")),
            }
        }
    }

    for case in &reference.chat {
        let name = case.name.as_str();
        let messages: Vec<ChatMessage> = case
            .messages
            .iter()
            .map(|m| ChatMessage::new(&m.role, &m.content))
            .collect();
        let rendered = match tok.apply_chat_template_with(
            &messages,
            case.add_generation_prompt,
            &case.extra,
        ) {
            Ok(text) => text,
            Err(e) => {
                failures.push(format!("case `{name}`: chat template failed: {e}"));
                continue;
            }
        };
        check(
            &mut failures,
            name,
            "rendered chats",
            &rendered,
            &case.rendered,
        );
        // The ids of transformers' render, so a render mismatch above does not hide a tokenizer
        // mismatch here.
        match tok.encode(&case.rendered, false) {
            Ok(ids) => check(&mut failures, name, "rendered ids", ids, case.ids.clone()),
            Err(e) => failures.push(format!("case `{name}`: encode of the render failed: {e}")),
        }
    }

    eprintln!(
        "Qwen3 tokenizer ({} tokens): {} texts, {} chats checked",
        tok.vocab_size(),
        reference.encode.len(),
        reference.chat.len()
    );
    assert!(
        failures.is_empty(),
        "{} mismatches against transformers:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The thinking switch reaches the template as a boolean (`is false` holds only for JSON
/// `false`, as only for Python's `False`), absent stays undefined, and the standard variables
/// cannot be overridden. Needs no download.
#[test]
fn extra_template_variables() {
    let template = "{% if enable_thinking is defined and enable_thinking is false %}off\
                    {% elif enable_thinking is defined %}on{% else %}absent{% endif %}";
    let messages = [ChatMessage::new("user", "hi")];
    let render =
        |extra: &Value| render_chat_template_with(template, &messages, true, "", "", extra);
    assert_eq!(render(&json!({"enable_thinking": false})).unwrap(), "off");
    assert_eq!(render(&json!({"enable_thinking": true})).unwrap(), "on");
    assert_eq!(render(&json!({})).unwrap(), "absent");
    assert_eq!(render(&Value::Null).unwrap(), "absent");
    assert!(render(&json!([false])).is_err(), "a non-object extra");
    assert!(
        render(&json!({"add_generation_prompt": false})).is_err(),
        "an extra that replaces a standard variable"
    );
}
