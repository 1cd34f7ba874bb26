//! Hugging Face parity of the model on every fixture checkpoint (logits, packed rows, padded
//! batches, incremental decoding, greedy generation).

use burn::tensor::{Device, Int, Tensor, TensorData};
use grail_core::checkpoint::load_model;
use grail_core::model::{CausalLm, KvCache, Layout, greedy};
use grail_testkit::{FixtureTensor, kernel_test_device, max_rel_diff, model_dirs, read_tensors};
use std::collections::HashMap;
use std::path::Path;

const TOL: f64 = 1e-4;

struct Case {
    model: CausalLm,
    expected: HashMap<String, FixtureTensor>,
    name: String,
}

fn cases() -> Vec<Case> {
    let device = Device::flex();
    model_dirs()
        .into_iter()
        .map(|dir| Case {
            model: load_model(&dir, &device).unwrap_or_else(|e| panic!("{}: {e}", dir.display())),
            expected: read_tensors(&dir.join("expected.safetensors")).unwrap(),
            name: dir.file_name().unwrap().to_string_lossy().into_owned(),
        })
        .collect()
}

/// The `input_ids_<i>` / `logits_<i>` pairs of a fixture, in index order.
fn sequences(expected: &HashMap<String, FixtureTensor>) -> Vec<(Vec<u32>, Vec<f32>)> {
    let mut out = Vec::new();
    for i in 0.. {
        let (Some(ids), Some(logits)) = (
            expected.get(&format!("input_ids_{i}")),
            expected.get(&format!("logits_{i}")),
        ) else {
            break;
        };
        out.push((ids.ids(), logits.f32()));
    }
    assert!(!out.is_empty(), "fixture has no input_ids_0");
    out
}

/// The sequence lengths of a packed row: boundaries are where the positions restart at 0.
fn packed_lengths(positions: &[u32]) -> Vec<usize> {
    let mut lengths: Vec<usize> = Vec::new();
    for &p in positions {
        if p == 0 {
            lengths.push(0);
        }
        *lengths.last_mut().unwrap() += 1;
    }
    lengths
}

fn ids_tensor(rows: &[Vec<u32>], cols: usize, device: &Device) -> Tensor<2, Int> {
    let mut flat = Vec::with_capacity(rows.len() * cols);
    for r in rows {
        flat.extend(r.iter().map(|&t| t as i64));
        flat.extend(std::iter::repeat_n(0i64, cols - r.len()));
    }
    Tensor::from_data(TensorData::new(flat, [rows.len(), cols]), device)
}

