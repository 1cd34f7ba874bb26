//! The one table of the model's tensors as Hugging Face checkpoints name and shape them.
//! [`CausalLm::build`](super::CausalLm::build) takes every tensor by these names (from a
//! checkpoint, a weight update or a seeded init), and
//! [`CausalLm::for_each_tensor`](super::CausalLm::for_each_tensor), which checkpoint saving and
//! weight updates read, gives them back under the same names.

use super::ModelConfig;

/// One tensor of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorId {
    /// `model.embed_tokens.weight`, `[vocab, hidden]`.
    EmbedTokens,
    /// A tensor of decoder layer `.0`, `model.layers.{i}.…`.
    Layer(usize, LayerTensor),
    /// `model.norm.weight`, `[hidden]`.
    Norm,
    /// `lm_head.weight`, `[vocab, hidden]`; absent when tied to the embeddings.
    LmHead,
}

/// A tensor of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerTensor {
    /// `input_layernorm.weight`, `[hidden]`.
    InputLayernorm,
    /// `post_attention_layernorm.weight`, `[hidden]`.
    PostAttentionLayernorm,
    /// `self_attn.q_norm.weight`, `[head_dim]` (Qwen3): one gain for every query head.
    QNorm,
    /// `self_attn.k_norm.weight`, `[head_dim]` (Qwen3): one gain for every key head.
    KNorm,
    /// A projection's weight, `[out, in]`.
    Weight(Projection),
    /// A projection's bias, `[out]`, where the family has one.
    Bias(Projection),
}

/// The linear projections of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Projection {
    /// `self_attn.q_proj`: hidden → heads × head_dim.
    Q,
    /// `self_attn.k_proj`: hidden → kv_heads × head_dim.
    K,
    /// `self_attn.v_proj`: hidden → kv_heads × head_dim.
    V,
    /// `self_attn.o_proj`: heads × head_dim → hidden.
    O,
    /// `mlp.gate_proj`: hidden → intermediate.
    Gate,
    /// `mlp.up_proj`: hidden → intermediate.
    Up,
    /// `mlp.down_proj`: intermediate → hidden.
    Down,
}

impl Projection {
    /// Every projection of a layer, in checkpoint order.
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// The module path inside a layer, e.g. `self_attn.q_proj`.
    pub fn path(self) -> &'static str {
        match self {
            Projection::Q => "self_attn.q_proj",
            Projection::K => "self_attn.k_proj",
            Projection::V => "self_attn.v_proj",
            Projection::O => "self_attn.o_proj",
            Projection::Gate => "mlp.gate_proj",
            Projection::Up => "mlp.up_proj",
            Projection::Down => "mlp.down_proj",
        }
    }

    /// The weight's shape `[out, in]`.
    pub fn shape(self, c: &ModelConfig) -> [usize; 2] {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let q = c.num_attention_heads * c.head_dim;
        let kv = c.num_key_value_heads * c.head_dim;
        match self {
            Projection::Q => [q, h],
            Projection::K | Projection::V => [kv, h],
            Projection::O => [h, q],
            Projection::Gate | Projection::Up => [i, h],
            Projection::Down => [h, i],
        }
    }

    /// Whether the family puts a bias on this projection.
    pub fn has_bias(self, c: &ModelConfig) -> bool {
        match self {
            Projection::Q | Projection::K | Projection::V => c.qkv_bias,
            Projection::O => c.o_bias,
            Projection::Gate | Projection::Up | Projection::Down => false,
        }
    }
}

impl TensorId {
    /// Every tensor of a model of `config`, in the order [`CausalLm::build`] takes them (which
    /// fixes what a seeded random init draws for each): each layer's projections, the lm_head,
    /// each layer's norms, the final norm, the embeddings.
    ///
    /// [`CausalLm::build`]: super::CausalLm::build
    pub fn all(config: &ModelConfig) -> Vec<TensorId> {
        let layers = 0..config.num_hidden_layers;
        let projections = layers.clone().flat_map(|l| {
            Projection::ALL.into_iter().flat_map(move |p| {
                [
                    TensorId::Layer(l, LayerTensor::Weight(p)),
                    TensorId::Layer(l, LayerTensor::Bias(p)),
                ]
            })
        });
        let norms = layers.flat_map(|l| {
            [
                TensorId::Layer(l, LayerTensor::InputLayernorm),
                TensorId::Layer(l, LayerTensor::PostAttentionLayernorm),
                TensorId::Layer(l, LayerTensor::QNorm),
                TensorId::Layer(l, LayerTensor::KNorm),
            ]
        });
        projections
            .chain([TensorId::LmHead])
            .chain(norms)
            .chain([TensorId::Norm, TensorId::EmbedTokens])
            .filter(|id| id.present(config))
            .collect()
    }

    /// The checkpoint name, e.g. `model.layers.3.self_attn.q_proj.weight`.
    pub fn name(self) -> String {
        match self {
            TensorId::EmbedTokens => "model.embed_tokens.weight".into(),
            TensorId::Norm => "model.norm.weight".into(),
            TensorId::LmHead => "lm_head.weight".into(),
            TensorId::Layer(l, tensor) => match tensor {
                LayerTensor::InputLayernorm => format!("model.layers.{l}.input_layernorm.weight"),
                LayerTensor::PostAttentionLayernorm => {
                    format!("model.layers.{l}.post_attention_layernorm.weight")
                }
                LayerTensor::QNorm => format!("model.layers.{l}.self_attn.q_norm.weight"),
                LayerTensor::KNorm => format!("model.layers.{l}.self_attn.k_norm.weight"),
                LayerTensor::Weight(p) => format!("model.layers.{l}.{}.weight", p.path()),
                LayerTensor::Bias(p) => format!("model.layers.{l}.{}.bias", p.path()),
            },
        }
    }

