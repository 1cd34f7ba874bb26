//! Model configuration read from (and written back to) a Hugging Face `config.json`.

use std::path::Path;

use serde_json::{Map, Value, json};

use super::TensorId;
use super::config_builder::ModelConfigBuilder;
use crate::error::{GrailError, Result};

/// The model families grail runs. Both are pre-norm decoder-only transformers with RMSNorm,
/// rotate-half RoPE, grouped-query attention and a SwiGLU MLP; they differ in their biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// `Qwen2ForCausalLM`: q/k/v projections always carry a bias, o_proj never does.
    Qwen2,
    /// `LlamaForCausalLM`: `attention_bias` puts a bias on q/k/v/o together.
    Llama,
}

impl ModelFamily {
    /// The `model_type` string of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            ModelFamily::Qwen2 => "qwen2",
            ModelFamily::Llama => "llama",
        }
    }

    /// The `architectures` entry transformers uses to load the checkpoint.
    pub fn architecture(self) -> &'static str {
        match self {
            ModelFamily::Qwen2 => "Qwen2ForCausalLM",
            ModelFamily::Llama => "LlamaForCausalLM",
        }
    }
}

/// Everything the model needs to know about its shape, as Hugging Face names it.
///
/// Built from `config.json` with [`ModelConfig::from_hf_json`] (which rejects what grail does not
/// implement, naming the field) or by hand with [`ModelConfig::builder`] for models trained from
/// scratch. [`ModelConfig::to_hf_json`] writes it back, keeping the keys we do not interpret.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Qwen2 or Llama.
    pub family: ModelFamily,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (equal to the query heads for MHA, 1 for MQA).
    pub num_key_value_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Vocabulary size (rows of the embedding and of the lm_head).
    pub vocab_size: usize,
    /// Longest sequence the model is configured for (size of the RoPE table).
    pub max_position_embeddings: usize,
    /// Whether the lm_head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Beginning-of-sequence token id, if the config names one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids, if the config names any.
    pub eos_token_ids: Vec<u32>,
    /// The parsed `config.json`, kept so that saving preserves keys grail does not interpret.
    pub source: Value,
}

fn get<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn opt_usize(obj: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    get(obj, key).map(|v| parse_usize(key, v)).transpose()
}

fn parse_usize(key: &str, v: &Value) -> Result<usize> {
    match v.as_u64() {
        Some(n) if n > 0 => Ok(n as usize),
        _ => Err(GrailError::config(key, v, "must be a positive integer")),
    }
}

fn opt_f64(obj: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
    match get(obj, key) {
        None => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x > 0.0 && x.is_finite() => Ok(Some(x)),
            _ => Err(GrailError::config(key, v, "must be a positive number")),
        },
    }
}

fn opt_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    match get(obj, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(GrailError::config(key, v, "must be true or false")),
    }
}

fn token_ids(obj: &Map<String, Value>, key: &str) -> Result<Vec<u32>> {
    let bad = |v: &Value| GrailError::config(key, v, "must be a token id or a list of token ids");
    match get(obj, key) {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_u64().map(|n| n as u32).ok_or_else(|| bad(v)))
            .collect(),
        Some(v) => v.as_u64().map(|n| vec![n as u32]).ok_or_else(|| bad(v)),
    }
}

