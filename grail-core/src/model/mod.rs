//! The decoder-only transformer of the Qwen2, Qwen3 and Llama families.
//!
//! Struct and field names follow the Hugging Face checkpoints (`model.layers.3.self_attn.q_proj`);
//! the names and shapes themselves are one table, [`TensorId`], that loading
//! ([`CausalLm::build`]) and saving ([`CausalLm::for_each_tensor`]) both read. `forward` reads top to bottom like the math:
//! embed → (norm → attention → residual → norm → MLP → residual) × L → norm → lm_head.

mod attention;
mod cache;
mod checkpointing;
mod config;
mod config_builder;
mod generate;
mod kernels;
mod layers;
mod layout;
mod paged_cache;
mod rope;
mod tensor_names;
mod weights;

pub use attention::Attention;
pub use cache::KvCache;
pub use checkpointing::LayerInputs;
pub use config::{ModelConfig, ModelFamily};
pub use config_builder::ModelConfigBuilder;
pub use generate::{argmax_rows, greedy};
pub use kernels::Kernels;
pub use layers::{Embedding, Linear, Mlp, RmsNorm};
pub use layout::{Layout, Segment};
pub use paged_cache::{PagedKvCache, PagedSequence};
pub use rope::{Rope, RopeScaling};
pub use tensor_names::{LayerTensor, Projection, TensorId, TensorRole};
pub use weights::{
    Bf16Matrices, NamedTensorSource, RandomInit, WeightSource, named_tensors, stable_id,
};

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::error::{GrailError, Result};
use attention::{AttentionMode, Caches};
use weights::Taken;

/// One pre-norm decoder block.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Grouped-query self-attention.
    pub self_attn: Attention,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
    /// SwiGLU MLP.
    pub mlp: Mlp,
}

impl DecoderLayer {
    fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        mode: AttentionMode<'_>,
        layer: usize,
    ) -> Tensor<3> {
        let normed = self.input_layernorm.forward(x.clone());
        let h = x + self.self_attn.forward(normed, cos, sin, mode, layer);
        let normed = self.post_attention_layernorm.forward(h.clone());
        h + self.mlp.forward(normed)
    }

    /// The linear projection `p` of this layer.
    fn projection(&self, p: Projection) -> &Linear {
        match p {
            Projection::Q => &self.self_attn.q_proj,
            Projection::K => &self.self_attn.k_proj,
            Projection::V => &self.self_attn.v_proj,
            Projection::O => &self.self_attn.o_proj,
            Projection::Gate => &self.mlp.gate_proj,
            Projection::Up => &self.mlp.up_proj,
            Projection::Down => &self.mlp.down_proj,
        }
    }

    fn set_kernels(&mut self, kernels: Kernels) {
        self.input_layernorm.kernels = kernels;
        self.self_attn.set_kernels(kernels);
        self.post_attention_layernorm.kernels = kernels;
        self.mlp.set_kernels(kernels);
    }
}

/// The transformer body (`model.*` in checkpoints).
#[derive(Module, Debug)]
pub struct DecoderModel {
    /// Token embeddings.
    pub embed_tokens: Embedding,
    /// Decoder blocks.
    pub layers: Vec<DecoderLayer>,
    /// Final norm.
    pub norm: RmsNorm,
}

/// A causal language model: the body plus the lm_head (absent when tied to the embeddings).
#[derive(Module, Debug)]
pub struct CausalLm {
    /// The transformer body.
    pub model: DecoderModel,
    /// Output projection `[vocab, hidden]`; `None` when `tie_word_embeddings` is set.
    pub lm_head: Option<Linear>,
    /// The configuration the model was built from.
    #[module(skip)]
    pub config: ModelConfig,
    /// The kernels every layer was given by [`CausalLm::with_fused_ops`]; the logits projection
    /// (tied to the embeddings or not) uses them too.
    #[module(skip)]
    kernels: Kernels,
}

