//! Hugging Face checkpoint directories: `config.json` plus `model.safetensors` or a sharded
//! `model.safetensors.index.json`, in f32, bf16 or f16 (computed in f32).
//!
//! Loading checks every tensor by name and shape and reports anything missing, unexpected or
//! mis-shaped; a truncated or corrupt file is an error, never a panic. Saving writes the same
//! names and shapes (and `config.json`) so that transformers' `from_pretrained` loads the result.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::atomic;
use crate::error::{GrailError, Result};
use crate::model::{CausalLm, ModelConfig, TensorId, WeightSource};

/// File name of an unsharded checkpoint.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// File name of a sharded checkpoint's index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// File name of the model configuration.
pub const CONFIG_FILE: &str = "config.json";

/// The on-disk dtype of a checkpoint's floating-point tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDtype {
    /// 32-bit IEEE float.
    F32,
    /// bfloat16.
    BF16,
    /// IEEE half.
    F16,
}

impl StorageDtype {
    /// The name `config.json` uses (`"float32"`, `"bfloat16"`, `"float16"`).
    pub fn hf_name(self) -> &'static str {
        match self {
            StorageDtype::F32 => "float32",
            StorageDtype::BF16 => "bfloat16",
            StorageDtype::F16 => "float16",
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            StorageDtype::F32 => Dtype::F32,
            StorageDtype::BF16 => Dtype::BF16,
            StorageDtype::F16 => Dtype::F16,
        }
    }

    /// Encodes f32 values (little-endian) at this dtype, rounding to nearest even.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            StorageDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            StorageDtype::BF16 => values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
            StorageDtype::F16 => values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
        }
    }
}

/// Where one tensor lives: which file, its dtype and shape, and its byte range in that file.
#[derive(Debug, Clone)]
struct TensorEntry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// An opened checkpoint directory: the config and an index of every tensor in its files.
#[derive(Debug)]
pub struct Checkpoint {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// The parsed and validated `config.json`.
    pub config: ModelConfig,
    /// The dtype most of its floating-point tensors are stored in.
    pub dtype: StorageDtype,
    files: Vec<(PathBuf, Vec<u8>)>,
    tensors: BTreeMap<String, TensorEntry>,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| GrailError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| GrailError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

impl Checkpoint {
    /// Opens `dir`: reads `config.json`, the index if sharded, and every safetensors header.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(GrailError::io(
                &dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "not a checkpoint directory"),
            ));
        }
        let config = ModelConfig::from_file(&dir.join(CONFIG_FILE))?;
        let index_path = dir.join(INDEX_FILE);
        let (file_names, weight_map) = if index_path.is_file() {
            let index = read_json(&index_path)?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| GrailError::Json {
                    path: index_path.clone(),
                    message: "no `weight_map` object".into(),
                })?;
            let mut weight_map = HashMap::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| GrailError::Json {
                    path: index_path.clone(),
                    message: format!("weight_map[{name:?}] is not a file name"),
                })?;
                weight_map.insert(name.clone(), file.to_string());
            }
            let mut files: Vec<String> = weight_map.values().cloned().collect();
            files.sort();
            files.dedup();
            (files, Some(weight_map))
        } else if dir.join(WEIGHTS_FILE).is_file() {
            (vec![WEIGHTS_FILE.to_string()], None)
        } else {
            return Err(GrailError::io(
                &dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("neither {WEIGHTS_FILE} nor {INDEX_FILE} found"),
                ),
            ));
        };

        let mut files = Vec::with_capacity(file_names.len());
        let mut tensors = BTreeMap::new();
        let mut dtype_counts: Vec<(Dtype, usize)> = Vec::new();
        for (file_idx, name) in file_names.iter().enumerate() {
            let path = dir.join(name);
            let bytes = std::fs::read(&path).map_err(|e| GrailError::io(&path, e))?;
            let st = SafeTensors::deserialize(&bytes).map_err(|e| GrailError::Safetensors {
                path: path.clone(),
                message: format!("not a valid safetensors file ({e})"),
            })?;
            let base = bytes.as_ptr() as usize;
            for (tname, view) in st.iter() {
                if let Some(map) = &weight_map
                    && map.get(tname).map(String::as_str) != Some(name.as_str())
                {
                    return Err(GrailError::Safetensors {
                        path: path.clone(),
                        message: format!(
                            "tensor `{tname}` is not assigned to this shard by {INDEX_FILE}"
                        ),
                    });
                }
                let start = view.data().as_ptr() as usize - base;
                match dtype_counts.iter_mut().find(|(d, _)| *d == view.dtype()) {
                    Some((_, n)) => *n += 1,
                    None => dtype_counts.push((view.dtype(), 1)),
                }
                let entry = TensorEntry {
                    file: file_idx,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    start,
                    end: start + view.data().len(),
                };
                if tensors.insert(tname.to_string(), entry).is_some() {
                    return Err(GrailError::Safetensors {
                        path: path.clone(),
                        message: format!("tensor `{tname}` appears in more than one file"),
                    });
                }
            }
            files.push((path, bytes));
        }
        if let Some(map) = &weight_map
            && let Some((name, file)) = map.iter().find(|(n, _)| !tensors.contains_key(*n))
        {
            return Err(GrailError::MissingTensor {
                path: dir.join(file),
                name: name.clone(),
                expected: Vec::new(),
            });
        }
        let dtype = [Dtype::BF16, Dtype::F16, Dtype::F32]
            .into_iter()
            .max_by_key(|d| {
                dtype_counts
                    .iter()
                    .find(|(x, _)| x == d)
                    .map_or(0, |(_, n)| *n)
            })
            .map(|d| match d {
                Dtype::BF16 => StorageDtype::BF16,
                Dtype::F16 => StorageDtype::F16,
                _ => StorageDtype::F32,
            })
            .unwrap_or(StorageDtype::F32);
        Ok(Self {
            dir,
            config,
            dtype,
            files,
            tensors,
        })
    }

    /// Names of every tensor in the checkpoint, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Builds the model on `device`, checking that the checkpoint holds exactly the tensors the
    /// config implies, each with the right shape.
    pub fn load(&self, device: &Device) -> Result<CausalLm> {
        let mut source = CheckpointSource {
            checkpoint: self,
            taken: Vec::new(),
            device: device.clone(),
        };
        CausalLm::build(&self.config, &mut source)
    }
}

