//! Checkpoint loading and saving: round trips are bit-identical, bad inputs are clear errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use grail_core::GrailError;
use grail_core::checkpoint::{Checkpoint, StorageDtype, load_model, save_model};
use grail_core::model::{CausalLm, ModelConfig, RopeScaling};
use grail_testkit::model_dirs;

fn tensors_of(model: &CausalLm) -> HashMap<String, (Vec<usize>, Vec<u8>)> {
    let mut out = HashMap::new();
    model.for_each_tensor(|name, data| {
        out.insert(name, (data.shape().to_vec(), data.as_bytes().to_vec()));
    });
    out
}

/// Raw (dtype, shape, bytes) of every tensor in a checkpoint's safetensors files.
fn raw_tensors(dir: &Path) -> HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors")
            && !path.ends_with("expected.safetensors")
        {
            let bytes = std::fs::read(&path).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in st.iter() {
                out.insert(
                    name.to_string(),
                    (view.dtype(), view.shape().to_vec(), view.data().to_vec()),
                );
            }
        }
    }
    out
}

#[test]
fn load_save_load_is_bit_identical_for_every_fixture() {
    let device = Device::flex();
    for dir in model_dirs() {
        let checkpoint = Checkpoint::open(&dir).unwrap();
        let model = checkpoint.load(&device).unwrap();
        let out = tempfile::tempdir().unwrap();
        // Saved at the checkpoint's own dtype (bf16 stays bf16), the file holds the same tensors,
        // names, shapes and bytes as the one transformers wrote.
        save_model(&model, out.path(), checkpoint.dtype).unwrap();
        assert_eq!(
            raw_tensors(out.path()),
            raw_tensors(&dir),
            "{}: saved tensors differ",
            dir.display()
        );
        let reloaded = load_model(out.path(), &device).unwrap();
        assert_eq!(
            tensors_of(&reloaded),
            tensors_of(&model),
            "{}",
            dir.display()
        );
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["dtype"], checkpoint.dtype.hf_name());
        // Every field grail interprets (family, head_dim, RoPE scaling, ...) survives.
        let mut reread = ModelConfig::from_hf_json(config).unwrap();
        reread.source = model.config.source.clone();
        assert_eq!(reread, model.config, "{}", dir.display());
    }
}

#[test]
fn bf16_fixture_is_detected_and_f32_save_is_lossless() {
    let device = Device::flex();
    let bf16_dir = model_dirs()
        .into_iter()
        .find(|d| Checkpoint::open(d).unwrap().dtype == StorageDtype::BF16);
    let Some(dir) = bf16_dir else {
        return; // another fixtures root may hold no bf16 checkpoint
    };
    let model = load_model(&dir, &device).unwrap();
    let out = tempfile::tempdir().unwrap();
    save_model(&model, out.path(), StorageDtype::F32).unwrap();
    let reloaded = load_model(out.path(), &device).unwrap();
    assert_eq!(tensors_of(&reloaded), tensors_of(&model));
}

/// A fresh copy of the first fixture that a test may damage.
fn scratch_copy() -> (tempfile::TempDir, PathBuf) {
    let device = Device::flex();
    let src = &model_dirs()[0];
    let model = load_model(src, &device).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    save_model(&model, &dir, StorageDtype::F32).unwrap();
    (tmp, dir)
}