impl CausalLm {
    /// Builds the model for `config`, taking every tensor by its Hugging Face name from `source`
    /// (a checkpoint, or [`RandomInit`] for a model trained from scratch).
    pub fn build(config: &ModelConfig, source: &mut impl WeightSource) -> Result<Self> {
        let c = config;
        let mut taken = Taken::all(c, source)?;
        let t = &mut taken;
        let linear = |t: &mut Taken, l: usize, p: Projection| Linear {
            weight: t.matrix(TensorId::Layer(l, LayerTensor::Weight(p))),
            bias: t.optional_vector(TensorId::Layer(l, LayerTensor::Bias(p))),
            kernels: Kernels::Fused,
            panels: false,
        };
        let optional_norm = |t: &mut Taken, id: TensorId| {
            t.optional_vector(id).map(|weight| RmsNorm {
                weight,
                eps: c.rms_norm_eps,
                kernels: Kernels::Fused,
            })
        };
        let norm = |t: &mut Taken, id: TensorId| {
            optional_norm(t, id).unwrap_or_else(|| panic!("{id:?} is not a norm of this model"))
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            layers.push(DecoderLayer {
                input_layernorm: norm(t, TensorId::Layer(l, LayerTensor::InputLayernorm)),
                self_attn: Attention {
                    q_proj: linear(t, l, Projection::Q),
                    k_proj: linear(t, l, Projection::K),
                    v_proj: linear(t, l, Projection::V),
                    o_proj: linear(t, l, Projection::O),
                    q_norm: optional_norm(t, TensorId::Layer(l, LayerTensor::QNorm)),
                    k_norm: optional_norm(t, TensorId::Layer(l, LayerTensor::KNorm)),
                    num_heads: c.num_attention_heads,
                    num_kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                    kernels: Kernels::Fused,
                },
                post_attention_layernorm: norm(
                    t,
                    TensorId::Layer(l, LayerTensor::PostAttentionLayernorm),
                ),
                mlp: Mlp {
                    gate_proj: linear(t, l, Projection::Gate),
                    up_proj: linear(t, l, Projection::Up),
                    down_proj: linear(t, l, Projection::Down),
                    kernels: Kernels::Fused,
                },
            });
        }
        Ok(Self {
            model: DecoderModel {
                embed_tokens: Embedding {
                    weight: t.matrix(TensorId::EmbedTokens),
                    panels: false,
                },
                layers,
                norm: norm(t, TensorId::Norm),
            },
            lm_head: t.optional_matrix(TensorId::LmHead).map(|weight| Linear {
                weight,
                bias: None,
                kernels: Kernels::Fused,
                panels: false,
            }),
            config: config.clone(),
            kernels: Kernels::Fused,
        })
    }

    /// A randomly initialised model (weights ~ N(0, 0.02²), norms 1, biases 0), seeded.
    pub fn init(config: &ModelConfig, seed: u64, device: &Device) -> Self {
        Self::build(config, &mut RandomInit::new(seed, 0.02, device))
            .expect("random initialisation provides every tensor")
    }

    /// Calls `f(name, data)` for every tensor in Hugging Face naming and layout, in
    /// [`TensorId::all`] order (tied embeddings appear once, as `model.embed_tokens.weight`).
    pub fn for_each_tensor(&self, mut f: impl FnMut(String, TensorData)) {
        for id in TensorId::all(&self.config) {
            f(id.name(), self.tensor_data(id));
        }
    }

