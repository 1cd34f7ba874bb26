//! Every parser grail exposes to files it did not write, fed 10,000 seeded mutations of a valid
//! input each: safetensors (header and data), the sharded index, config.json, tokenizer.json, the
//! chat template, the run's TOML, JSONL rows (GSM8K's layout included, with the answer
//! extractors on every mutated text), the weight-delta codec and rollout objects (Parquet). Each input must come back
//! as a value or an error, never a panic. A failure prints the seed and writes the input to
//! `target/fuzz-failures/` so it can be replayed.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;

use burn::tensor::Device;
use grail::GrpoConfig;
use grail::tasks::extract::{extract_final_number, parse_number};
use grail::tasks::{open_jsonl, read_gsm8k};
use grail_core::checkpoint::{Checkpoint, StorageDtype, save_model};
use grail_core::model::{CausalLm, ModelConfig};
use grail_core::tokenizer::{ChatMessage, Tokenizer, render_chat_template};
use grail_protocol::{SyncMode, WeightPayload, WeightUpdate, WireDtype};
use grail_rollout::Split;
use grail_rollout::WeightState;
use grail_store::rollout_batch::{RolloutBatch, decode, encode};
use grail_trainer::WeightPublisher;

const CASES: usize = 10_000;

/// A seeded xorshift generator (the same inputs on every run).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Byte strings that tend to reach parser corners.
const TOKENS: &[&[u8]] = &[
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\\",
    b"\\u0000",
    b"null",
    b"true",
    b"-1",
    b"0",
    b"1e309",
    b"-0.0",
    b"NaN",
    b"18446744073709551616",
    b"4294967295",
    b"\n",
    b"=",
    b"[[",
    b"{%",
    b"%}",
    b"{{",
    b"}}",
    b"\xff\xfe",
    b"\xc3\x28",
    b"\x00",
];

/// One to four random edits of `seed`: bit flips, byte sets, inserted tokens or bytes, deletions,
/// duplications, truncation. `window` limits where edits land (e.g. a file's header).
fn mutate(seed: &[u8], rng: &mut Rng, window: usize) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let span = v.len().min(window).max(1);
        let at = rng.below(span);
        let last = v.len().saturating_sub(1);
        match rng.below(7) {
            0 if !v.is_empty() => v[at.min(last)] ^= 1 << rng.below(8),
            1 if !v.is_empty() => v[at.min(last)] = rng.next() as u8,
            2 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                let at = at.min(v.len());
                v.splice(at..at, t.iter().copied());
            }
            3 if !v.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(v.len());
                v.drain(at.min(end)..end);
            }
            4 if !v.is_empty() => {
                let end = (at + 1 + rng.below(32)).min(v.len());
                let chunk = v[at.min(end)..end].to_vec();
                let at = at.min(v.len());
                v.splice(at..at, chunk);
            }
            5 => v.truncate(at),
            _ => {
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                let at = at.min(v.len());
                v.splice(at..at, bytes);
            }
        }
    }
    v
}

/// Feeds `CASES` mutations of `seed` to `parse`; fails on the first panic, keeping its input.
/// Returns how many inputs were accepted (the rest were errors).
fn fuzz(name: &str, seed: &[u8], window: usize, mut parse: impl FnMut(&[u8]) -> bool) -> usize {
    assert!(parse(seed), "{name}: the unmutated seed must parse");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
    let mut accepted = 0;
    for case in 0..CASES {
        let input = mutate(seed, &mut rng, window);
        match catch_unwind(AssertUnwindSafe(|| parse(&input))) {
            Ok(ok) => accepted += ok as usize,
            Err(panic) => {
                let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-failures");
                std::fs::create_dir_all(&dir).unwrap();
                let path = dir.join(format!("{name}-{case}"));
                std::fs::write(&path, &input).unwrap();
                let msg = grail_protocol::panic_message(panic.as_ref());
                panic!(
                    "{name}: case {case} panicked ({msg}); input in {}",
                    path.display()
                );
            }
        }
    }
    eprintln!("{name}: {CASES} inputs, {accepted} accepted, the rest rejected with an error");
    accepted
}

