//! [`ModelConfig`] by named fields: the one constructor, used for models built from scratch and
//! by [`ModelConfig::from_hf_json`] after it has read `config.json`, so both are checked alike.

use serde_json::{Map, Value};

use super::{ModelConfig, ModelFamily, RopeScaling};
use crate::error::{GrailError, Result};

/// Builds a [`ModelConfig`] field by field, with the names `config.json` uses:
///
/// ```
/// use grail_core::model::ModelConfig;
/// let config = ModelConfig::builder()
///     .vocab_size(97)
///     .hidden_size(48)
///     .intermediate_size(80)
///     .num_hidden_layers(2)
///     .num_attention_heads(4)
///     .num_key_value_heads(2)
///     .build()
///     .unwrap();
/// assert_eq!(config.head_dim, 12);
/// ```
///
/// The five sizes without a default (vocabulary, hidden, intermediate, layers, heads) must be
/// set; everything else takes transformers' default for the family.
#[derive(Debug, Clone)]
pub struct ModelConfigBuilder {
    pub(super) family: ModelFamily,
    pub(super) vocab_size: Option<usize>,
    pub(super) hidden_size: Option<usize>,
    pub(super) intermediate_size: Option<usize>,
    pub(super) num_hidden_layers: Option<usize>,
    pub(super) num_attention_heads: Option<usize>,
    pub(super) num_key_value_heads: Option<usize>,
    pub(super) head_dim: Option<usize>,
    pub(super) rms_norm_eps: f64,
    pub(super) rope_theta: f64,
    pub(super) rope_scaling: RopeScaling,
    pub(super) max_position_embeddings: usize,
    pub(super) tie_word_embeddings: bool,
    pub(super) attention_bias: bool,
    pub(super) bos_token_id: Option<u32>,
    pub(super) eos_token_ids: Vec<u32>,
}

impl Default for ModelConfigBuilder {
    fn default() -> Self {
        Self {
            family: ModelFamily::Qwen2,
            vocab_size: None,
            hidden_size: None,
            intermediate_size: None,
            num_hidden_layers: None,
            num_attention_heads: None,
            num_key_value_heads: None,
            head_dim: None,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 4096,
            tie_word_embeddings: false,
            attention_bias: false,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
        }
    }
}

impl ModelConfig {
    /// A builder for a configuration by named fields (Qwen2 unless
    /// [`family`](ModelConfigBuilder::family) says otherwise).
    pub fn builder() -> ModelConfigBuilder {
        ModelConfigBuilder::default()
    }
}

impl ModelConfigBuilder {
    /// The model family (default Qwen2), which decides the attention biases and Qwen3's q/k
    /// norms.
    pub fn family(mut self, family: ModelFamily) -> Self {
        self.family = family;
        self
    }

    /// Vocabulary size (rows of the embedding and of the lm_head). Required.
    pub fn vocab_size(mut self, n: usize) -> Self {
        self.vocab_size = Some(n);
        self
    }

    /// Width of the residual stream. Required.
    pub fn hidden_size(mut self, n: usize) -> Self {
        self.hidden_size = Some(n);
        self
    }

    /// Width of the SwiGLU MLP. Required.
    pub fn intermediate_size(mut self, n: usize) -> Self {
        self.intermediate_size = Some(n);
        self
    }

    /// Number of decoder layers. Required.
    pub fn num_hidden_layers(mut self, n: usize) -> Self {
        self.num_hidden_layers = Some(n);
        self
    }

    /// Number of query heads. Required.
    pub fn num_attention_heads(mut self, n: usize) -> Self {
        self.num_attention_heads = Some(n);
        self
    }

    /// Number of key/value heads; must divide the query heads. Default: the query heads (MHA).
    pub fn num_key_value_heads(mut self, n: usize) -> Self {
        self.num_key_value_heads = Some(n);
        self
    }

    /// Width of one attention head (even). Default: `hidden_size / num_attention_heads`.
    pub fn head_dim(mut self, n: usize) -> Self {
        self.head_dim = Some(n);
        self
    }

    /// Epsilon of every RMSNorm. Default 1e-6.
    pub fn rms_norm_eps(mut self, eps: f64) -> Self {
        self.rms_norm_eps = eps;
        self
    }

    /// RoPE base frequency. Default 10 000.
    pub fn rope_theta(mut self, theta: f64) -> Self {
        self.rope_theta = theta;
        self
    }

    /// RoPE frequency scaling. Default none.
    pub fn rope_scaling(mut self, scaling: RopeScaling) -> Self {
        self.rope_scaling = scaling;
        self
    }

    /// Longest sequence the model is configured for. Default 4096.
    pub fn max_position_embeddings(mut self, n: usize) -> Self {
        self.max_position_embeddings = n;
        self
    }

    /// Whether the lm_head reuses the embedding matrix. Default false.
    pub fn tie_word_embeddings(mut self, tie: bool) -> Self {
        self.tie_word_embeddings = tie;
        self
    }

    /// Llama's and Qwen3's `attention_bias`: a bias on q/k/v/o together. Default false; Qwen2
    /// ignores it (q/k/v always carry a bias there, o_proj never does).
    pub fn attention_bias(mut self, bias: bool) -> Self {
        self.attention_bias = bias;
        self
    }

    /// Beginning-of-sequence token id. Default none.
    pub fn bos_token_id(mut self, id: u32) -> Self {
        self.bos_token_id = Some(id);
        self
    }

