//! The real SmolLM2-135M-Instruct checkpoint (bf16 weights, built by
//! `../shared/models/smollm2.sh`) against transformers 5.24 loading it in f32: for each chat
//! prompt of its `expected.json`, the rendered template, the token ids, the last-position logits
//! and the 32 greedy tokens. Skipped, with the reason printed, when the model is absent.

use burn::tensor::{Device, Int, Tensor, TensorData};
use grail_core::checkpoint::load_model;
use grail_core::model::{Layout, greedy};
use grail_core::tokenizer::{ChatMessage, Tokenizer};
use grail_testkit::{max_rel_diff, smollm2_dir};
use serde_json::Value;

/// Agreement of the last-position logits: max |Δ| / max |logit| over transformers' top 5.
const TOL: f64 = 1e-4;

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an id list")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

#[test]
fn smollm2_matches_transformers() {
    let Some(dir) = smollm2_dir("smollm2_matches_transformers") else {
        return;
    };
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let device = Device::flex();
    let model = load_model(&dir, &device).unwrap();
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    let prompts = expected["prompts"].as_array().unwrap();
    assert!(!prompts.is_empty(), "expected.json has no prompts");
    for (i, case) in prompts.iter().enumerate() {
        let messages: Vec<ChatMessage> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let text = tokenizer.apply_chat_template(&messages, true).unwrap();
        assert_eq!(
            text,
            case["prompt_text"].as_str().unwrap(),
            "prompt {i}: rendered template"
        );
        let ids = tokenizer.encode(&text, false).unwrap();
        assert_eq!(ids, ids_of(&case["prompt_ids"]), "prompt {i}: token ids");

        let len = ids.len();
        let input: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        let input = Tensor::<2, Int>::from_data(TensorData::new(input, [1, len]), &device);
        let logits = model
            .forward(input, &Layout::Padded { lengths: vec![len] })
            .unwrap();
        let vocab = model.config.vocab_size;
        let last: Vec<f32> = logits
            .narrow(1, len - 1, 1)
            .reshape([vocab])
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let top5 = &case["last_logits_top5"];
        let top_ids = ids_of(&top5["ids"]);
        let reference: Vec<f32> = top5["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let ours: Vec<f32> = top_ids.iter().map(|&t| last[t as usize]).collect();
        let rel = max_rel_diff(&ours, &reference);
        eprintln!("prompt {i} ({len} tokens): last-position top-5 logits rel diff {rel:.2e}");
        assert!(
            rel <= TOL,
            "prompt {i}: last-position logits differ by {rel:.3e} relative"
        );
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
        let our_top: Vec<u32> = order[..top_ids.len()].iter().map(|&t| t as u32).collect();
        assert_eq!(our_top, top_ids, "prompt {i}: top-5 token ids");

        let tokens = greedy(&model, &ids, ids_of(&case["greedy_ids"]).len(), true).unwrap();
        assert_eq!(
            tokens,
            ids_of(&case["greedy_ids"]),
            "prompt {i}: greedy tokens"
        );
        assert_eq!(
            tokenizer.decode(&tokens, false).unwrap(),
            case["greedy_text"].as_str().unwrap(),
            "prompt {i}: greedy text"
        );
    }
}