    /// The values of tensor `id`, which the table lists for this model's config.
    fn tensor_data(&self, id: TensorId) -> TensorData {
        let missing = || panic!("{id:?} is not a tensor of this model");
        match id {
            TensorId::EmbedTokens => self.model.embed_tokens.row_major_weight().into_data(),
            TensorId::Norm => self.model.norm.weight.val().into_data(),
            TensorId::LmHead => match &self.lm_head {
                Some(head) => head.row_major_weight().into_data(),
                None => missing(),
            },
            TensorId::Layer(l, tensor) => {
                let layer = &self.model.layers[l];
                match tensor {
                    LayerTensor::InputLayernorm => layer.input_layernorm.weight.val().into_data(),
                    LayerTensor::PostAttentionLayernorm => {
                        layer.post_attention_layernorm.weight.val().into_data()
                    }
                    LayerTensor::QNorm | LayerTensor::KNorm => {
                        let attn = &layer.self_attn;
                        let norm = if tensor == LayerTensor::QNorm {
                            &attn.q_norm
                        } else {
                            &attn.k_norm
                        };
                        match norm {
                            Some(norm) => norm.weight.val().into_data(),
                            None => missing(),
                        }
                    }
                    LayerTensor::Weight(p) => layer.projection(p).row_major_weight().into_data(),
                    LayerTensor::Bias(p) => match &layer.projection(p).bias {
                        Some(bias) => bias.val().into_data(),
                        None => missing(),
                    },
                }
            }
        }
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.model.embed_tokens.weight.val().device()
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.model.embed_tokens.weight.dims()[0]
    }

    /// Hidden states `[rows, cols, hidden]` (after the final norm) for token ids laid out as
    /// `layout` says. Ids must be below `vocab_size`.
    pub fn forward_hidden(&self, ids: Tensor<2, Int>, layout: &Layout) -> Result<Tensor<3>> {
        let [rows, cols] = ids.dims();
        let (positions, segments) = layout.plan(rows, cols)?;
        Ok(self.run(ids, &positions, rows, segments.as_deref(), None))
    }

    /// Logits `[rows, cols, vocab]` for token ids laid out as `layout` says.
    pub fn forward(&self, ids: Tensor<2, Int>, layout: &Layout) -> Result<Tensor<3>> {
        Ok(self.logits(self.forward_hidden(ids, layout)?))
    }

    /// Incremental decoding: feeds `new_tokens[i]` to the sequence whose cache is `caches[i]`
    /// (a prompt for an empty cache, one token per decode step, or any mix in one call), appends
    /// their keys/values to the caches and returns the logits of each sequence's last new token,
    /// `[sequences, vocab]`. All sequences run as one packed row: the projections and MLPs see
    /// every token at once, attention stays per sequence.
    pub fn forward_cached(
        &self,
        new_tokens: &[&[u32]],
        caches: &mut [KvCache],
    ) -> Result<Tensor<2>> {
        Ok(self.logits(self.forward_cached_hidden(new_tokens, caches)?))
    }

    /// [`forward_cached`](Self::forward_cached) up to the final norm: the hidden state of each
    /// sequence's last new token, `[sequences, hidden]` (the logits are
    /// [`logits`](Self::logits) of it; the GRAIL proof sketches it).
    pub fn forward_cached_hidden(
        &self,
        new_tokens: &[&[u32]],
        caches: &mut [KvCache],
    ) -> Result<Tensor<2>> {
        if new_tokens.len() != caches.len() {
            return Err(GrailError::Input(format!(
                "forward_cached: {} token lists for {} caches",
                new_tokens.len(),
                caches.len()
            )));
        }
        let cached: Vec<usize> = caches.iter().map(KvCache::len).collect();
        self.forward_continuing(
            "forward_cached",
            new_tokens,
            &cached,
            Caches::PerSequence(caches),
        )
    }

