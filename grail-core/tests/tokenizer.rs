//! Tokenizer: run-time BPE training, round trips, special tokens and chat templates.

use grail_core::tokenizer::{ChatMessage, Tokenizer, render_chat_template};

const CORPUS: &[&str] = &[
    "Using the numbers 3, 7 and 25, reach 46.",
    "The answer is 25 + 3 * 7 = 46.",
    "What is 1234 + 5678? #### 6912",
    "Think step by step, then answer in <answer></answer> tags.",
];

fn trained() -> Tokenizer {
    Tokenizer::train_bpe(
        CORPUS.iter().copied(),
        300,
        &["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    )
    .unwrap()
}

#[test]
fn trained_bpe_round_trips_any_text() {
    let tok = trained();
    assert!(
        tok.vocab_size() > 256 && tok.vocab_size() <= 300,
        "vocab {}",
        tok.vocab_size()
    );
    for text in CORPUS
        .iter()
        .copied()
        .chain(["unseen words: zebra ünïcödé 🚀 \n\t  spaces", ""])
    {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
    // Merges learned from the corpus make its text shorter than its bytes.
    let ids = tok.encode(CORPUS[1], false).unwrap();
    assert!(
        ids.len() < CORPUS[1].len(),
        "{} tokens for {} bytes",
        ids.len(),
        CORPUS[1].len()
    );
}

#[test]
fn special_tokens_are_single_ids_and_training_is_deterministic() {
    let tok = trained();
    assert_eq!(tok.eos_id(), Some(0));
    assert_eq!(tok.pad_id(), Some(0));
    let ids = tok.encode("<|im_start|>user<|im_end|>", false).unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(
        trained().encode(CORPUS[2], false).unwrap(),
        tok.encode(CORPUS[2], false).unwrap()
    );
}

#[test]
fn save_and_load_from_dir_keeps_specials_and_template() {
    let mut tok = trained();
    tok.chat_template =
        Some("{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}".into());
    let dir = tempfile::tempdir().unwrap();
    tok.save(dir.path()).unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [0, 2]}"#,
    )
    .unwrap();
    let loaded = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(loaded.eos_token_ids, vec![0, 2]);
    // Saved again (as the run manifest and checkpoints save it), every end-of-sequence id stays.
    let again = tempfile::tempdir().unwrap();
    loaded.save(again.path()).unwrap();
    assert_eq!(
        Tokenizer::from_dir(again.path()).unwrap().eos_token_ids,
        vec![0, 2]
    );
    assert_eq!(
        loaded.encode(CORPUS[0], false).unwrap(),
        tok.encode(CORPUS[0], false).unwrap()
    );
    let text = loaded
        .apply_chat_template(&[ChatMessage::new("user", "hi")], false)
        .unwrap();
    assert_eq!(text, "hi<|endoftext|>");
    let err = Tokenizer::from_dir("/nonexistent/tok")
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}

/// Qwen2's ChatML template (as shipped in Qwen2-0.5B-Instruct's tokenizer_config.json).
const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[test]
fn chatml_template_renders_as_transformers_does() {
    let messages = [ChatMessage::new("user", "What is 2+2?")];
    let text = render_chat_template(CHATML, &messages, true, "", "<|im_end|>").unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    let no_prompt = render_chat_template(CHATML, &messages, false, "", "").unwrap();
    assert!(no_prompt.ends_with("<|im_end|>\n"));
}

#[test]
fn templates_with_block_whitespace_python_methods_and_exceptions() {
    // trim_blocks/lstrip_blocks as transformers sets them, `.strip()` from Python, raise_exception.
    let template = "{{ bos_token }}\n{% for m in messages %}\n    {% if m.role == 'system' %}{{ raise_exception('no system') }}{% endif %}\n[{{ m.role }}] {{ m.content.strip() }}\n{% endfor %}";
    let ok = render_chat_template(
        template,
        &[ChatMessage::new("user", "  hi  ")],
        false,
        "<s>",
        "</s>",
    )
    .unwrap();
    assert_eq!(ok, "<s>\n[user] hi\n");
    let err = render_chat_template(template, &[ChatMessage::new("system", "x")], false, "", "")
        .unwrap_err();
    assert!(err.to_string().contains("no system"), "{err}");
}
