//! Fused operations of the trainer's hot path.
//!
//! - [`logprob`]: per-token log-probs of selected tokens straight from final hidden states and the
//!   lm_head weight, in chunks, so that the `[tokens × vocab]` logits never exist.

pub mod cpu;
#[cfg(any(feature = "vulkan", feature = "cuda"))]
pub mod cube;
#[cfg(any(feature = "vulkan", feature = "cuda"))]
mod cube_gemm;
pub mod logprob;
pub mod ops;

pub use logprob::{
    ChunkSizes, SelectiveLogProbs, gradient_surrogate, naive_selective_logprobs,
    selective_logprobs_backward, selective_logprobs_forward,
};
