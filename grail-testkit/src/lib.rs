//! Test helpers shared by grail's crates (not published): finding and reading the reference
//! fixtures (`../shared/fixtures` or `$GRAIL_FIXTURES`) that parity tests in every crate check
//! against, the real SmolLM2 model, and the device the kernel tests run on. Tests discover every
//! case they find, so a run on another fixtures root with other shapes must pass too.
#![warn(missing_docs)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Distribution, Tensor};
use safetensors::{Dtype, SafeTensors};

/// A fixture that cannot be read: what and why.
pub type Result<T> = std::result::Result<T, String>;

/// Environment variable naming the fixtures root.
pub const FIXTURES_ENV: &str = "GRAIL_FIXTURES";

/// Environment variable naming the device the kernel tests run on (`cpu`, `vulkan:cpu` for
/// Mesa's lavapipe, `vulkan[:N]`, `cuda[:N]`); unset means `cpu`.
pub const TEST_DEVICE_ENV: &str = "GRAIL_TEST_DEVICE";

/// The device `$GRAIL_TEST_DEVICE` names (for `grail_kernels::parse_device`) when it is not
/// the CPU (Flex): the tests of the CubeCL paths run there. Otherwise `None`, after printing that
/// `test` is not run.
pub fn kernel_test_device(test: &str) -> Option<String> {
    let name = std::env::var(TEST_DEVICE_ENV).unwrap_or_default();
    if name.is_empty() || name == "cpu" {
        eprintln!("{test}: {TEST_DEVICE_ENV} names no CubeCL device; not run");
        return None;
    }
    Some(name)
}

/// The fixtures root: `$GRAIL_FIXTURES` if set, else `../shared/fixtures` from the workspace
/// root (found from this crate's manifest directory).
pub fn fixtures_root() -> PathBuf {
    match std::env::var_os(FIXTURES_ENV) {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"),
    }
}

/// Every model folder under `<root>/models` and `<root>/models-next` (the newer architectures,
/// walked the same way), `models/` first, each sorted. Panics if `models/` is unreadable or
/// there is no model at all, so a test cannot pass by finding nothing.
pub fn model_dirs() -> Vec<PathBuf> {
    let root = fixtures_root();
    let mut dirs = Vec::new();
    for (folder, required) in [("models", true), ("models-next", false)] {
        let path = root.join(folder);
        let entries = match std::fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(_) if !required && !path.exists() => continue,
            Err(e) => panic!(
                "cannot read fixtures at {}: {e} (set {FIXTURES_ENV})",
                path.display()
            ),
        };
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        found.sort();
        dirs.extend(found);
    }
    assert!(
        !dirs.is_empty(),
        "no model fixtures under {}",
        root.join("models").display()
    );
    dirs
}

/// Environment variable naming the SmolLM2-135M-Instruct directory built by
/// `../shared/models/smollm2.sh` (a real bf16 checkpoint with its tokenizer and `expected.json`).
pub const SMOLLM2_ENV: &str = "GRAIL_SMOLLM2";

/// The SmolLM2-135M-Instruct directory: `$GRAIL_SMOLLM2` if set, else
/// `.models/smollm2-135m-instruct` in the workspace (where `.ci/run` builds it). `None`, after
/// printing why `test` is skipped, when that directory holds no `model.safetensors`.
pub fn smollm2_dir(test: &str) -> Option<PathBuf> {
    let dir = match std::env::var_os(SMOLLM2_ENV) {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.models/smollm2-135m-instruct"),
    };
    if dir.join("model.safetensors").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "{test}: skipped: no SmolLM2 model at {} (build it with \
             `../shared/models/smollm2.sh {}` or set {SMOLLM2_ENV})",
            dir.display(),
            dir.display()
        );
        None
    }
}

/// Environment variable naming the directory of the real Qwen3 tokenizer (`tokenizer.json` and
/// `tokenizer_config.json`) fetched by `scripts/qwen3-tokenizer.sh`.
pub const QWEN3_TOKENIZER_ENV: &str = "GRAIL_QWEN3_TOKENIZER";

/// The Qwen3 tokenizer directory: `$GRAIL_QWEN3_TOKENIZER` if set, else
/// `.models/qwen3-tokenizer` in the workspace (where `.ci/run` fetches it). `None`, after
/// printing why `test` is skipped, when that directory holds no `tokenizer.json`.
pub fn qwen3_tokenizer_dir(test: &str) -> Option<PathBuf> {
    let dir = match std::env::var_os(QWEN3_TOKENIZER_ENV) {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.models/qwen3-tokenizer"),
    };
    if dir.join("tokenizer.json").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "{test}: skipped: no Qwen3 tokenizer at {} (fetch it with \
             `scripts/qwen3-tokenizer.sh {}`, which needs npm, or set {QWEN3_TOKENIZER_ENV})",
            dir.display(),
            dir.display()
        );
        None
    }
}

