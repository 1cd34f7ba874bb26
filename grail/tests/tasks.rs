//! Built-in environments: exact verifiers, deterministic generation, disjoint splits, extractors.

use std::collections::HashSet;
use std::sync::Arc;

use grail::tasks::expr::evaluate;
use grail::tasks::extract::{
    answers_match, extract_answer, extract_boxed_answer, extract_final_number, extract_hash_answer,
    extract_marked_number, numbers, parse_number,
};
use grail::tasks::{
    ArithmeticConfig, Countdown, CountdownConfig, arithmetic_task, countdown_task, open_jsonl,
};
use grail_core::tokenizer::Tokenizer;
use grail_rollout::{Completion, Environment, Split};

fn tokenizer() -> Arc<Tokenizer> {
    let texts = [
        "nums 1 2 3 target 6 = (1+2)*3",
        "What is 12 plus 34? #### 46",
    ];
    Arc::new(Tokenizer::train_bpe(texts.iter().copied(), 300, &["<|endoftext|>"]).unwrap())
}

#[test]
fn expressions_evaluate_exactly() {
    assert_eq!(evaluate("(3+7)*5").unwrap().value.as_integer(), Some(50));
    assert_eq!(evaluate("3+7*5").unwrap().value.as_integer(), Some(38));
    assert_eq!(evaluate(" 8 / 3 * 3 ").unwrap().value.as_integer(), Some(8));
    assert_eq!(evaluate("7/2").unwrap().value.as_integer(), None);
    assert_eq!(evaluate("(2+3)*4-1").unwrap().numbers, vec![2, 3, 4, 1]);
    for bad in ["", "3+", "(3", "3)", "3/0", "a+1", "3 3"] {
        assert!(evaluate(bad).is_none(), "{bad:?}");
    }
}

#[test]
fn countdown_solutions_verify_and_splits_are_disjoint() {
    let cfg = CountdownConfig::default();
    let mut train = HashSet::new();
    for i in 0..300 {
        let t = countdown_task(&cfg, 7, Split::Train, i);
        assert!(t.is_solution(&t.solution), "{t:?}");
        assert!(t.target >= 1 && t.target <= cfg.max_target);
        assert!(!t.is_solution("0"));
        assert_eq!(t, countdown_task(&cfg, 7, Split::Train, i), "deterministic");
        train.insert(t.prompt());
    }
    for i in 0..100 {
        let t = countdown_task(&cfg, 7, Split::Eval, i);
        assert!(
            !train.contains(&t.prompt()),
            "held-out instance {t:?} is also a training instance"
        );
    }
    // Numbers may be used at most once, and only given numbers count.
    let t = countdown_task(&cfg, 1, Split::Train, 0);
    let n = t.numbers[0];
    assert!(
        !t.is_solution(&format!("{n}+{n}+{n}+{n}"))
            || t.numbers.iter().filter(|&&x| x == n).count() >= 4
    );
}

#[test]
fn countdown_rewards_score_format_and_correctness() {
    let env = Countdown::new(CountdownConfig::default(), 3, Split::Train, tokenizer()).unwrap();
    let p = env.prompt(5).unwrap().unwrap();
    let task = env.task(5);
    assert_eq!(p.text, task.prompt());
    let score = |text: &str, finished: bool| -> Vec<f32> {
        let c = Completion {
            ids: vec![],
            text: text.into(),
            finished,
        };
        env.rewards().iter().map(|r| (r.func)(&p, &c)).collect()
    };
    assert_eq!(score(&task.solution, true), vec![1.0, 1.0, 1.0]);
    assert_eq!(score("1+1", true)[0], 1.0);
    assert_eq!(score("1+", true), vec![0.0, 0.0, 0.0]);
    let near = format!("{}", task.numbers[0]);
    let c = score(&near, true)[1];
    assert!(
        (0.0..1.0).contains(&c) || task.numbers[0] == task.target,
        "closeness {c}"
    );
    assert_eq!(
        score(&task.solution, false)[0],
        0.0,
        "cut off by the length limit: no format reward"
    );
    assert!(
        Countdown::new(
            CountdownConfig {
                numbers: 9,
                ..CountdownConfig::default()
            },
            0,
            Split::Train,
            tokenizer()
        )
        .err()
        .unwrap()
        .to_string()
        .contains("env.countdown.numbers")
    );
}

#[test]
fn answers_are_extracted_in_both_styles() {
    assert_eq!(
        extract_hash_answer("so #### 1,234.").as_deref(),
        Some("1234")
    );
    assert_eq!(
        extract_boxed_answer(r"x \boxed{\frac{1}{2}} y").as_deref(),
        Some(r"\frac{1}{2}")
    );
    assert_eq!(
        extract_answer(r"#### 3 and \boxed{4}").as_deref(),
        Some("4")
    );
    assert_eq!(extract_answer("no answer"), None);
    assert!(answers_match("46", "46.0") && !answers_match("45", "46"));
    let (q, a) = arithmetic_task(&ArithmeticConfig { digits: 3 }, 1, Split::Train, 4);
    assert!(q.starts_with("What is ") && a.abs() < 1_000_000);
}