    /// [`forward_cached`](Self::forward_cached) with every sequence's keys/values in one block
    /// pool: `sequences[i]` names the blocks of the sequence fed `new_tokens[i]` and how many
    /// positions it had cached; its blocks must already hold those plus the new ones (the
    /// caller's block tables grew first), and the pool must be built for this model's device.
    /// Needs the fused kernels ([`supports_paged_kv`](Self::supports_paged_kv)).
    pub fn forward_paged(
        &self,
        new_tokens: &[&[u32]],
        kv: &mut PagedKvCache,
        sequences: &[PagedSequence<'_>],
    ) -> Result<Tensor<2>> {
        Ok(self.logits(self.forward_paged_hidden(new_tokens, kv, sequences)?))
    }

    /// [`forward_paged`](Self::forward_paged) up to the final norm: the hidden state of each
    /// sequence's last new token, `[sequences, hidden]`.
    pub fn forward_paged_hidden(
        &self,
        new_tokens: &[&[u32]],
        kv: &mut PagedKvCache,
        sequences: &[PagedSequence<'_>],
    ) -> Result<Tensor<2>> {
        if !self.supports_paged_kv() {
            return Err(GrailError::Input(
                "forward_paged: a paged KV cache needs the fused kernels (off, or no kernel for \
                 the weights' dtype here); use forward_cached with per-sequence caches"
                    .into(),
            ));
        }
        let host = grail_kernels::host_kernels(&self.device());
        let device = self.device();
        if kv.on_host() != host || kv.device() != &device {
            let memory = |on_host| if on_host { "host" } else { "device" };
            return Err(GrailError::Input(format!(
                "forward_paged: the KV pool is in {} memory of {:?} but the model's kernels read \
                 {} memory of {device:?}; build the pool with the model's device",
                memory(kv.on_host()),
                kv.device(),
                memory(host)
            )));
        }
        if new_tokens.len() != sequences.len() {
            return Err(GrailError::Input(format!(
                "forward_paged: {} token lists for {} sequences",
                new_tokens.len(),
                sequences.len()
            )));
        }
        for (i, (tokens, seq)) in new_tokens.iter().zip(sequences).enumerate() {
            kv.check(seq, tokens.len())
                .map_err(|m| GrailError::Input(format!("forward_paged: sequence {i}: {m}")))?;
        }
        let cached: Vec<usize> = sequences.iter().map(|s| s.cached).collect();
        self.forward_continuing(
            "forward_paged",
            new_tokens,
            &cached,
            Caches::Paged(kv, sequences),
        )
    }

    /// Whether [`forward_paged`](Self::forward_paged) can run: the fused kernels are on (and
    /// exist for the weights' dtype on this backend).
    pub fn supports_paged_kv(&self) -> bool {
        self.uses_fused_ops()
    }

    /// The body of both cached forwards: sequence `i` has `cached[i]` positions and is fed
    /// `new_tokens[i]`; the hidden state of each sequence's last new token. `caller` names the
    /// public method in errors.
    fn forward_continuing(
        &self,
        caller: &str,
        new_tokens: &[&[u32]],
        cached: &[usize],
        caches: Caches<'_>,
    ) -> Result<Tensor<2>> {
        if new_tokens.is_empty() {
            return Err(GrailError::Input(format!("{caller}: no sequences")));
        }
        let vocab = self.vocab_size();
        let mut segments = Vec::with_capacity(new_tokens.len());
        let mut flat = Vec::new();
        for (i, (tokens, &pos0)) in new_tokens.iter().zip(cached).enumerate() {
            if tokens.is_empty() {
                return Err(GrailError::Input(format!(
                    "{caller}: sequence {i} has no new tokens"
                )));
            }
            if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(GrailError::Input(format!(
                    "{caller}: sequence {i}: token id {bad} is outside the vocabulary ({vocab})"
                )));
            }
            segments.push(Segment {
                row: 0,
                start: flat.len(),
                len: tokens.len(),
                pos0,
            });
            flat.extend(tokens.iter().map(|&t| t as i64));
        }
        let total = flat.len();
        let positions: Vec<usize> = segments
            .iter()
            .flat_map(|s| s.pos0..s.pos0 + s.len)
            .collect();
        let device = self.device();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(flat, [1, total]), &device);
        let hidden = self.run(ids, &positions, 1, Some(&segments), Some(caches));
        let last: Vec<i64> = segments
            .iter()
            .map(|s| (s.start + s.len - 1) as i64)
            .collect();
        let n = last.len();
        let last = Tensor::<1, Int>::from_data(TensorData::new(last, [n]), &device);
        Ok(hidden.select(1, last).reshape([n, self.config.hidden_size]))
    }

    /// Turns the fused kernels (linear, RMSNorm, SwiGLU, RoPE, varlen and cached attention) on
    /// or off in every layer; on by default. They run where the backend has them for the
    /// weights' dtype; off, plain tensor math runs everywhere.
    pub fn with_fused_ops(mut self, on: bool) -> Self {
        let kernels = Kernels::fused_if(on);
        self.kernels = kernels;
        for layer in &mut self.model.layers {
            layer.set_kernels(kernels);
        }
        self.model.norm.kernels = kernels;
        if let Some(head) = &mut self.lm_head {
            head.kernels = kernels;
        }
        self
    }

