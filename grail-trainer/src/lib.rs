//! grail-trainer: the GRPO trainer (advantages, fused chunked log-probs and losses, sequence
//! packing, token-budget micro-batches, AdamW, train state, MFU).
//!
//! Not built yet: this crate is a workspace member so that the trainer can grow on top of
//! `grail_core::model::CausalLm::forward_hidden` with packed layouts (see the trainer issue and
//! `docs/architecture.md`).
