//! Grouped-query self-attention with rotate-half RoPE (and Qwen3's per-head q/k norms), over
//! padded batches, packed rows and KV-cached continuations.

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use grail_kernels::attention::HostKv;

use super::cache::KvCache;
use super::kernels::Kernels;
use super::layers::{Linear, RmsNorm};
use super::layout::Segment;
use super::paged_cache::{PagedKvCache, PagedSequence};
use super::rope::Rope;

/// How attention groups the tokens of a call.
pub(crate) enum AttentionMode<'a> {
    /// One right-padded sequence per row: one causal attention over the whole batch.
    Padded,
    /// Independent segments of rows; each attends causally to itself (and to its cache).
    Segments {
        segments: &'a [Segment],
        /// The segments' caches when continuing generation.
        caches: Option<Caches<'a>>,
    },
}

/// Where the sequences of a cached forward keep their keys and values.
pub(crate) enum Caches<'a> {
    /// One cache per segment, each owned by its sequence.
    PerSequence(&'a mut [KvCache]),
    /// One block pool for all; one block list per segment (fused kernels).
    Paged(&'a mut PagedKvCache, &'a [PagedSequence<'a>]),
}

impl Caches<'_> {
    /// The same caches for one more layer's call.
    pub(crate) fn reborrow(&mut self) -> Caches<'_> {
        match self {
            Caches::PerSequence(c) => Caches::PerSequence(c),
            Caches::Paged(kv, seqs) => Caches::Paged(kv, seqs),
        }
    }
}

const CAUSAL: AttentionModuleOptions = AttentionModuleOptions {
    scale: None,
    softcap: None,
    is_causal: true,
};

/// Self-attention of one decoder layer, named as in Hugging Face checkpoints.
///
/// # Shapes
/// - input and output `[rows, cols, hidden]`; q has `num_heads × head_dim` channels, k and v
///   `num_kv_heads × head_dim` (each kv head serves `num_heads / num_kv_heads` query heads).
#[derive(Module, Debug)]
pub struct Attention {
    /// hidden → heads × head_dim.
    pub q_proj: Linear,
    /// hidden → kv_heads × head_dim.
    pub k_proj: Linear,
    /// hidden → kv_heads × head_dim.
    pub v_proj: Linear,
    /// heads × head_dim → hidden.
    pub o_proj: Linear,
    /// Qwen3's RMSNorm over each query head (`[head_dim]` gain), before RoPE.
    pub q_norm: Option<RmsNorm>,
    /// Qwen3's RMSNorm over each key head (`[head_dim]` gain), before RoPE.
    pub k_norm: Option<RmsNorm>,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads.
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// The fused RoPE and attention kernels or the tensor math.
    #[module(skip)]
    pub kernels: Kernels,
}

impl Attention {
    /// Repeats each kv head for the query heads that share it: `[r, kv, n, d] → [r, heads, n, d]`.
    fn expand_kv(&self, x: Tensor<4>) -> Tensor<4> {
        let group = self.num_heads / self.num_kv_heads;
        if group == 1 {
            return x;
        }
        let [r, kv, n, d] = x.dims();
        x.reshape([r, kv, 1, n, d])
            .expand([r, kv, group, n, d])
            .reshape([r, kv * group, n, d])
    }

    /// Whether this layer runs the fused kernels.
    fn fused(&self) -> bool {
        self.kernels.fuse(&self.q_proj.weight.val())
    }