fn tiny_model() -> CausalLm {
    CausalLm::init(
        &ModelConfig::builder()
            .vocab_size(16)
            .hidden_size(8)
            .intermediate_size(16)
            .num_hidden_layers(1)
            .num_attention_heads(2)
            .num_key_value_heads(1)
            .max_position_embeddings(32)
            .build()
            .unwrap(),
        1,
        &Device::flex(),
    )
}

#[test]
fn safetensors_files_and_config_json() {
    let dir = tempfile::tempdir().unwrap();
    save_model(&tiny_model(), dir.path(), StorageDtype::BF16).unwrap();
    let weights = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let config = std::fs::read(dir.path().join("config.json")).unwrap();
    let device = Device::flex();
    let path = dir.path().join("model.safetensors");
    // Mostly the header (where the structure is), sometimes the data and the length prefix.
    fuzz("safetensors", &weights, 600, |bytes| {
        std::fs::write(&path, bytes).unwrap();
        Checkpoint::open(dir.path())
            .and_then(|c| c.load(&device))
            .is_ok()
    });
    std::fs::write(&path, &weights).unwrap();
    fuzz("config.json", &config, usize::MAX, |bytes| {
        let Ok(value) = serde_json::from_slice(bytes) else {
            return false;
        };
        ModelConfig::from_hf_json(value).is_ok()
    });
}

#[test]
fn sharded_safetensors_index() {
    let dir = tempfile::tempdir().unwrap();
    save_model(&tiny_model(), dir.path(), StorageDtype::F32).unwrap();
    // The single file becomes one "shard" named by an index that lists every tensor.
    std::fs::rename(
        dir.path().join("model.safetensors"),
        dir.path().join("model-00001-of-00001.safetensors"),
    )
    .unwrap();
    let bytes = std::fs::read(dir.path().join("model-00001-of-00001.safetensors")).unwrap();
    let names: Vec<String> = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(str::to_string)
        .collect();
    let map: serde_json::Map<String, serde_json::Value> = names
        .into_iter()
        .map(|n| (n, "model-00001-of-00001.safetensors".into()))
        .collect();
    let index = serde_json::json!({"metadata": {"total_size": bytes.len()}, "weight_map": map});
    let index = serde_json::to_vec_pretty(&index).unwrap();
    let path = dir.path().join("model.safetensors.index.json");
    let device = Device::flex();
    fuzz("safetensors-index", &index, usize::MAX, |b| {
        std::fs::write(&path, b).unwrap();
        Checkpoint::open(dir.path())
            .and_then(|c| c.load(&device))
            .is_ok()
    });
}

fn trained_tokenizer() -> Tokenizer {
    let texts: Vec<String> = (0..200)
        .map(|i| format!("what is {i} plus {} ? #### {}", i * 7, i * 8))
        .collect();
    Tokenizer::train_bpe(texts.iter().map(String::as_str), 300, &["<|endoftext|>"]).unwrap()
}

#[test]
fn tokenizer_json_and_chat_template() {
    let dir = tempfile::tempdir().unwrap();
    trained_tokenizer().save(dir.path()).unwrap();
    let json = std::fs::read(dir.path().join("tokenizer.json")).unwrap();
    let path = dir.path().join("tokenizer.json");
    // Mutations anywhere in the file, and concentrated on its opening (model type, options).
    fuzz("tokenizer.json", &json, usize::MAX, |b| {
        std::fs::write(&path, b).unwrap();
        Tokenizer::from_dir(dir.path())
            .and_then(|t| t.encode("what is 12 plus 7 ?", false))
            .is_ok()
    });
    // ChatML with a default system prompt, as SmolLM2 and Qwen ship it.
    let template = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    let messages = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "What is 12 + 7?"),
    ];
    fuzz("chat-template", template.as_bytes(), usize::MAX, |b| {
        let Ok(t) = std::str::from_utf8(b) else {
            return false;
        };
        render_chat_template(t, &messages, true, "", "<|im_end|>").is_ok()
    });
}

