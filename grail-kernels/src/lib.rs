//! grail-kernels: the fused operations of grail's hot path, as burn backend extensions, and the
//! choice of device they run on.
//!
//! One folder per op. Its `mod.rs` holds the op's backend trait, its autodiff node (one backward
//! node per op, calling the inner backend's backward kernel) and the tensor-level entry point;
//! `cpu.rs` beside it holds the CPU kernel (on plain `f32` slices, parallel with rayon) and its
//! implementation for Flex, `cube.rs` the `#[cube]` kernels and the implementation for the
//! CubeCL backends (`vulkan`/`cuda` features).
//!
//! - [`attention`]: causal attention over packed (varlen) sequences, and attention of new tokens
//!   to KV caches for generation;
//! - [`linear`](mod@linear), [`rms_norm`](mod@rms_norm), [`swiglu`](mod@swiglu),
//!   [`rope`](mod@rope): the rest of a decoder layer;
//! - [`logprob`]: per-token log-probs of selected tokens straight from final hidden states and
//!   the lm_head weight, in tiles, so that the `[tokens × vocab]` logits never exist;
//! - [`optim`]: AdamW in one pass, and the sums of squares and scaling of gradient clipping.
//!
//! Routing: `#[backend_extension]` dispatches a call to the backend its tensors live on; other
//! backends (none ship today) have no implementation, so callers check [`supported`] first (the
//! model falls back to unfused tensor math where it is false). Every op keeps only what its
//! backward needs: attention the per-row log-sum-exp (O(tokens), never the `[len × len]`
//! probabilities), RMSNorm the inverse RMS per row, SwiGLU its two inputs, RoPE nothing but the
//! cos/sin tables, the log-probs the per-token log-sum-exp.
//!
//! ```no_run
//! use burn::tensor::{Distribution, Tensor};
//! let device = grail_kernels::device::parse_device("cpu").unwrap();
//! let x = Tensor::<2>::random([4, 8], Distribution::Default, &device);
//! let w = Tensor::<1>::ones([8], &device);
//! let y = grail_kernels::rms_norm(x, w, 1e-6);
//! ```
#![warn(missing_docs)]

use burn::backend::DispatchDevice;
use burn::tensor::{DType, Device};

pub mod attention;
mod autodiff;
mod cpu_gemm;
mod cpu_math;
#[cfg(any(feature = "vulkan", feature = "cuda"))]
mod cube_gemm;
#[cfg(any(feature = "vulkan", feature = "cuda"))]
mod cube_launch;
pub mod device;
mod flex_io;
pub mod linear;
pub mod logprob;
pub mod optim;
pub mod rms_norm;
pub mod rope;
pub mod swiglu;

pub use attention::{CachedSpan, PagedSpan, cached_attention, paged_attention, varlen_attention};
pub use device::parse_device;
pub use linear::{PANEL, linear, linear_panels, panel_order, row_order, to_panel_order};
pub use logprob::{
    ChunkSizes, SelectiveLogProbs, gradient_surrogate, naive_selective_logprobs,
    selective_logprobs, selective_logprobs_backward, selective_logprobs_forward,
};
pub use optim::{AdamWStep, adamw, scale, sum_squares};
pub use rms_norm::rms_norm;
pub use rope::rope;
pub use swiglu::swiglu;

/// Whether the fused ops run on `device`: Flex (the CPU kernels) and, with the `vulkan`/`cuda`
/// features, the CubeCL backends; with or without autodiff.
pub fn supported(device: &Device) -> bool {
    match device.clone().inner().as_dispatch() {
        DispatchDevice::Flex(_) => true,
        #[cfg(any(feature = "vulkan", feature = "cuda"))]
        DispatchDevice::Cube(_) => true,
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

/// Whether the device's tensors live in host memory, where the CPU-only paths (the host KV cache
/// and its cached-attention kernel used by generation) can read them directly.
pub fn host_kernels(device: &Device) -> bool {
    matches!(
        device.clone().inner().as_dispatch(),
        DispatchDevice::Flex(_)
    )
}

/// Whether the fused ops can take tensors of this dtype (the kernels are f32).
pub fn supported_dtype(dtype: DType) -> bool {
    dtype == DType::F32
}

/// Whether the fused ops take a layer's weight of `dtype` on `device` (the activations being
/// f32): f32 wherever they run, and bf16 on Flex, whose CPU kernels widen it as they read it
/// (a rollout copy's matrices held at bf16: half the bytes each decode step streams).
pub fn supported_weight(device: &Device, dtype: DType) -> bool {
    supported(device) && (supported_dtype(dtype) || dtype == DType::BF16 && host_kernels(device))
}
