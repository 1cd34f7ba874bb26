//! Model configuration read from (and written back to) a Hugging Face `config.json`.

use std::path::Path;

use serde_json::{Map, Value, json};

use super::TensorId;
use super::config_builder::ModelConfigBuilder;
use super::rope::RopeScaling;
use crate::error::{GrailError, Result};

/// The model families grail runs. All are pre-norm decoder-only transformers with RMSNorm,
/// rotate-half RoPE, grouped-query attention and a SwiGLU MLP; they differ in their attention
/// biases and in Qwen3's per-head norms on queries and keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// `Qwen2ForCausalLM`: q/k/v projections always carry a bias, o_proj never does.
    Qwen2,
    /// `Qwen3ForCausalLM`: an RMSNorm over each head of q and of k (`q_norm`, `k_norm`) before
    /// RoPE; `attention_bias` puts a bias on q/k/v/o together.
    Qwen3,
    /// `LlamaForCausalLM`: `attention_bias` puts a bias on q/k/v/o together.
    Llama,
}

impl ModelFamily {
    /// Every family, in the order errors list them.
    pub const ALL: [ModelFamily; 3] = [ModelFamily::Qwen2, ModelFamily::Qwen3, ModelFamily::Llama];

    /// The `model_type` string of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            ModelFamily::Qwen2 => "qwen2",
            ModelFamily::Qwen3 => "qwen3",
            ModelFamily::Llama => "llama",
        }
    }

    /// The `architectures` entry transformers uses to load the checkpoint.
    pub fn architecture(self) -> &'static str {
        match self {
            ModelFamily::Qwen2 => "Qwen2ForCausalLM",
            ModelFamily::Qwen3 => "Qwen3ForCausalLM",
            ModelFamily::Llama => "LlamaForCausalLM",
        }
    }

    /// Whether each query and key head is RMS-normalised before RoPE (Qwen3).
    pub fn qk_norm(self) -> bool {
        self == ModelFamily::Qwen3
    }
}

/// Everything the model needs to know about its shape, as Hugging Face names it.
///
/// Built from `config.json` with [`ModelConfig::from_hf_json`] (which rejects what grail does not
/// implement, naming the field) or by hand with [`ModelConfig::builder`] for models trained from
/// scratch. [`ModelConfig::to_hf_json`] writes it back, keeping the keys we do not interpret.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Qwen2, Qwen3 or Llama.
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
    /// RoPE frequency scaling (`rope_parameters.rope_type`).
    pub rope_scaling: RopeScaling,
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
    /// `model_type` or `rope_type`, a sliding window, another activation, an MLP bias) is an
    /// error that names the field and its value.
    pub fn from_hf_json(value: Value) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| GrailError::config("<root>", &value, "config.json must be an object"))?;
        let model_type = get(obj, "model_type").and_then(Value::as_str);
        let Some(family) = ModelFamily::ALL
            .into_iter()
            .find(|f| Some(f.model_type()) == model_type)
        else {
            let v = get(obj, "model_type").cloned().unwrap_or(Value::Null);
            return Err(GrailError::config(
                "model_type",
                v,
                "unsupported model type (grail supports \"qwen2\", \"qwen3\" and \"llama\")",
            ));
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
        let (rope_theta, rope_scaling) = rope(obj)?;
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
            rope_theta: rope_theta.unwrap_or(defaults.rope_theta),
            rope_scaling,
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
        if self.family != ModelFamily::Qwen2 {
            set("attention_bias", json!(self.qkv_bias));
        }
        self.write_rope(&mut obj);
        obj.insert("bos_token_id".into(), json!(self.bos_token_id));
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        obj.insert("eos_token_id".into(), eos);
        Value::Object(obj)
    }

    /// Writes `rope_theta` and the scaling back in the source's style: transformers 5's
    /// `rope_parameters` object (its other keys kept), else the older top-level `rope_theta` and
    /// `rope_scaling`.
    fn write_rope(&self, obj: &mut Map<String, Value>) {
        let mut params = Map::new();
        params.insert("rope_type".into(), json!(self.rope_scaling.rope_type()));
        if let RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } = self.rope_scaling
        {
            params.insert("factor".into(), json!(factor));
            params.insert("low_freq_factor".into(), json!(low_freq_factor));
            params.insert("high_freq_factor".into(), json!(high_freq_factor));
            params.insert(
                "original_max_position_embeddings".into(),
                json!(original_max_position_embeddings),
            );
        }
        if let Some(Value::Object(source)) = obj.get_mut("rope_parameters") {
            source.retain(|k, _| !SCALING_KEYS.contains(&k.as_str()));
            source.extend(params);
            source.insert("rope_theta".into(), json!(self.rope_theta));
            if obj.contains_key("rope_theta") {
                obj.insert("rope_theta".into(), json!(self.rope_theta));
            }
            return;
        }
        obj.insert("rope_theta".into(), json!(self.rope_theta));
        if self.rope_scaling != RopeScaling::None {
            obj.insert("rope_scaling".into(), Value::Object(params));
        } else if obj.contains_key("rope_scaling") {
            obj.insert("rope_scaling".into(), Value::Null);
        }
    }
}

