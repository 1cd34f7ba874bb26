//! GSM8K: the problems load, prompts are the model's chat template, rewards judge the final
//! number, the held-out subset is fixed by the seed and disjoint from train, and bad configs
//! are errors naming the key or path.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use grail::config::EnvSection;
use grail::tasks::extract::{answers_match, extract_final_number};
use grail::tasks::{Gsm8k, Gsm8kConfig, gsm8k_rewards, read_gsm8k};
use grail::{Grpo, GrpoConfig};
use grail_core::tokenizer::Tokenizer;
use grail_rollout::{Completion, Environment, Prompt, Split};

/// ChatML, with a default system turn, as SmolLM2 and Qwen ship it.
const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The shared GSM8K files, or `None` (after saying why the test is skipped) without them.
fn data_dir(test: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/gsm8k");
    if dir.join("train.jsonl").is_file() && dir.join("test.jsonl").is_file() {
        Some(dir)
    } else {
        eprintln!("{test}: skipped: no GSM8K data at {}", dir.display());
        None
    }
}

/// A small byte-level BPE with ChatML's special tokens (`<|im_end|>` ends generation), and the
/// chat template if `chat`.
fn tokenizer(chat: bool) -> Tokenizer {
    let texts = [
        "<|im_start|>user\nTom has 3 apples and buys 1,200 more. How many?<|im_end|>",
        "3 + 1200 = 1203\n#### 1203",
    ];
    let mut tok =
        Tokenizer::train_bpe(texts.into_iter(), 300, &["<|im_end|>", "<|im_start|>"]).unwrap();
    tok.chat_template = chat.then(|| CHATML.to_string());
    tok
}

/// `n` GSM8K-layout problems numbered from `from`, in `dir/name`.
fn write_problems(dir: &Path, name: &str, from: usize, n: usize) -> PathBuf {
    let lines: Vec<String> = (from..from + n)
        .map(|i| {
            serde_json::json!({
                "question": format!("Tom has {i} apples and buys 1,200 more. How many?"),
                "answer": format!("{i} + 1200 = <<{i}+1200={0}>>{0}\n#### {1}", i + 1200, fmt_thousands(i + 1200)),
            })
            .to_string()
        })
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

fn fmt_thousands(n: usize) -> String {
    if n >= 1000 {
        format!("{},{:03}", n / 1000, n % 1000)
    } else {
        n.to_string()
    }
}

fn small_config(dir: &Path) -> Gsm8kConfig {
    Gsm8kConfig {
        train: write_problems(dir, "train.jsonl", 0, 60),
        test: write_problems(dir, "test.jsonl", 1000, 20),
        ..Gsm8kConfig::default()
    }
}

#[test]
fn prompts_are_the_user_turn_of_the_chat_template() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(dir.path());
    let tok = Arc::new(tokenizer(true));
    let env = Gsm8k::open(&cfg, 0, Split::Train, tok.clone()).unwrap();
    let p = env.prompt(0).unwrap().unwrap();
    let q = &env.problem(0).unwrap().question;
    assert_eq!(
        p.text,
        format!(
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n{q} Let's think \
             step by step and output the final answer after \"####\".<|im_end|>\n\
             <|im_start|>assistant\n"
        )
    );
    assert_eq!(*p.ids, tok.encode(&p.text, false).unwrap());
    assert_eq!(
        p.ids[0],
        tok.token_to_id("<|im_start|>").unwrap(),
        "one special token"
    );
    assert_eq!(p.answer, env.problem(0).unwrap().answer);
    assert!(
        !p.answer.contains(','),
        "thousands separators removed: {}",
        p.answer
    );

    // A system prompt of the config's replaces the template's; an empty instruction adds nothing.
    let own = Gsm8kConfig {
        system_prompt: Some("Answer in \\boxed{}.".into()),
        instruction: String::new(),
        ..cfg.clone()
    };
    let p = Gsm8k::open(&own, 0, Split::Train, tok)
        .unwrap()
        .prompt(0)
        .unwrap()
        .unwrap();
    assert_eq!(
        p.text,
        format!(
            "<|im_start|>system\nAnswer in \\boxed{{}}.<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
        )
    );

    // Without a chat template (a base model's tokenizer): a plain prompt.
    let env = Gsm8k::open(&own, 0, Split::Train, Arc::new(tokenizer(false))).unwrap();
    let p = env.prompt(0).unwrap().unwrap();
    assert_eq!(
        p.text,
        format!("Answer in \\boxed{{}}.\n\nQuestion: {q}\nAnswer:")
    );
}