fn to_vec(t: Tensor<3>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

fn check(case: &str, what: &str, ours: &[f32], reference: &[f32]) {
    let rel = max_rel_diff(ours, reference);
    assert!(
        rel <= TOL,
        "{case}: {what}: max|Δ|/max|ref| = {rel:e} > {TOL:e}"
    );
}

#[test]
fn logits_match_transformers_for_every_sequence() {
    for case in cases() {
        let device = case.model.device();
        for (i, (ids, logits)) in sequences(&case.expected).iter().enumerate() {
            let out = case
                .model
                .forward(
                    ids_tensor(std::slice::from_ref(ids), ids.len(), &device),
                    &Layout::Padded {
                        lengths: vec![ids.len()],
                    },
                )
                .unwrap();
            check(&case.name, &format!("logits_{i}"), &to_vec(out), logits);
        }
    }
}

#[test]
fn packed_row_matches_packed_logits() {
    for case in cases() {
        let device = case.model.device();
        let ids = case.expected["packed_input_ids"].ids();
        let positions = case.expected["packed_position_ids"].ids();
        let lengths = packed_lengths(&positions);
        assert!(
            lengths.len() > 1,
            "{}: packed fixture holds one sequence",
            case.name
        );
        let layout = Layout::packed_single_row(lengths.clone());
        assert_eq!(
            layout.positions(1, ids.len()),
            positions.iter().map(|&p| p as usize).collect::<Vec<_>>()
        );
        let out = case
            .model
            .forward(
                ids_tensor(std::slice::from_ref(&ids), ids.len(), &device),
                &layout,
            )
            .unwrap();
        check(
            &case.name,
            "packed_logits",
            &to_vec(out),
            &case.expected["packed_logits"].f32(),
        );

        // The same sequences split over two rows, with a padded tail, give the same logits.
        let split = lengths.len() / 2;
        let (first, second): (Vec<usize>, Vec<usize>) =
            (lengths[..split].to_vec(), lengths[split..].to_vec());
        let n_first: usize = first.iter().sum();
        let cols = n_first.max(ids.len() - n_first) + 3;
        let rows = vec![ids[..n_first].to_vec(), ids[n_first..].to_vec()];
        let out = case
            .model
            .forward(
                ids_tensor(&rows, cols, &device),
                &Layout::Packed {
                    rows: vec![first, second],
                },
            )
            .unwrap();
        let vocab = case.model.vocab_size();
        let out = to_vec(out);
        let mut real = out[..n_first * vocab].to_vec();
        real.extend_from_slice(&out[cols * vocab..(cols + ids.len() - n_first) * vocab]);
        check(
            &case.name,
            "packed logits over two rows",
            &real,
            &case.expected["packed_logits"].f32(),
        );
    }
}

/// The packed fixture row on the device `GRAIL_TEST_DEVICE` names (a GPU, or lavapipe with
/// `vulkan:cpu`): the CubeCL kernels against transformers' logits. On lavapipe only checkpoints
/// the fused path runs (f32) are checked: the plain path needs burn's matmul, which lavapipe's
/// shader compiler cannot build.
#[test]
fn packed_logits_match_transformers_on_the_kernel_device() {
    let Some(name) = kernel_test_device("kernel-device parity") else {
        return;
    };
    let device = grail_core::device::parse_device(&name)
        .unwrap_or_else(|e| panic!("GRAIL_TEST_DEVICE={name}: {e}"));
    let mut checked = 0;
    for dir in model_dirs() {
        let model = load_model(&dir, &device).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let case = dir.file_name().unwrap().to_string_lossy().into_owned();
        if name == "vulkan:cpu" && !model.uses_fused_ops() {
            eprintln!("kernel-device parity: {case} runs the plain path; not run on lavapipe");
            continue;
        }
        let expected = read_tensors(&dir.join("expected.safetensors")).unwrap();
        let ids = expected["packed_input_ids"].ids();
        let positions = expected["packed_position_ids"].ids();
        let lengths = packed_lengths(&positions);
        let out = model
            .forward(
                ids_tensor(std::slice::from_ref(&ids), ids.len(), &device),
                &Layout::packed_single_row(lengths),
            )
            .unwrap();
        check(
            &case,
            &format!("packed_logits on {name}"),
            &to_vec(out),
            &expected["packed_logits"].f32(),
        );
        checked += 1;
    }
    assert!(checked > 0, "no fixture checkpoint could run on {name}");
}

#[test]
fn padded_batch_matches_per_sequence_logits() {
    for case in cases() {
        let device = case.model.device();
        let seqs = sequences(&case.expected);
        let rows: Vec<Vec<u32>> = seqs.iter().map(|(ids, _)| ids.clone()).collect();
        let cols = rows.iter().map(Vec::len).max().unwrap();
        let lengths: Vec<usize> = rows.iter().map(Vec::len).collect();
        let out = to_vec(
            case.model
                .forward(
                    ids_tensor(&rows, cols, &device),
                    &Layout::Padded { lengths },
                )
                .unwrap(),
        );
        let vocab = case.model.vocab_size();
        for (b, (ids, logits)) in seqs.iter().enumerate() {
            let real = &out[b * cols * vocab..(b * cols + ids.len()) * vocab];
            check(&case.name, &format!("padded row {b}"), real, logits);
        }
    }
}

#[test]
fn batched_cached_prefill_and_decode_match_full_forward() {
    for case in cases() {
        let seqs = sequences(&case.expected);
        let vocab = case.model.vocab_size();
        let layers = case.model.config.num_hidden_layers;
        // Prefill every prompt but its last token together, then feed the last tokens together:
        // prompts of different lengths share one call, each with its own cache.
        let mut caches: Vec<KvCache> = seqs.iter().map(|_| KvCache::new(layers)).collect();
        let heads: Vec<&[u32]> = seqs.iter().map(|(ids, _)| &ids[..ids.len() - 1]).collect();
        let prefill = case.model.forward_cached(&heads, &mut caches).unwrap();
        let tails: Vec<&[u32]> = seqs.iter().map(|(ids, _)| &ids[ids.len() - 1..]).collect();
        let step = case.model.forward_cached(&tails, &mut caches).unwrap();
        let prefill = prefill.into_data().try_to_vec::<f32>().unwrap();
        let step = step.into_data().try_to_vec::<f32>().unwrap();
        for (i, (ids, logits)) in seqs.iter().enumerate() {
            let n = ids.len();
            assert_eq!(caches[i].len(), n);
            check(
                &case.name,
                &format!("prefill last logits {i}"),
                &prefill[i * vocab..(i + 1) * vocab],
                &logits[(n - 2) * vocab..(n - 1) * vocab],
            );
            check(
                &case.name,
                &format!("decode step logits {i}"),
                &step[i * vocab..(i + 1) * vocab],
                &logits[(n - 1) * vocab..n * vocab],
            );
        }
    }
}

#[test]
fn greedy_generation_matches_transformers_with_and_without_cache() {
    for case in cases() {
        let prompt = case.expected["greedy_prompt"].ids();
        let want = case.expected["greedy_tokens"].ids();
        let cached = greedy(&case.model, &prompt, want.len(), true).unwrap();
        assert_eq!(cached, want, "{}: greedy tokens with KV cache", case.name);
        let uncached = greedy(&case.model, &prompt, want.len(), false).unwrap();
        assert_eq!(
            uncached, cached,
            "{}: greedy without cache differs from with cache",
            case.name
        );
    }
}

#[test]
fn fixtures_root_has_the_documented_models() {
    // Guards against a silently empty discovery.
    let dirs = model_dirs();
    assert!(
        dirs.iter()
            .all(|d| Path::new(d).join("config.json").is_file())
    );
}

#[test]
fn greedy_beyond_the_models_context_is_an_error() {
    for case in cases() {
        let max = case.model.config.max_position_embeddings;
        let err = greedy(&case.model, &vec![1; max - 2], 3, true).unwrap_err();
        assert!(
            err.to_string().contains("max_position_embeddings"),
            "{}: {err}",
            case.name
        );
    }
}