    /// The shape for `config`.
    pub fn shape(self, config: &ModelConfig) -> Vec<usize> {
        let (h, v) = (config.hidden_size, config.vocab_size);
        match self {
            TensorId::EmbedTokens | TensorId::LmHead => vec![v, h],
            TensorId::Norm
            | TensorId::Layer(_, LayerTensor::InputLayernorm)
            | TensorId::Layer(_, LayerTensor::PostAttentionLayernorm) => vec![h],
            TensorId::Layer(_, LayerTensor::QNorm | LayerTensor::KNorm) => vec![config.head_dim],
            TensorId::Layer(_, LayerTensor::Weight(p)) => p.shape(config).to_vec(),
            TensorId::Layer(_, LayerTensor::Bias(p)) => vec![p.shape(config)[0]],
        }
    }

    /// Whether a model of `config` has this tensor (biases and q/k norms by family, the lm_head
    /// when untied).
    pub fn present(self, config: &ModelConfig) -> bool {
        match self {
            TensorId::LmHead => !config.tie_word_embeddings,
            TensorId::Layer(_, LayerTensor::Bias(p)) => p.has_bias(config),
            TensorId::Layer(_, LayerTensor::QNorm | LayerTensor::KNorm) => config.family.qk_norm(),
            TensorId::EmbedTokens
            | TensorId::Norm
            | TensorId::Layer(
                _,
                LayerTensor::InputLayernorm
                | LayerTensor::PostAttentionLayernorm
                | LayerTensor::Weight(_),
            ) => true,
        }
    }

    /// What the tensor is, which decides how a fresh model initialises it.
    pub fn role(self) -> TensorRole {
        match self {
            TensorId::EmbedTokens
            | TensorId::LmHead
            | TensorId::Layer(_, LayerTensor::Weight(_)) => TensorRole::Weight,
            TensorId::Layer(_, LayerTensor::Bias(_)) => TensorRole::Bias,
            TensorId::Norm
            | TensorId::Layer(
                _,
                LayerTensor::InputLayernorm
                | LayerTensor::PostAttentionLayernorm
                | LayerTensor::QNorm
                | LayerTensor::KNorm,
            ) => TensorRole::NormGain,
        }
    }
}

/// What a tensor is to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    /// A projection or embedding matrix.
    Weight,
    /// A projection's bias.
    Bias,
    /// An RMSNorm's per-channel gain.
    NormGain,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_shapes_and_presence_follow_the_config() {
        let config = ModelConfig::builder()
            .vocab_size(10)
            .hidden_size(8)
            .intermediate_size(12)
            .num_hidden_layers(2)
            .num_attention_heads(2)
            .num_key_value_heads(1)
            .max_position_embeddings(32)
            .tie_word_embeddings(true)
            .build()
            .unwrap();
        let all = TensorId::all(&config);
        // Per layer: 7 weights, q/k/v biases, 2 norms; then the final norm and the embeddings.
        assert_eq!(all.len(), 2 * (7 + 3 + 2) + 2);
        assert!(!all.contains(&TensorId::LmHead));
        let k_bias = TensorId::Layer(1, LayerTensor::Bias(Projection::K));
        assert_eq!(k_bias.name(), "model.layers.1.self_attn.k_proj.bias");
        assert_eq!(k_bias.shape(&config), vec![4]);
        let down = TensorId::Layer(0, LayerTensor::Weight(Projection::Down));
        assert_eq!(down.name(), "model.layers.0.mlp.down_proj.weight");
        assert_eq!(down.shape(&config), vec![8, 12]);
        // Per layer 512: q 64+8, k 32+4, v 32+4, o 64, MLP 3·96, norms 16; then 8 + 80.
        assert_eq!(config.num_parameters(), 2 * 512 + 8 + 80);
    }

    #[test]
    fn qwen3_has_per_head_q_and_k_norms_and_no_biases() {
        let config = ModelConfig::builder()
            .family(crate::model::ModelFamily::Qwen3)
            .vocab_size(10)
            .hidden_size(8)
            .intermediate_size(12)
            .num_hidden_layers(1)
            .num_attention_heads(2)
            .num_key_value_heads(1)
            .head_dim(6)
            .build()
            .unwrap();
        let all = TensorId::all(&config);
        // 7 weights, 2 layer norms, q/k norms; the final norm, the embeddings, the lm_head.
        assert_eq!(all.len(), 7 + 2 + 2 + 3);
        let q_norm = TensorId::Layer(0, LayerTensor::QNorm);
        assert!(all.contains(&q_norm));
        assert_eq!(q_norm.name(), "model.layers.0.self_attn.q_norm.weight");
        assert_eq!(q_norm.shape(&config), vec![6]);
        assert_eq!(q_norm.role(), TensorRole::NormGain);
        let q = TensorId::Layer(0, LayerTensor::Weight(Projection::Q));
        assert_eq!(
            q.shape(&config),
            vec![12, 8],
            "head_dim, not hidden / heads"
        );
    }
}