/// Rewrites `model.safetensors` after applying `edit` to its (name → (shape, f32 bytes)) map.
fn rewrite(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = raw_tensors(dir)
        .into_iter()
        .map(|(n, (_, s, b))| (n, s, b))
        .collect();
    tensors.sort();
    edit(&mut tensors);
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

fn load_err(dir: &Path) -> GrailError {
    load_model(dir, &Device::flex()).expect_err("loading should fail")
}

#[test]
fn missing_tensor_is_named() {
    let (_tmp, dir) = scratch_copy();
    rewrite(&dir, |t| {
        t.retain(|(n, _, _)| n != "model.layers.0.mlp.up_proj.weight")
    });
    let err = load_err(&dir);
    assert!(matches!(err, GrailError::MissingTensor { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("model.layers.0.mlp.up_proj.weight"),
        "{err}"
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let (_tmp, dir) = scratch_copy();
    rewrite(&dir, |t| {
        t.push(("model.layers.0.extra.weight".into(), vec![2], vec![0; 8]))
    });
    let err = load_err(&dir);
    assert!(
        err.to_string().contains("model.layers.0.extra.weight"),
        "{err}"
    );
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() {
    let (_tmp, dir) = scratch_copy();
    let mut expected = Vec::new();
    rewrite(&dir, |t| {
        let entry = t
            .iter_mut()
            .find(|(n, _, _)| n == "model.norm.weight")
            .unwrap();
        expected = entry.1.clone();
        entry.1 = vec![entry.1[0] / 2, 2];
    });
    let err = load_err(&dir);
    let msg = err.to_string();
    assert!(matches!(err, GrailError::ShapeMismatch { .. }), "{msg}");
    assert!(msg.contains("model.norm.weight"), "{msg}");
    assert!(msg.contains(&format!("{:?}", expected)), "{msg}");
    assert!(
        msg.contains(&format!("{:?}", [expected[0] / 2, 2])),
        "{msg}"
    );
}

#[test]
fn truncated_and_corrupt_files_are_errors_not_panics() {
    let (_tmp, dir) = scratch_copy();
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = load_err(&dir);
    assert!(matches!(err, GrailError::Safetensors { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    assert!(matches!(load_err(&dir), GrailError::Safetensors { .. }));
    std::fs::write(&path, b"").unwrap();
    assert!(matches!(load_err(&dir), GrailError::Safetensors { .. }));
}

#[test]
fn missing_directory_and_files_are_clear() {
    let err = load_err(Path::new("/nonexistent/grail-model"));
    assert!(
        err.to_string().contains("/nonexistent/grail-model"),
        "{err}"
    );
    let (_tmp, dir) = scratch_copy();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = load_err(&dir);
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn sharded_index_pointing_at_a_missing_shard_is_an_error() {
    let (_tmp, dir) = scratch_copy();
    let index = serde_json::json!({"metadata": {}, "weight_map": {"model.norm.weight": "model-00009-of-00009.safetensors"}});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let err = load_err(&dir);
    assert!(
        err.to_string().contains("model-00009-of-00009.safetensors"),
        "{err}"
    );
}

#[test]
fn unsupported_configs_name_the_field_and_value() {
    let base: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model_dirs()[0].join("config.json")).unwrap(),
    )
    .unwrap();
    // heads + 1 never divides heads, whatever the fixture.
    let bad_kv = base["num_attention_heads"].as_u64().unwrap() + 1;
    let bad_kv_shown = bad_kv.to_string();
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("model_type", serde_json::json!("mistral"), "mistral"),
        ("hidden_act", serde_json::json!("gelu"), "gelu"),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            "yarn",
        ),
        ("use_sliding_window", serde_json::json!(true), "true"),
        (
            "num_key_value_heads",
            serde_json::json!(bad_kv),
            &bad_kv_shown,
        ),
        ("hidden_size", serde_json::json!(-1), "-1"),
        ("mlp_bias", serde_json::json!(true), "true"),
        ("partial_rotary_factor", serde_json::json!(0.5), "0.5"),
    ];
    for (field, value, shown) in cases {
        let mut cfg = base.clone();
        cfg[field] = value;
        let err = ModelConfig::from_hf_json(cfg).expect_err(field);
        let msg = err.to_string();
        assert!(msg.contains(field) && msg.contains(shown), "{field}: {msg}");
    }
    let rope_cases = [
        (
            serde_json::json!({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
            ["rope_parameters.rope_type", "dynamic"],
        ),
        (
            serde_json::json!({"rope_type": "llama3", "rope_theta": 1e4, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
            ["rope_parameters.factor", "required"],
        ),
        (
            serde_json::json!({"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0,
                "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                "original_max_position_embeddings": 64}),
            ["rope_parameters.high_freq_factor", "low_freq_factor"],
        ),
        (serde_json::json!(5), ["rope_parameters", "object"]),
        (
            serde_json::json!({"rope_type": "default", "rope_theta": 1e4,
                "partial_rotary_factor": 0.25}),
            ["rope_parameters.partial_rotary_factor", "0.25"],
        ),
    ];
    for (params, words) in rope_cases {
        let mut cfg = base.clone();
        cfg["rope_parameters"] = params;
        let msg = ModelConfig::from_hf_json(cfg).unwrap_err().to_string();
        assert!(words.iter().all(|w| msg.contains(w)), "{msg}");
    }
    let mut cfg = base;
    cfg.as_object_mut().unwrap().remove("vocab_size");
    let msg = ModelConfig::from_hf_json(cfg).unwrap_err().to_string();
    assert!(msg.contains("vocab_size"), "{msg}");
}

#[test]
fn rope_theta_is_read_from_top_level_or_rope_parameters() {
    let base: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model_dirs()[0].join("config.json")).unwrap(),
    )
    .unwrap();
    let mut top = base.clone();
    top.as_object_mut().unwrap().remove("rope_parameters");
    top["rope_theta"] = serde_json::json!(12345.0);
    assert_eq!(ModelConfig::from_hf_json(top).unwrap().rope_theta, 12345.0);
    let mut nested = base;
    nested.as_object_mut().unwrap().remove("rope_theta");
    nested["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 777.0});
    assert_eq!(ModelConfig::from_hf_json(nested).unwrap().rope_theta, 777.0);
}

#[test]
fn llama3_scaling_is_read_from_either_style_and_written_back_in_it() {
    let base: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model_dirs()[0].join("config.json")).unwrap(),
    )
    .unwrap();
    let expected = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64,
    };
    let params = serde_json::json!({"factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
    // transformers 5: one `rope_parameters` object holding the theta too.
    let mut v5 = base.clone();
    v5.as_object_mut().unwrap().remove("rope_theta");
    v5["rope_parameters"] = params.clone();
    v5["rope_parameters"]["rope_type"] = "llama3".into();
    v5["rope_parameters"]["rope_theta"] = 5e5.into();
    // transformers 4 (Llama 3.x checkpoints on the Hub): top-level theta, `rope_scaling`.
    let mut v4 = base.clone();
    v4.as_object_mut().unwrap().remove("rope_parameters");
    v4["rope_theta"] = 5e5.into();
    v4["rope_scaling"] = params;
    v4["rope_scaling"]["type"] = "llama3".into();
    for (style, cfg) in [("rope_parameters", v5), ("rope_scaling", v4)] {
        let read = ModelConfig::from_hf_json(cfg).unwrap();
        assert_eq!(
            (read.rope_theta, read.rope_scaling),
            (5e5, expected),
            "{style}"
        );
        let written = read.to_hf_json("float32");
        assert_eq!(written[style]["rope_type"], "llama3", "{style}: {written}");
        let again = ModelConfig::from_hf_json(written).unwrap();
        assert_eq!(
            (again.rope_theta, again.rope_scaling),
            (5e5, expected),
            "{style}"
        );
    }

    // Both present and disagreeing: an error rather than a guess.
    let mut both = base;
    both["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
    if both.get("rope_parameters").is_none() {
        both["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 1e4});
    }
    let msg = ModelConfig::from_hf_json(both).unwrap_err().to_string();
    assert!(
        msg.contains("rope_scaling") && msg.contains("disagrees"),
        "{msg}"
    );
}

#[test]
fn non_finite_weights_are_an_error_naming_the_tensor() {
    let dir = model_dirs()
        .into_iter()
        .find(|d| d.join("model.safetensors").is_file())
        .expect("a single-file fixture");
    let out = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(dir.join(f), out.path().join(f)).unwrap();
    }
    let path = out.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let name = "model.norm.weight";
    // The tensor's byte offset in the file, and its element width.
    let (offset, width) = {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let view = st.tensor(name).unwrap();
        let width = view.data().len() / view.shape().iter().product::<usize>();
        (
            view.data().as_ptr() as usize - bytes.as_ptr() as usize,
            width,
        )
    };
    let nan: Vec<u8> = match width {
        4 => f32::NAN.to_le_bytes().to_vec(),
        2 => half::bf16::NAN.to_le_bytes().to_vec(),
        w => panic!("unexpected element width {w}"),
    };
    bytes[offset + width..offset + 2 * width].copy_from_slice(&nan);
    std::fs::write(&path, bytes).unwrap();
    let err = load_model(out.path(), &Device::flex())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(name) && err.contains("non-finite") && err.contains("index 1"),
        "{err}"
    );
}

#[cfg(unix)]
#[test]
fn saved_files_get_the_mode_the_umask_gives() {
    use std::os::unix::fs::PermissionsExt;
    let out = tempfile::tempdir().unwrap();
    let model = CausalLm::init(
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
    );
    save_model(&model, out.path(), StorageDtype::F32).unwrap();
    let probe = out.path().join("probe");
    std::fs::write(&probe, b"").unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode();
    for f in ["model.safetensors", "config.json"] {
        assert_eq!(
            mode(&out.path().join(f)),
            mode(&probe),
            "{f} (safetensors writes through a private 0600 temporary)"
        );
    }
}