    /// Whether this forward will run the fused kernels: asked for, and the backend and dtype
    /// have them.
    pub fn uses_fused_ops(&self) -> bool {
        self.kernels.fuse(&self.model.embed_tokens.weight.val())
    }

    /// The shared body of every forward: embed, decoder layers, final norm.
    fn run(
        &self,
        ids: Tensor<2, Int>,
        positions: &[usize],
        rows: usize,
        segments: Option<&[Segment]>,
        mut caches: Option<Caches<'_>>,
    ) -> Tensor<3> {
        let (cos, sin) = self.rope_tables(positions, rows);
        let mut x = self.model.embed_tokens.forward(ids);
        for (l, layer) in self.model.layers.iter().enumerate() {
            let mode = match segments {
                None => AttentionMode::Padded,
                Some(segments) => AttentionMode::Segments {
                    segments,
                    caches: caches.as_mut().map(Caches::reborrow),
                },
            };
            x = layer.forward(x, &cos, &sin, mode, l);
        }
        self.model.norm.forward(x)
    }

    /// RoPE `(cos, sin)` tables `[rows, 1, cols, head_dim]` for `positions`, on the model's
    /// device.
    fn rope_tables(&self, positions: &[usize], rows: usize) -> (Tensor<4>, Tensor<4>) {
        let c = &self.config;
        Rope::new(c.head_dim, c.rope_theta, c.rope_scaling).tables(positions, rows, &self.device())
    }

    /// The lm_head weight `[vocab, hidden]` (the embedding matrix when tied); the fused log-prob
    /// path multiplies hidden states by it chunk by chunk.
    pub fn lm_head_weight(&self) -> Tensor<2> {
        let (weight, panels) = self.held_lm_head();
        layers::row_major(weight, panels)
    }

    /// The lm_head weight as it is held (the embedding matrix when tied), and whether in panel
    /// order.
    fn held_lm_head(&self) -> (Tensor<2>, bool) {
        match &self.lm_head {
            Some(head) => (head.weight.val(), head.panels),
            None => (
                self.model.embed_tokens.weight.val(),
                self.model.embed_tokens.panels,
            ),
        }
    }

    /// Logits `[..., vocab]` from final hidden states `[..., hidden]` (through the fused linear
    /// kernel when the model runs fused ops, as every other projection does).
    pub fn logits<const D: usize>(&self, hidden: Tensor<D>) -> Tensor<D> {
        let (weight, panels) = self.held_lm_head();
        layers::project(hidden, weight, None, self.kernels, panels)
    }

    /// This model with its matrices in panel order for the CPU's linear kernel (an inference
    /// copy: rollout workers build theirs so): every projection, and the lm_head (the embedding
    /// table when tied), whose output features fill whole panels of
    /// [`grail_kernels::PANEL`]. The product of a few rows (a decode step) runs faster than
    /// over the row-major weight and a prefill's about as fast (docs/benchmarks.md), in the same
    /// memory; the values,
    /// tensors ([`for_each_tensor`](Self::for_each_tensor)) and [`lm_head_weight`](Self::lm_head_weight) are
    /// unchanged. Only where the fused kernels run on the CPU; elsewhere the model is returned
    /// as it is. Training through it works (the gradient takes the row-major path) but gains
    /// nothing. Save its weights through [`for_each_tensor`](Self::for_each_tensor), not a burn
    /// record, which would hold the panel order under Hugging Face's names.
    pub fn with_panel_matrices(mut self) -> Self {
        if !self.uses_fused_ops() || !grail_kernels::host_kernels(&self.device()) {
            return self;
        }
        for layer in &mut self.model.layers {
            for proj in [
                &mut layer.self_attn.q_proj,
                &mut layer.self_attn.k_proj,
                &mut layer.self_attn.v_proj,
                &mut layer.self_attn.o_proj,
                &mut layer.mlp.gate_proj,
                &mut layer.mlp.up_proj,
                &mut layer.mlp.down_proj,
            ] {
                proj.hold_in_panels();
            }
        }
        match &mut self.lm_head {
            Some(head) => head.hold_in_panels(),
            None => self.model.embed_tokens.hold_in_panels(),
        }
        self
    }