#[test]
fn the_real_smollm2_template_renders_the_question() {
    let Some(model) = grail_testkit::smollm2_dir("the_real_smollm2_template_renders_the_question")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tok = Arc::new(Tokenizer::from_dir(&model).unwrap());
    let env = Gsm8k::open(&small_config(dir.path()), 3, Split::Eval, tok.clone()).unwrap();
    let p = env.prompt(0).unwrap().unwrap();
    let q = &env.problem(0).unwrap().question;
    assert_eq!(
        p.text,
        format!(
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\n{q} Let's think step by step and output the final \
             answer after \"####\".<|im_end|>\n<|im_start|>assistant\n"
        )
    );
    assert_eq!(p.ids[0], tok.token_to_id("<|im_start|>").unwrap());
    assert_eq!(
        tok.decode(&p.ids, false).unwrap(),
        p.text,
        "the ids are the text"
    );
}

#[test]
fn rewards_judge_the_final_number_and_the_format() {
    let prompt = Prompt {
        id: 0,
        text: String::new(),
        ids: Arc::new(vec![]),
        answer: "1200".into(),
        metadata: serde_json::Value::Null,
    };
    let rewards = gsm8k_rewards();
    let names: Vec<&str> = rewards.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["format", "correct"]);
    assert!(rewards[0].weight > 0.0 && rewards[0].weight <= 0.2);
    let score = |text: &str, finished: bool| -> Vec<f32> {
        let c = Completion {
            ids: vec![],
            text: text.into(),
            finished,
        };
        rewards.iter().map(|r| (r.func)(&prompt, &c)).collect()
    };
    assert_eq!(score("3 * 400 = 1,200\n#### 1,200", true), [1.0, 1.0]);
    assert_eq!(score(r"So \boxed{\$1200.00}.", true), [1.0, 1.0]);
    assert_eq!(
        score("It is 1200 apples.", true),
        [0.0, 1.0],
        "last number, no format"
    );
    assert_eq!(
        score("#### 1200", false),
        [0.0, 1.0],
        "cut off: no format reward"
    );
    assert_eq!(
        score("#### 1199, not 1200", true),
        [1.0, 0.0],
        "`####` wins"
    );
    assert_eq!(score("no idea", true), [0.0, 0.0]);
}

#[test]
fn every_gsm8k_problem_loads_with_its_final_answer() {
    let Some(data) = data_dir("every_gsm8k_problem_loads_with_its_final_answer") else {
        return;
    };
    for (file, rows) in [("train.jsonl", 7473), ("test.jsonl", 1319)] {
        let problems = read_gsm8k(&data.join(file)).unwrap();
        assert_eq!(problems.len(), rows, "{file}");
        for p in &problems {
            assert!(
                p.answer.parse::<i64>().is_ok(),
                "{file}: answer {:?}",
                p.answer
            );
            assert!(!p.solution.contains("<<"), "{file}: {:?}", p.solution);
            // The reference solution earns the `correct` reward: the extractor reads the data.
            let found = extract_final_number(&p.solution).unwrap();
            assert!(
                answers_match(&found, &p.answer),
                "{file}: {found} vs {}",
                p.answer
            );
        }
    }
}