    /// Sets the implementation of every op of the attention.
    pub(crate) fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
        for proj in [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
        ] {
            proj.kernels = kernels;
        }
        for norm in [&mut self.q_norm, &mut self.k_norm].into_iter().flatten() {
            norm.kernels = kernels;
        }
    }

    /// Applies `norm` (Qwen3's per-head q or k norm) over the last dimension, a head's channels.
    fn head_norm<const D: usize>(norm: &Option<RmsNorm>, x: Tensor<D>) -> Tensor<D> {
        match norm {
            Some(norm) => norm.forward(x),
            None => x,
        }
    }

    /// Attention for `x` `[rows, cols, hidden]` with RoPE tables `cos`/`sin` `[rows, 1, cols, d]`.
    /// With the fused kernels, packed rows go through the varlen attention kernel (no per-segment
    /// loop, no GQA copies, no transposes) and cached generation through the cached-attention
    /// kernels; padded batches, and everything on the reference path, through burn's attention.
    pub(crate) fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        mode: AttentionMode<'_>,
        layer: usize,
    ) -> Tensor<3> {
        let [rows, cols, _] = x.dims();
        let mode = match mode {
            AttentionMode::Segments {
                segments,
                caches: None,
            } if self.fused() => return self.forward_varlen(x, cos, sin, segments),
            // Host memory (Flex): the caches grow in place (or the pool is written) and the kernel
            // reads them there; a GPU backend keeps its caches on the device.
            AttentionMode::Segments {
                segments,
                caches: Some(caches),
            } if self.fused() && grail_kernels::host_kernels(&x.device()) => {
                return self.forward_cached_host(x, cos, sin, segments, caches, layer);
            }
            AttentionMode::Segments {
                segments,
                caches: Some(Caches::PerSequence(caches)),
            } if self.fused() => {
                return self.forward_cached_device(x, cos, sin, segments, caches, layer);
            }
            AttentionMode::Segments {
                segments,
                caches: Some(Caches::Paged(kv, seqs)),
            } if self.fused() => {
                return self.forward_paged_device(x, cos, sin, segments, kv, seqs, layer);
            }
            mode => mode,
        };
        let (q, k, v) = self.qkv_heads(x, cos, sin);

        let out = match mode {
            AttentionMode::Padded => {
                // Right padding: causal masking alone keeps real tokens off the padding.
                attention(q, self.expand_kv(k), self.expand_kv(v), None, None, CAUSAL)
            }
            AttentionMode::Segments { segments, caches } => {
                let mut caches = match caches {
                    Some(Caches::PerSequence(c)) => Some(c),
                    Some(Caches::Paged(..)) => unreachable!(
                        "a paged KV cache needs the fused kernels (checked by forward_paged)"
                    ),
                    None => None,
                };
                let device = q.device();
                let mut row_parts: Vec<Vec<Tensor<4>>> = vec![Vec::new(); rows];
                let mut used = vec![0usize; rows];
                for (i, seg) in segments.iter().enumerate() {
                    let range = |t: &Tensor<4>| {
                        t.clone()
                            .slice_dim(0, seg.row..seg.row + 1)
                            .narrow(2, seg.start, seg.len)
                    };
                    let (qs, mut ks, mut vs) = (range(&q), range(&k), range(&v));
                    if let Some(caches) = caches.as_deref_mut() {
                        (ks, vs) = caches[i].append_tensors(layer, ks, vs);
                    }
                    // Bottom-right aligned causal mask: new token j sees the cache and tokens ≤ j.
                    let o = attention(
                        qs,
                        self.expand_kv(ks),
                        self.expand_kv(vs),
                        None,
                        None,
                        CAUSAL,
                    );
                    row_parts[seg.row].push(o);
                    used[seg.row] = used[seg.row].max(seg.start + seg.len);
                }
                let rows_out: Vec<Tensor<4>> = row_parts
                    .into_iter()
                    .zip(used)
                    .map(|(mut parts, used)| {
                        if used < cols {
                            parts.push(Tensor::zeros(
                                [1, self.num_heads, cols - used, self.head_dim],
                                &device,
                            ));
                        }
                        Tensor::cat(parts, 2)
                    })
                    .collect();
                Tensor::cat(rows_out, 0)
            }
        };
        let out = out
            .swap_dims(1, 2)
            .reshape([rows, cols, self.num_heads * self.head_dim]);
        self.o_proj.forward(out)
    }

    /// `q` `[rows, heads, cols, d]`, `k`/`v` `[rows, kv_heads, cols, d]` of `x`
    /// `[rows, cols, hidden]`, RoPE applied to q and k.
    fn qkv_heads(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
    ) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let [rows, cols, _] = x.dims();
        let d = self.head_dim;
        if self.fused() {
            // The RoPE kernel works token-major, the projections' own layout.
            let heads = |t: Tensor<3>| {
                let [_, heads, _] = t.dims();
                t.reshape([rows, cols, heads, d]).swap_dims(1, 2)
            };
            let (q, k, v) = self.rotated_qkv(x, cos, sin);
            return (heads(q), heads(k), heads(v));
        }
        let heads = |proj: &Linear, heads: usize, norm: &Option<RmsNorm>| {
            let t = proj.forward(x.clone()).reshape([rows, cols, heads, d]);
            Self::head_norm(norm, t).swap_dims(1, 2)
        };
        (
            Rope::apply(heads(&self.q_proj, self.num_heads, &self.q_norm), cos, sin),
            Rope::apply(
                heads(&self.k_proj, self.num_kv_heads, &self.k_norm),
                cos,
                sin,
            ),
            heads(&self.v_proj, self.num_kv_heads, &None),
        )
    }

    /// Generation through the fused kernels on host memory: the new tokens' keys/values are
    /// written into each sequence's cache (its own growing cache, or its blocks of the pool), and
    /// one kernel call attends every sequence's new tokens to its cached positions.
    fn forward_cached_host(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        segments: &[Segment],
        caches: Caches<'_>,
        layer: usize,
    ) -> Tensor<3> {
        let [rows, cols, _] = x.dims();
        let device = x.device();
        let (q, k, v) = self.rotated_qkv(x, cos, sin);
        let (q, k, v) = (host_f32(q), host_f32(k), host_f32(v));
        let kv_row = self.num_kv_heads * self.head_dim;
        let queries: Vec<(usize, usize)> = segments
            .iter()
            .map(|seg| (seg.row * cols + seg.start, seg.len))
            .collect();
        let new = |&(at, len): &(usize, usize)| at * kv_row..(at + len) * kv_row;
        let views: Vec<HostKv<'_>> = match caches {
            Caches::PerSequence(caches) => {
                for (query, cache) in queries.iter().zip(caches.iter_mut()) {
                    cache.append_host(layer, &k[new(query)], &v[new(query)], query.1);
                }
                let caches: &[KvCache] = caches;
                caches
                    .iter()
                    .map(|c| {
                        let (k, v) = c.host_kv(layer);
                        HostKv::contiguous(k, v, kv_row)
                    })
                    .collect()
            }
            Caches::Paged(kv, seqs) => {
                for (query, seq) in queries.iter().zip(seqs) {
                    kv.write(layer, seq, &k[new(query)], &v[new(query)]);
                }
                let kv: &PagedKvCache = kv;
                queries
                    .iter()
                    .zip(seqs)
                    .map(|(&(_, len), seq)| kv.host_kv(layer, seq, seq.cached + len))
                    .collect()
            }
        };
        self.host_attention_out(&q, [rows, cols], &queries, &views, &device)
    }

    /// The host cached-attention kernel over `kv` for the `queries` rows of `q`, then `o_proj`.
    fn host_attention_out(
        &self,
        q: &[f32],
        [rows, cols]: [usize; 2],
        queries: &[(usize, usize)],
        kv: &[HostKv<'_>],
        device: &burn::tensor::Device,
    ) -> Tensor<3> {
        let d = self.head_dim;
        let dims = grail_kernels::attention::AttentionDims {
            tokens: rows * cols,
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim: d,
        };
        let scale = 1.0 / (d as f32).sqrt();
        let out = grail_kernels::attention::cached_attention_on_host(q, dims, queries, kv, scale);
        let out = Tensor::<3>::from_data(
            burn::tensor::TensorData::new(out, [rows, cols, self.num_heads * d]),
            device,
        );
        self.o_proj.forward(out)
    }

    /// Generation through the fused kernels on a device backend: the new tokens' keys/values join
    /// each sequence's device cache, the caches are gathered along the token axis, and one kernel
    /// call attends every sequence's new tokens to its own cache.
    fn forward_cached_device(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        segments: &[Segment],
        caches: &mut [KvCache],
        layer: usize,
    ) -> Tensor<3> {
        let [rows, cols, _] = x.dims();
        let (q, k, v) = self.rotated_qkv(x, cos, sin);
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        let mut spans = Vec::with_capacity(segments.len());
        let mut k_start = 0;
        for (seg, cache) in segments.iter().zip(caches.iter_mut()) {
            let at = seg.row * cols + seg.start;
            let new = |t: &Tensor<3>| t.clone().narrow(0, at, seg.len);
            let (ks, vs) = cache.append_device(layer, new(&k), new(&v));
            let k_len = ks.dims()[0];
            spans.push(grail_kernels::CachedSpan {
                q_start: at,
                q_len: seg.len,
                k_start,
                k_len,
            });
            k_start += k_len;
            keys.push(ks);
            values.push(vs);
        }
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        let (keys, values) = (Tensor::cat(keys, 0), Tensor::cat(values, 0));
        let out = grail_kernels::cached_attention(q, keys, values, &spans, scale);
        let out = out.reshape([rows, cols, self.num_heads * self.head_dim]);
        self.o_proj.forward(out)
    }

    /// Generation through the fused kernels on a device backend with a paged cache: the new
    /// tokens' keys/values are written into their sequences' blocks of the device pool, and one
    /// kernel call attends every sequence's new tokens through its block list.
    #[allow(clippy::too_many_arguments)]
    fn forward_paged_device(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        segments: &[Segment],
        kv: &mut PagedKvCache,
        seqs: &[PagedSequence<'_>],
        layer: usize,
    ) -> Tensor<3> {
        let [rows, cols, _] = x.dims();
        let (q, k, v) = self.rotated_qkv(x, cos, sin);
        let queries: Vec<(usize, usize)> = segments
            .iter()
            .map(|seg| (seg.row * cols + seg.start, seg.len))
            .collect();
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        let out = kv.write_and_attend(layer, seqs, &queries, [q, k, v], scale);
        let out = out.reshape([rows, cols, self.num_heads * self.head_dim]);
        self.o_proj.forward(out)
    }

    /// Token-major `q` `[tokens, heads, d]`, `k`/`v` `[tokens, kv_heads, d]` of `x`
    /// `[rows, cols, hidden]` through the fused linear, RMSNorm (Qwen3's q/k norms) and RoPE
    /// kernels (RoPE on q and k).
    fn rotated_qkv(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
    ) -> (Tensor<3>, Tensor<3>, Tensor<3>) {
        let [rows, cols, _] = x.dims();
        let (tokens, d) = (rows * cols, self.head_dim);
        let cos = cos.clone().reshape([tokens, d]);
        let sin = sin.clone().reshape([tokens, d]);
        let project = |proj: &Linear, heads: usize, norm: &Option<RmsNorm>| {
            Self::head_norm(norm, proj.forward(x.clone()).reshape([tokens, heads, d]))
        };
        let q = grail_kernels::rope(
            project(&self.q_proj, self.num_heads, &self.q_norm),
            cos.clone(),
            sin.clone(),
        );
        let k = grail_kernels::rope(
            project(&self.k_proj, self.num_kv_heads, &self.k_norm),
            cos,
            sin,
        );
        (q, k, project(&self.v_proj, self.num_kv_heads, &None))
    }

    /// Packed rows through the fused kernels: RoPE, then causal attention per segment in one call.
    fn forward_varlen(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        segments: &[Segment],
    ) -> Tensor<3> {
        let [rows, cols, _] = x.dims();
        let d = self.head_dim;
        let (q, k, v) = self.rotated_qkv(x, cos, sin);
        let ranges: Vec<(usize, usize)> = segments
            .iter()
            .map(|s| (s.row * cols + s.start, s.len))
            .collect();
        let scale = 1.0 / (d as f32).sqrt();
        let out = grail_kernels::varlen_attention(q, k, v, &ranges, scale);
        self.o_proj
            .forward(out.reshape([rows, cols, self.num_heads * d]))
    }
}

/// A tensor's values on the host, as f32.
fn host_f32(t: Tensor<3>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 activations")
}