/// A fixture tensor: its shape and its values widened to f64 (integers included).
#[derive(Debug, Clone)]
pub struct FixtureTensor {
    /// Shape as stored.
    pub shape: Vec<usize>,
    /// Values in row-major order.
    pub values: Vec<f64>,
}

impl FixtureTensor {
    /// Values as f32.
    pub fn f32(&self) -> Vec<f32> {
        self.values.iter().map(|&v| v as f32).collect()
    }

    /// Values as token ids.
    pub fn ids(&self) -> Vec<u32> {
        self.values.iter().map(|&v| v as u32).collect()
    }
}

/// Reads every tensor of a safetensors file (f64, f32, bf16, f16, i64, i32) as f64.
pub fn read_tensors(path: &Path) -> Result<HashMap<String, FixtureTensor>> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = HashMap::new();
    for (name, view) in st.iter() {
        let d = view.data();
        let values: Vec<f64> = match view.dtype() {
            Dtype::F64 => d
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64())
                .collect(),
            Dtype::F16 => d
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f64())
                .collect(),
            Dtype::I64 => d
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            Dtype::I32 => d
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            other => {
                return Err(format!(
                    "{}: fixture tensor `{name}` has unsupported dtype {other:?}",
                    path.display()
                ));
            }
        };
        out.insert(
            name.to_string(),
            FixtureTensor {
                shape: view.shape().to_vec(),
                values,
            },
        );
    }
    Ok(out)
}

/// `max |a − b| / max |b|`, the agreement measure of the model fixtures.
pub fn max_rel_diff(ours: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(ours.len(), reference.len(), "length mismatch");
    let max_ref = reference.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
    let max_diff = ours
        .iter()
        .zip(reference)
        .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    max_diff / max_ref.max(f64::MIN_POSITIVE)
}

/// A run TOML for a tiny job that trains in seconds: a 2-layer Qwen2 of hidden size 32 from
/// scratch, a 300-token BPE, 5 SFT steps, GRPO steps of 4 prompts × 4 completions of at most 8
/// tokens, writing to `output_dir`. `top` adds top-level keys, `grpo` and `eval` keys of those
/// tables (each may hold several lines).
pub fn tiny_job_toml(output_dir: &Path, top: &str, grpo: &str, eval: &str) -> String {
    format!(
        r#"output_dir = "{}"
{top}
[model]
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 2
num_key_value_heads = 1
intermediate_size = 64
[tokenizer]
vocab_size = 300
[sft]
steps = 5
batch_size = 16
[grpo]
prompts_per_step = 4
num_generations = 4
max_completion_length = 8
{grpo}
[eval]
{eval}
"#,
        output_dir.display()
    )
}

/// The reference device of the kernel tests: Flex under autodiff.
pub fn reference_device() -> Device {
    Device::flex().autodiff()
}

/// The device the kernels under test run on (`$GRAIL_TEST_DEVICE`, default `cpu`), under
/// autodiff. Panics naming the variable when the device cannot be brought up.
pub fn kernel_device() -> Device {
    let name = std::env::var(TEST_DEVICE_ENV).unwrap_or_else(|_| "cpu".into());
    grail_kernels::parse_device(&name)
        .unwrap_or_else(|e| panic!("{TEST_DEVICE_ENV}={name}: {e}"))
        .autodiff()
}

/// A copy of a reference tensor on the kernel device, tracked for gradients.
pub fn on_kernel<const D: usize>(t: &Tensor<D>) -> Tensor<D> {
    Tensor::from_data(t.to_data(), &kernel_device()).require_grad()
}

/// A copy on the kernel device without gradient tracking.
pub fn const_on_kernel<const D: usize>(t: &Tensor<D>) -> Tensor<D> {
    Tensor::from_data(t.to_data(), &kernel_device())
}

/// Standard-normal values on the reference device, from `seed`.
pub fn random<const D: usize>(shape: [usize; D], seed: u64) -> Tensor<D> {
    let device = reference_device();
    device.seed(seed);
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &device)
}

/// `‖a − b‖ / ‖b‖` over all elements (the two may live on different devices).
pub fn rel<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f64 {
    let a: Vec<f32> = a.into_data().convert::<f32>().try_to_vec().unwrap();
    let b: Vec<f32> = b.into_data().convert::<f32>().try_to_vec().unwrap();
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}