#[test]
fn final_numbers_are_extracted_from_tricky_text() {
    let fin = |t: &str| extract_final_number(t);
    let some = |n: &str| Some(n.to_string());
    // Thousands separators, currency, decimals, negatives.
    assert_eq!(fin("She saves 1,200 dollars."), some("1200"));
    assert_eq!(fin("In all: 3,000,000 grains"), some("3000000"));
    assert_eq!(fin("It costs $72.50 now"), some("72.50"));
    assert_eq!(
        fin("The total is $72."),
        some("72"),
        "a sentence's full stop"
    );
    assert_eq!(fin("It drops to -4.5 degrees"), some("-4.5"));
    assert_eq!(fin("a loss of -$15"), some("-15"));
    assert_eq!(fin("16-3-4=9"), some("9"));
    assert_eq!(
        numbers("16-3 = (-2)"),
        ["16", "3", "-2"],
        "subtraction is no sign"
    );
    assert_eq!(
        numbers("1,2,3 and 1234,567 and 12,3456"),
        ["1", "2", "3", "1234", "567", "12", "3456"]
    );
    assert_eq!(
        numbers("Janet’s ½ dozen — 5€ × 3 ≈ 15"),
        ["5", "3", "15"],
        "non-ASCII text around numbers"
    );
    // `\boxed{}` beats `####`, which beats the last number.
    assert_eq!(fin(r"#### 3 and then \boxed{4}, 5"), some("4"));
    assert_eq!(fin(r"so \boxed{\$1,200} in all"), some("1200"));
    assert_eq!(fin(r"\boxed{72 \text{ dollars}}"), some("72"));
    assert_eq!(fin("#### 18\nThen 20 more would be 38."), some("18"));
    assert_eq!(fin("#### $1,234.\n"), some("1234"));
    assert_eq!(fin("#### -5"), some("-5"));
    assert_eq!(
        fin("We get 7. ####"),
        some("7"),
        "an empty `####` falls back"
    );
    assert_eq!(fin("#### about 7"), some("7"), "so does a word after it");
    assert_eq!(extract_marked_number("The answer is 72"), None);
    assert_eq!(extract_marked_number(r"\boxed{x} #### 9"), some("9"));
    // No number at all.
    assert_eq!(fin("I do not know."), None);
    assert_eq!(fin(r"\boxed{} ####"), None);
    assert_eq!(fin(""), None);
    // Numeric comparison.
    for same in ["72", "72.0", "$72", "72.00", "\\$72", " 72. ", "0072"] {
        assert!(answers_match(same, "72"), "{same:?}");
    }
    assert!(answers_match("1200", "1,200") && answers_match("-3", "-3.0"));
    assert!(!answers_match("71", "72") && !answers_match("-72", "72"));
    assert_eq!(parse_number("seventy-two"), None);
    assert_eq!(parse_number("inf"), None);
}

#[test]
fn jsonl_dataset_reads_rows_and_names_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.jsonl");
    let rows: Vec<String> = (0..50)
        .map(|i| serde_json::json!({"prompt": format!("What is {i} plus 1?"), "answer": format!("#### {}", i + 1)}).to_string())
        .collect();
    std::fs::write(&path, rows.join("\n")).unwrap();
    let train = open_jsonl(&path, Split::Train, tokenizer()).unwrap();
    let eval = open_jsonl(&path, Split::Eval, tokenizer()).unwrap();
    assert_eq!(train.len() + eval.len(), 50);
    let p = train.prompt(0).unwrap().unwrap();
    let good = Completion {
        ids: vec![],
        text: format!("#### {}", p.answer),
        finished: true,
    };
    assert_eq!((train.rewards()[1].func)(&p, &good), 1.0);
    assert!(
        eval.prompt(eval.len() as u64).unwrap().is_none(),
        "held-out prompts are served once"
    );

    std::fs::write(
        &path,
        "{\"prompt\": \"x\", \"answer\": \"1\"}\n{\"prompt\": 3}\n",
    )
    .unwrap();
    let msg = open_jsonl(&path, Split::Train, tokenizer())
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("data.jsonl") && msg.contains("line 2"),
        "{msg}"
    );
}

#[test]
fn jsonl_reads_a_byte_order_mark_and_gsm8k_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gsm8k.jsonl");
    let rows: Vec<String> = (0..40)
        .map(|i| {
            serde_json::json!({
                "question": format!("Tom has {i} apples and buys 1,000 more. How many?"),
                "answer": format!("{i} + 1000 = <<{i}+1000={}>>{}\n#### {}", i + 1000, i + 1000, i + 1000),
            })
            .to_string()
        })
        .collect();
    std::fs::write(&path, format!("\u{feff}{}\n", rows.join("\n"))).unwrap();
    let train = open_jsonl(&path, Split::Train, tokenizer()).unwrap();
    let eval = open_jsonl(&path, Split::Eval, tokenizer()).unwrap();
    assert_eq!(
        train.len() + eval.len(),
        40,
        "the first line (after the BOM) is read too"
    );
    let p = train.prompt(0).unwrap().unwrap();
    assert!(p.text.starts_with("Tom has"), "{}", p.text);
    assert!(p.answer.parse::<u32>().unwrap() >= 1000, "{}", p.answer);
}

#[test]
fn a_prompt_the_tokenizer_cannot_encode_is_an_error_not_the_end_of_the_data() {
    use std::collections::HashMap;
    use tokenizers::models::wordlevel::WordLevel;
    // A word-level vocabulary whose unknown token is missing: any other word fails to encode.
    let vocab: HashMap<String, u32> = [("What".to_string(), 0), ("<eos>".to_string(), 1)].into();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<unk>".into())
        .build()
        .unwrap();
    let mut inner = tokenizers::Tokenizer::new(model);
    inner.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
    let tok = std::sync::Arc::new(grail_core::tokenizer::Tokenizer::from_inner(inner));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.jsonl");
    let rows: Vec<String> = (0..20)
        .map(|i| serde_json::json!({"prompt": format!("What {i}"), "answer": "1"}).to_string())
        .collect();
    std::fs::write(&path, rows.join("\n")).unwrap();
    let train = open_jsonl(&path, Split::Train, tok).unwrap();
    let err = train
        .prompt(0)
        .expect_err("an unknown word cannot be encoded");
    assert!(err.to_string().to_lowercase().contains("unk"), "{err}");
}