    /// The log-prob of each completion token given the prompt and the tokens before it:
    /// `log softmax(h · Wᵀ / temperature)[token]` over the full vocabulary, the definition the
    /// rollout records and the trainer recomputes (through the fused chunked op, no grad).
    pub fn completion_logprobs(
        &self,
        prompt: &[u32],
        completion: &[u32],
        temperature: f64,
    ) -> Result<Vec<f32>> {
        if completion.is_empty() && !prompt.is_empty() {
            return Ok(Vec::new());
        }
        let hidden = self.completion_hidden(prompt, completion)?;
        Ok(self.token_logprobs(hidden, completion, temperature))
    }

    /// The final hidden state each completion token was sampled from (that of the position
    /// before it), `[completion, hidden]`, from one packed forward of prompt + completion: what
    /// [`completion_logprobs`](Self::completion_logprobs) and a rollout's GRAIL sketches come
    /// from.
    pub fn completion_hidden(&self, prompt: &[u32], completion: &[u32]) -> Result<Tensor<2>> {
        self.completions_hidden(&[(prompt, completion)])
    }

    /// [`completion_hidden`](Self::completion_hidden) of several (prompt, completion) pairs
    /// from one packed forward: their rows one completion after another, `[Σ completion,
    /// hidden]`.
    pub fn completions_hidden(&self, sequences: &[(&[u32], &[u32])]) -> Result<Tensor<2>> {
        if let Some((i, (p, c))) = sequences
            .iter()
            .enumerate()
            .find(|(_, (p, c))| p.is_empty() || c.is_empty())
        {
            return Err(GrailError::Input(format!(
                "completion_hidden: sequence {i} has a prompt of {} and a completion of {} \
                 tokens (both need one)",
                p.len(),
                c.len()
            )));
        }
        let model = self.valid();
        let device = model.device();
        let mut tokens = Vec::new();
        let mut lengths = Vec::with_capacity(sequences.len());
        let mut rows = Vec::new();
        for (prompt, completion) in sequences {
            let start = tokens.len();
            tokens.extend(prompt.iter().chain(*completion).map(|&t| t as i64));
            lengths.push(prompt.len() + completion.len());
            // Each completion token's logits come from the position before it.
            rows.extend((start + prompt.len() - 1..tokens.len() - 1).map(|r| r as i64));
        }
        let n = tokens.len();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(tokens, [1, n]), &device);
        let hidden = model
            .forward_hidden(ids, &Layout::packed_single_row(lengths))?
            .reshape([n, self.config.hidden_size]);
        if sequences.len() == 1 {
            let (p, _) = sequences[0];
            return Ok(hidden.slice(p.len() - 1..n - 1));
        }
        let count = rows.len();
        let rows = Tensor::<1, Int>::from_data(TensorData::new(rows, [count]), &device);
        Ok(hidden.select(0, rows))
    }

    /// `log softmax(h · Wᵀ / temperature)[token]` of each row of `hidden` (`[tokens, hidden]`)
    /// and its token, through the fused chunked op (no grad).
    pub fn token_logprobs(&self, hidden: Tensor<2>, tokens: &[u32], temperature: f64) -> Vec<f32> {
        if tokens.is_empty() {
            return Vec::new();
        }
        let targets: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let targets =
            Tensor::<1, Int>::from_data(TensorData::new(targets, [tokens.len()]), &hidden.device());
        let logp = grail_kernels::selective_logprobs_forward(
            &hidden,
            &self.valid().lm_head_weight(),
            &targets,
            temperature,
            grail_kernels::ChunkSizes::default(),
            false,
        )
        .logp;
        logp.into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32 log-probs")
    }
}