/// The keys of a RoPE parameters object that [`RopeScaling`] interprets.
const SCALING_KEYS: [&str; 6] = [
    "rope_type",
    "type",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
];

/// `rope_theta` and the scaling, from transformers 5's `rope_parameters` object or from the
/// older top-level `rope_theta` with a `rope_scaling` object (as Llama 3.x checkpoints on the
/// Hub still ship). A `rope_type` other than "default" and "llama3" is an error naming it.
/// Both objects present must agree.
fn rope(obj: &Map<String, Value>) -> Result<(Option<f64>, RopeScaling)> {
    full_rotary(obj, "partial_rotary_factor")?;
    let mut found: Option<(&str, (Option<f64>, RopeScaling))> = None;
    for key in ["rope_parameters", "rope_scaling"] {
        let Some(params) = get(obj, key) else {
            continue;
        };
        let parsed = rope_object(obj, key, params)?;
        match &found {
            Some((first, earlier)) if earlier.1 != parsed.1 => {
                return Err(GrailError::config(
                    key,
                    params,
                    format!("disagrees with `{first}`"),
                ));
            }
            Some(_) => {}
            None => found = Some((key, parsed)),
        }
    }
    match found {
        Some((_, parsed)) => Ok(parsed),
        None => Ok((opt_f64(obj, "rope_theta")?, RopeScaling::None)),
    }
}

/// RoPE over every channel of a head: a `partial_rotary_factor` in `obj` other than 1 is an
/// error naming `field`.
fn full_rotary(obj: &Map<String, Value>, field: &str) -> Result<()> {
    match get(obj, "partial_rotary_factor") {
        Some(p) if p.as_f64() != Some(1.0) => Err(GrailError::config(
            field,
            p,
            "partial rotary embeddings are not supported",
        )),
        _ => Ok(()),
    }
}

/// One RoPE parameters object, `obj[key]`.
fn rope_object(
    obj: &Map<String, Value>,
    key: &str,
    params: &Value,
) -> Result<(Option<f64>, RopeScaling)> {
    let Some(params) = params.as_object() else {
        return Err(GrailError::config(key, params, "must be an object"));
    };
    // Error messages name the nested key, e.g. `rope_parameters.factor`.
    let nested = |e: GrailError, field: &str| match e {
        GrailError::Config { value, reason, .. } => GrailError::Config {
            field: format!("{key}.{field}"),
            value,
            reason,
        },
        other => other,
    };
    let theta = match opt_f64(params, "rope_theta").map_err(|e| nested(e, "rope_theta"))? {
        Some(t) => Some(t),
        None => opt_f64(obj, "rope_theta")?,
    };
    full_rotary(params, &format!("{key}.partial_rotary_factor"))?;
    let kind = get(params, "rope_type").or_else(|| get(params, "type"));
    let scaling = match kind.map(Value::as_str) {
        None | Some(Some("default")) => RopeScaling::None,
        Some(Some("llama3")) => {
            let number = |field: &str| {
                opt_f64(params, field)
                    .and_then(|v| {
                        v.ok_or_else(|| {
                            GrailError::config(field, "<missing>", "required by llama3")
                        })
                    })
                    .map_err(|e| nested(e, field))
            };
            let original = "original_max_position_embeddings";
            RopeScaling::Llama3 {
                factor: number("factor")?,
                low_freq_factor: number("low_freq_factor")?,
                high_freq_factor: number("high_freq_factor")?,
                original_max_position_embeddings: opt_usize(params, original)
                    .and_then(|v| {
                        v.ok_or_else(|| {
                            GrailError::config(original, "<missing>", "required by llama3")
                        })
                    })
                    .map_err(|e| nested(e, original))?,
            }
        }
        Some(_) => {
            return Err(GrailError::config(
                &format!("{key}.rope_type"),
                kind.expect("matched a value"),
                "unsupported RoPE scaling (grail supports \"default\" and \"llama3\")",
            ));
        }
    };
    Ok((theta, scaling))
}