impl ModelConfig {
    /// Reads and validates `config.json` from a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| GrailError::io(path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| GrailError::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_hf_json(value)
    }

    /// Validates a parsed `config.json`. Anything grail does not implement (another
    /// `model_type`, RoPE scaling, a sliding window, another activation, an MLP bias) is an error
    /// that names the field and its value.
    pub fn from_hf_json(value: Value) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| GrailError::config("<root>", &value, "config.json must be an object"))?;
        let family = match get(obj, "model_type").and_then(Value::as_str) {
            Some("qwen2") => ModelFamily::Qwen2,
            Some("llama") => ModelFamily::Llama,
            _ => {
                let v = get(obj, "model_type").cloned().unwrap_or(Value::Null);
                return Err(GrailError::config(
                    "model_type",
                    v,
                    "unsupported model type (grail supports \"qwen2\" and \"llama\")",
                ));
            }
        };
        let act = get(obj, "hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        if act != "silu" {
            return Err(GrailError::config(
                "hidden_act",
                format!("{act:?}"),
                "unsupported activation (only \"silu\", the SwiGLU MLP)",
            ));
        }
        if let Some(scaling) = get(obj, "rope_scaling") {
            let kind = scaling.get("rope_type").or_else(|| scaling.get("type"));
            if kind.and_then(Value::as_str) != Some("default") {
                return Err(GrailError::config(
                    "rope_scaling",
                    scaling,
                    "RoPE scaling is not supported",
                ));
            }
        }
        let rope_params = get(obj, "rope_parameters").and_then(Value::as_object);
        if let Some(params) = rope_params
            && let Some(kind) = get(params, "rope_type")
            && kind.as_str() != Some("default")
        {
            return Err(GrailError::config(
                "rope_parameters.rope_type",
                kind,
                "RoPE scaling is not supported (only \"default\")",
            ));
        }
        if opt_bool(obj, "use_sliding_window")? == Some(true) {
            return Err(GrailError::config(
                "use_sliding_window",
                true,
                "sliding-window attention is not supported",
            ));
        }
        if let Some(types) = get(obj, "layer_types").and_then(Value::as_array)
            && let Some(other) = types.iter().find(|t| t.as_str() != Some("full_attention"))
        {
            return Err(GrailError::config(
                "layer_types",
                other,
                "only \"full_attention\" layers are supported",
            ));
        }
        if opt_bool(obj, "mlp_bias")? == Some(true) {
            return Err(GrailError::config(
                "mlp_bias",
                true,
                "MLP biases are not supported",
            ));
        }

        let rope_theta = match rope_params {
            Some(params) => opt_f64(params, "rope_theta").map_err(|_| {
                GrailError::config(
                    "rope_parameters.rope_theta",
                    params.get("rope_theta").unwrap_or(&Value::Null),
                    "must be a positive number",
                )
            })?,
            None => None,
        };
        let defaults = ModelConfigBuilder::default();
        let mut config = ModelConfigBuilder {
            family,
            vocab_size: opt_usize(obj, "vocab_size")?,
            hidden_size: opt_usize(obj, "hidden_size")?,
            intermediate_size: opt_usize(obj, "intermediate_size")?,
            num_hidden_layers: opt_usize(obj, "num_hidden_layers")?,
            num_attention_heads: opt_usize(obj, "num_attention_heads")?,
            num_key_value_heads: opt_usize(obj, "num_key_value_heads")?,
            head_dim: opt_usize(obj, "head_dim")?,
            rms_norm_eps: opt_f64(obj, "rms_norm_eps")?.unwrap_or(defaults.rms_norm_eps),
            rope_theta: match rope_theta {
                Some(t) => t,
                None => opt_f64(obj, "rope_theta")?.unwrap_or(defaults.rope_theta),
            },
            max_position_embeddings: opt_usize(obj, "max_position_embeddings")?
                .unwrap_or(defaults.max_position_embeddings),
            tie_word_embeddings: opt_bool(obj, "tie_word_embeddings")?
                .unwrap_or(defaults.tie_word_embeddings),
            attention_bias: opt_bool(obj, "attention_bias")?.unwrap_or(defaults.attention_bias),
            bos_token_id: token_ids(obj, "bos_token_id")?.first().copied(),
            eos_token_ids: token_ids(obj, "eos_token_id")?,
        }
        .build()?;
        config.source = value;
        Ok(config)
    }

    /// Number of query heads that share one key/value head.
    pub fn kv_group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Number of parameters (tied embeddings counted once).
    pub fn num_parameters(&self) -> usize {
        TensorId::all(self)
            .into_iter()
            .map(|id| id.shape(self).iter().product::<usize>())
            .sum()
    }

    /// The `config.json` to write next to saved weights: the source config with every field grail
    /// interprets set to its current value, and `dtype` set to the stored dtype (e.g. "bfloat16").
    pub fn to_hf_json(&self, dtype: &str) -> Value {
        let mut obj = self.source.as_object().cloned().unwrap_or_default();
        let mut set = |k: &str, v: Value| {
            obj.insert(k.to_string(), v);
        };
        set("architectures", json!([self.family.architecture()]));
        set("model_type", json!(self.family.model_type()));
        set("hidden_act", json!("silu"));
        set("hidden_size", json!(self.hidden_size));
        set("intermediate_size", json!(self.intermediate_size));
        set("num_hidden_layers", json!(self.num_hidden_layers));
        set("num_attention_heads", json!(self.num_attention_heads));
        set("num_key_value_heads", json!(self.num_key_value_heads));
        set("head_dim", json!(self.head_dim));
        set("rms_norm_eps", json!(self.rms_norm_eps));
        set("vocab_size", json!(self.vocab_size));
        set(
            "max_position_embeddings",
            json!(self.max_position_embeddings),
        );
        set("tie_word_embeddings", json!(self.tie_word_embeddings));
        set("dtype", json!(dtype));
        if self.family == ModelFamily::Llama {
            set("attention_bias", json!(self.qkv_bias));
        }
        if obj.contains_key("rope_parameters") {
            obj.insert(
                "rope_parameters".into(),
                json!({"rope_type": "default", "rope_theta": self.rope_theta}),
            );
        } else {
            obj.insert("rope_theta".into(), json!(self.rope_theta));
        }
        obj.insert("bos_token_id".into(), json!(self.bos_token_id));
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        obj.insert("eos_token_id".into(), eos);
        Value::Object(obj)
    }
}