#[test]
fn the_held_out_subset_is_fixed_by_the_seed_and_disjoint_from_train() {
    let Some(data) = data_dir("the_held_out_subset_is_fixed_by_the_seed_and_disjoint_from_train")
    else {
        return;
    };
    let cfg = Gsm8kConfig {
        train: data.join("train.jsonl"),
        test: data.join("test.jsonl"),
        ..Gsm8kConfig::default()
    };
    let tok = Arc::new(tokenizer(true));
    let open = |cfg: &Gsm8kConfig, seed, split| Gsm8k::open(cfg, seed, split, tok.clone()).unwrap();
    let first = |env: &Gsm8k, n: u64| -> Vec<String> {
        (0..n)
            .map(|i| env.problem(i).unwrap().question.clone())
            .collect()
    };
    let (train, eval) = (open(&cfg, 7, Split::Train), open(&cfg, 7, Split::Eval));
    assert_eq!((train.len(), eval.len()), (7473, 1319));
    let subset = first(&eval, 32);
    assert_eq!(
        subset,
        first(&open(&cfg, 7, Split::Eval), 32),
        "same seed, same subset"
    );
    assert_ne!(
        subset,
        first(&open(&cfg, 8, Split::Eval), 32),
        "another seed, another"
    );
    let file: Vec<String> = read_gsm8k(&cfg.test)
        .unwrap()
        .into_iter()
        .map(|p| p.question)
        .collect();
    assert_ne!(subset, file[..32], "shuffled, not the file's head");

    // The subset depends on the problems, not on where they sit in the file.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(&cfg.test).unwrap();
    let reversed: Vec<&str> = text.lines().rev().collect();
    let moved = Gsm8kConfig {
        test: dir.path().join("test.jsonl"),
        ..cfg.clone()
    };
    std::fs::write(&moved.test, reversed.join("\n")).unwrap();
    assert_eq!(first(&open(&moved, 7, Split::Eval), 32), subset);

    let train_questions: HashSet<String> = first(&train, train.len() as u64).into_iter().collect();
    assert_eq!(
        train_questions.len(),
        7473,
        "train serves every problem once per epoch"
    );
    assert!(
        first(&eval, eval.len() as u64)
            .iter()
            .all(|q| !train_questions.contains(q))
    );
    assert!(
        eval.prompt(eval.len() as u64).unwrap().is_none(),
        "held-out ends"
    );
    assert_eq!(
        train.prompt(train.len() as u64).unwrap().unwrap().text,
        train.prompt(0).unwrap().unwrap().text,
        "train cycles"
    );
}

#[test]
fn held_out_leaves_out_questions_also_in_train_and_sft_imitates_the_solution() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Gsm8kConfig {
        train: write_problems(dir.path(), "train.jsonl", 0, 60),
        test: write_problems(dir.path(), "test.jsonl", 50, 20),
        ..Gsm8kConfig::default()
    };
    let tok = Arc::new(tokenizer(true));
    let eval = Gsm8k::open(&cfg, 0, Split::Eval, tok.clone()).unwrap();
    assert_eq!(eval.len(), 10, "problems 50..60 are in both files");
    let train = Gsm8k::open(&cfg, 0, Split::Train, tok.clone()).unwrap();
    let p = train.prompt(5).unwrap().unwrap();
    let sft = train.reference_completion(&p).unwrap();
    assert!(
        !sft.contains("<<")
            && sft.ends_with(&format!(
                "#### {}",
                fmt_thousands(p.answer.parse().unwrap())
            )),
        "{sft}"
    );

    let same = Gsm8kConfig {
        test: cfg.train.clone(),
        ..cfg.clone()
    };
    let msg = Gsm8k::open(&same, 0, Split::Eval, tok)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("nothing is held out"), "{msg}");
}