#[test]
fn run_toml() {
    let seed = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/configs/countdown.toml"),
    )
    .unwrap();
    fuzz("job.toml", &seed, usize::MAX, |b| {
        let Ok(text) = std::str::from_utf8(b) else {
            return false;
        };
        GrpoConfig::from_toml(text).is_ok()
    });
}

#[test]
fn jsonl_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.jsonl");
    let rows: Vec<String> = (0..12)
        .map(|i| {
            serde_json::json!({"question": format!("what is {i} plus 1 ?"), "answer": format!("{i} + 1 = {}\n#### {}", i + 1, i + 1)})
                .to_string()
        })
        .collect();
    let seed = rows.join("\n").into_bytes();
    let tokenizer = Arc::new(trained_tokenizer());
    fuzz("jsonl", &seed, usize::MAX, |b| {
        std::fs::write(&path, b).unwrap();
        open_jsonl(&path, Split::Train, tokenizer.clone()).is_ok()
    });
}

#[test]
fn gsm8k_rows_and_answer_extraction() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gsm8k.jsonl");
    let answers = [
        "48/2 = <<48/2=24>>24 clips\n#### 1,224",
        "A loss of -$5, so \\boxed{\\$-5.50}\n#### -5",
        "3 - 1,000.5 = -997.5\n#### 72",
    ];
    let seed: Vec<String> = answers
        .iter()
        .enumerate()
        .map(|(i, a)| {
            serde_json::json!({"question": format!("Q{i}: 1,200 apples?"), "answer": a}).to_string()
        })
        .collect();
    let seed = seed.join("\n").into_bytes();
    fuzz("gsm8k", &seed, usize::MAX, |b| {
        // Whatever the text, an extracted final number is a number.
        if let Some(n) = extract_final_number(&String::from_utf8_lossy(b)) {
            assert!(parse_number(&n).is_some(), "{n:?}");
        }
        std::fs::write(&path, b).unwrap();
        read_gsm8k(&path).is_ok()
    });
}

#[test]
fn weight_delta_codec() {
    let old = tiny_model();
    let new = CausalLm::init(&old.config, 2, &Device::flex());
    let mut publisher = WeightPublisher::new(SyncMode::Delta, WireDtype::Bf16, &old, 0);
    let update = publisher.publish(1, &new);
    let WeightPayload::Delta { bytes, .. } = &update.payload else {
        panic!("a delta");
    };
    let base = WeightState::new(&old, 0, WireDtype::Bf16);
    let accepted = fuzz("weight-delta", bytes, usize::MAX, |b| {
        let mut state = base.clone();
        let update = WeightUpdate {
            version: 1,
            payload: WeightPayload::Delta {
                base: 0,
                wire: WireDtype::Bf16,
                bytes: Arc::new(b.to_vec()),
            },
        };
        let ok = state.apply(&update).is_ok();
        if !ok {
            // A rejected delta leaves the weights as they were.
            assert_eq!(
                state.tensors(),
                base.tensors(),
                "a failed apply changed the weights"
            );
        }
        ok
    });
    eprintln!("weight-delta: {accepted} mutated deltas decoded");
}

#[test]
fn rollout_objects() {
    let groups = (0..3u64)
        .map(|p| grail_protocol::Group {
            prompt_id: p,
            prompt_ids: Arc::new(vec![1, 2, p as u32]),
            samples: (0..4)
                .map(|i| grail_protocol::Sample::new(vec![5, 6, i], vec![-0.5; 3], vec![1.0], 0))
                .collect(),
        })
        .collect();
    let seed = encode(&RolloutBatch {
        worker_id: "w".into(),
        reward_names: vec!["correct".into()],
        groups,
    })
    .unwrap();
    let accepted = fuzz("rollout-object", &seed, usize::MAX, |b| {
        decode(b.to_vec().into()).is_ok()
    });
    eprintln!("rollout-object: {accepted} mutated objects decoded");
}