    /// End-of-sequence token ids. Default none.
    pub fn eos_token_ids(mut self, ids: Vec<u32>) -> Self {
        self.eos_token_ids = ids;
        self
    }

    /// The configuration, or an error naming the field that is missing or inconsistent (the
    /// same errors `config.json` gets).
    pub fn build(self) -> Result<ModelConfig> {
        let size = |key: &str, value: Option<usize>| match value {
            None => Err(GrailError::config(key, "<missing>", "required field")),
            Some(n) => positive(key, n),
        };
        let hidden_size = size("hidden_size", self.hidden_size)?;
        let num_attention_heads = size("num_attention_heads", self.num_attention_heads)?;
        let num_key_value_heads = match self.num_key_value_heads {
            Some(n) => positive("num_key_value_heads", n)?,
            None => num_attention_heads,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(GrailError::config(
                "num_key_value_heads",
                num_key_value_heads,
                format!("must divide num_attention_heads ({num_attention_heads})"),
            ));
        }
        let head_dim = match self.head_dim {
            Some(d) => positive("head_dim", d)?,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(GrailError::config(
                    "hidden_size",
                    hidden_size,
                    format!(
                        "not divisible by num_attention_heads ({num_attention_heads}) and no head_dim given"
                    ),
                ));
            }
        };
        if head_dim % 2 != 0 {
            return Err(GrailError::config(
                "head_dim",
                head_dim,
                "RoPE needs an even head_dim",
            ));
        }
        if let RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } = self.rope_scaling
        {
            positive_number("rope_parameters.factor", factor)?;
            positive_number("rope_parameters.low_freq_factor", low_freq_factor)?;
            positive(
                "rope_parameters.original_max_position_embeddings",
                original_max_position_embeddings,
            )?;
            if !(high_freq_factor > low_freq_factor && high_freq_factor.is_finite()) {
                return Err(GrailError::config(
                    "rope_parameters.high_freq_factor",
                    high_freq_factor,
                    format!("must be above low_freq_factor ({low_freq_factor})"),
                ));
            }
        }
        let (qkv_bias, o_bias) = match self.family {
            ModelFamily::Qwen2 => (true, false),
            ModelFamily::Qwen3 | ModelFamily::Llama => (self.attention_bias, self.attention_bias),
        };
        Ok(ModelConfig {
            family: self.family,
            hidden_size,
            intermediate_size: size("intermediate_size", self.intermediate_size)?,
            num_hidden_layers: size("num_hidden_layers", self.num_hidden_layers)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: positive_number("rms_norm_eps", self.rms_norm_eps)?,
            rope_theta: positive_number("rope_theta", self.rope_theta)?,
            rope_scaling: self.rope_scaling,
            vocab_size: size("vocab_size", self.vocab_size)?,
            max_position_embeddings: positive(
                "max_position_embeddings",
                self.max_position_embeddings,
            )?,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias,
            o_bias,
            bos_token_id: self.bos_token_id,
            eos_token_ids: self.eos_token_ids,
            source: Value::Object(Map::new()),
        })
    }
}

fn positive(key: &str, n: usize) -> Result<usize> {
    if n == 0 {
        return Err(GrailError::config(key, n, "must be a positive integer"));
    }
    Ok(n)
}

fn positive_number(key: &str, x: f64) -> Result<f64> {
    if !(x > 0.0 && x.is_finite()) {
        return Err(GrailError::config(key, x, "must be a positive number"));
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfigBuilder {
        ModelConfig::builder()
            .vocab_size(10)
            .hidden_size(8)
            .intermediate_size(12)
            .num_hidden_layers(1)
            .num_attention_heads(2)
    }

    #[test]
    fn defaults_follow_transformers_and_the_family() {
        let qwen = tiny().build().unwrap();
        assert_eq!(
            (
                qwen.num_key_value_heads,
                qwen.head_dim,
                qwen.qkv_bias,
                qwen.o_bias
            ),
            (2, 4, true, false)
        );
        assert_eq!(qwen.max_position_embeddings, 4096);
        let llama = tiny()
            .family(ModelFamily::Llama)
            .attention_bias(true)
            .head_dim(6)
            .build()
            .unwrap();
        assert_eq!(
            (llama.head_dim, llama.qkv_bias, llama.o_bias),
            (6, true, true)
        );
    }

    #[test]
    fn a_built_config_survives_config_json() {
        let built = tiny()
            .family(ModelFamily::Llama)
            .num_key_value_heads(1)
            .rope_theta(500_000.0)
            .tie_word_embeddings(true)
            .eos_token_ids(vec![3, 4])
            .build()
            .unwrap();
        let mut read = ModelConfig::from_hf_json(built.to_hf_json("float32")).unwrap();
        read.source = built.source.clone();
        assert_eq!(read, built);
    }

    #[test]
    fn missing_and_inconsistent_fields_are_named() {
        let err = |b: ModelConfigBuilder| b.build().unwrap_err().to_string();
        let no_vocab = ModelConfigBuilder {
            vocab_size: None,
            ..tiny()
        };
        assert!(err(no_vocab).contains("vocab_size"));
        assert!(err(tiny().num_key_value_heads(3)).contains("num_key_value_heads"));
        assert!(err(tiny().head_dim(5)).contains("head_dim"));
        assert!(err(tiny().num_hidden_layers(0)).contains("num_hidden_layers"));
    }
}