#[test]
fn bad_files_and_keys_are_errors_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(dir.path());
    let toml = |extra: &str| {
        format!(
            "[env]\nkind = \"gsm8k\"\ntrain = {:?}\ntest = {:?}\n{extra}",
            cfg.train, cfg.test
        )
    };
    let parsed = GrpoConfig::from_toml(&toml("system_prompt = \"Be brief.\"")).unwrap();
    let EnvSection::Gsm8k(g) = &parsed.env else {
        panic!("{:?}", parsed.env);
    };
    assert_eq!(g.system_prompt.as_deref(), Some("Be brief."));
    assert_eq!(
        g.instruction,
        Gsm8kConfig::default().instruction,
        "documented default"
    );

    let err = |toml: &str| format!("{:#}", GrpoConfig::from_toml(toml).unwrap_err());
    let m = err(&toml("tset = \"x.jsonl\""));
    assert!(m.contains("tset"), "unknown key: {m}");
    let m = err("[env]\nkind = \"gsm8k\"\ntrain = \"/nonexistent/train.jsonl\"\n");
    assert!(
        m.contains("env.train") && m.contains("/nonexistent/train.jsonl"),
        "{m}"
    );
    let m = err(&format!(
        "[env]\nkind = \"gsm8k\"\ntrain = {:?}\ntest = \"/no/test.jsonl\"\n",
        cfg.train
    ));
    assert!(
        m.contains("env.test") && m.contains("/no/test.jsonl"),
        "{m}"
    );

    let tok = Arc::new(tokenizer(true));
    let missing = Gsm8kConfig {
        train: dir.path().join("absent.jsonl"),
        ..cfg.clone()
    };
    let m = Gsm8k::open(&missing, 0, Split::Train, tok.clone())
        .err()
        .unwrap()
        .to_string();
    assert!(m.contains("absent.jsonl"), "{m}");
    std::fs::write(
        &cfg.test,
        "{\"question\": \"x\", \"answer\": \"#### 1\"}\n{\"question\": \"y\", \"answer\": \"2\"}\n",
    )
    .unwrap();
    let m = Gsm8k::open(&cfg, 0, Split::Eval, tok)
        .err()
        .unwrap()
        .to_string();
    assert!(
        m.contains("test.jsonl") && m.contains("line 2") && m.contains("####"),
        "{m}"
    );
}

#[test]
fn a_model_from_scratch_is_refused_and_a_given_tokenizer_runs() {
    let dir = tempfile::tempdir().unwrap();
    let env = small_config(dir.path());
    let toml = grail_testkit::tiny_job_toml(
        &dir.path().join("run"),
        "",
        "max_steps = 2\nfilter_zero_std_groups = false\nmax_prompt_length = 96",
        "prompts = 4\nevery = 0",
    );
    let mut cfg = GrpoConfig::from_toml(&toml).unwrap();
    cfg.env = EnvSection::Gsm8k(env);
    cfg.sft.steps = 2;
    cfg.sft.batch_size = 4;
    let msg = format!("{:#}", Grpo::new(cfg.clone()).run().unwrap_err());
    assert!(msg.contains("gsm8k") && msg.contains("model.path"), "{msg}");

    let summary = Grpo::new(cfg).tokenizer(tokenizer(true)).run().unwrap();
    assert_eq!(summary.steps, 2);
    assert!((0.0..=1.0).contains(&summary.final_accuracy));
}

#[test]
fn the_example_configs_train_on_gsm8k_from_the_repository_root() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let data = data_dir("the_example_configs_train_on_gsm8k_from_the_repository_root");
    for name in ["smollm2-gsm8k.toml", "hf.toml"] {
        let text = std::fs::read_to_string(root.join("examples/configs").join(name)).unwrap();
        // Parsed without validation: the data paths are relative to the repository root.
        let mut cfg: GrpoConfig = toml::from_str(&text).unwrap();
        let EnvSection::Gsm8k(g) = &mut cfg.env else {
            panic!("{name}: {:?}", cfg.env);
        };
        assert_eq!(g.train, Gsm8kConfig::default().train, "{name}");
        assert_eq!(g.test, Gsm8kConfig::default().test, "{name}");
        if data.is_some() {
            g.train = root.join(&g.train);
            g.test = root.join(&g.test);
            cfg.validate().unwrap_or_else(|e| panic!("{name}: {e:#}"));
        }
        assert_eq!(
            cfg.sft.steps, 0,
            "{name}: a pretrained model needs no warm-up"
        );
    }
}