/// Opens `dir` and loads its model on `device` (the common one-liner).
pub fn load_model(dir: impl AsRef<Path>, device: &Device) -> Result<CausalLm> {
    Checkpoint::open(dir)?.load(device)
}

struct CheckpointSource<'a> {
    checkpoint: &'a Checkpoint,
    taken: Vec<String>,
    device: Device,
}

impl WeightSource for CheckpointSource<'_> {
    fn take(&mut self, id: TensorId, shape: &[usize]) -> Result<Vec<f32>> {
        let name = id.name();
        let name = name.as_str();
        let ck = self.checkpoint;
        let entry = ck
            .tensors
            .get(name)
            .ok_or_else(|| GrailError::MissingTensor {
                path: ck.dir.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
            })?;
        let (path, bytes) = &ck.files[entry.file];
        if entry.shape != shape {
            return Err(GrailError::ShapeMismatch {
                path: path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        let raw = &bytes[entry.start..entry.end];
        self.taken.push(name.to_string());
        let values = decode_f32(raw, entry.dtype).ok_or_else(|| GrailError::Safetensors {
            path: path.clone(),
            message: format!(
                "tensor `{name}` has dtype {:?}; grail reads F32, BF16, F16 and F64",
                entry.dtype
            ),
        })?;
        // A NaN or infinity in the weights poisons every forward; say where it is at load time.
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(GrailError::Safetensors {
                path: path.clone(),
                message: format!(
                    "tensor `{name}` holds a non-finite value ({} at flat index {i}; {} of {} \
                     values are not finite)",
                    values[i],
                    values.iter().filter(|v| !v.is_finite()).count(),
                    values.len()
                ),
            });
        }
        Ok(values)
    }

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn finish(&mut self) -> Result<()> {
        let mut extra: Vec<String> = self
            .checkpoint
            .tensors
            .keys()
            .filter(|n| !self.taken.contains(n))
            .cloned()
            .collect();
        extra.sort();
        if extra.is_empty() {
            Ok(())
        } else {
            Err(GrailError::UnexpectedTensors {
                path: self.checkpoint.dir.clone(),
                names: extra,
            })
        }
    }
}

/// Little-endian bytes of a floating-point dtype as f32 (`None` for other dtypes).
fn decode_f32(raw: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => raw
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => raw
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => raw
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        _ => return None,
    })
}

/// The f32 values of a tensor's data, whatever float dtype the backend holds it in.
fn data_f32(data: TensorData) -> Vec<f32> {
    let data = if data.dtype() == DType::F32 {
        data
    } else {
        data.convert::<f32>()
    };
    data.try_into_vec::<f32>().expect("f32 data")
}

/// Writes `model` to `dir` in Hugging Face layout: `model.safetensors` (tensors at `dtype`,
/// same names and shapes as transformers writes them) and `config.json`.
/// Creates `dir` if needed; overwrites existing files.
pub fn save_model(model: &CausalLm, dir: impl AsRef<Path>, dtype: StorageDtype) -> Result<()> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| GrailError::io(dir, e))?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    model.for_each_tensor(|name, data| {
        let shape = data.shape().to_vec();
        tensors.push((name, shape, dtype.encode(&data_f32(data))));
    });
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(dtype.safetensors(), shape.clone(), bytes)
                .map(|v| (name.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| GrailError::Safetensors {
            path: dir.join(WEIGHTS_FILE),
            message: e.to_string(),
        })?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let path = dir.join(WEIGHTS_FILE);
    // Each file is written atomically: an interrupted save never leaves a torn file. (A whole
    // checkpoint is made consistent by writing its directory with `atomic::write_dir`.)
    atomic::write_file_with(&path, |tmp| {
        safetensors::serialize_to_file(views, Some(metadata), tmp).map_err(|e| {
            GrailError::Safetensors {
                path: tmp.to_path_buf(),
                message: e.to_string(),
            }
        })
    })?;
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        // A stale index would make loaders look for shards we did not write.
        std::fs::remove_file(&index).map_err(|e| GrailError::io(&index, e))?;
    }
    let config = serde_json::to_string_pretty(&model.config.to_hf_json(dtype.hf_name()))
        .expect("JSON value");
    atomic::write_file(&dir.join(CONFIG_FILE), (config + "\n").as_bytes())
}
