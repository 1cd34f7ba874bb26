//! grail-rollout: the rollout pool (batched KV-cache generation, sampling, behaviour log-probs,
//! rewards) that turns prompts into scored groups for the trainer.
//!
//! Not built yet: this crate is a workspace member so that the pool can grow on top of
//! `grail_core::model::CausalLm::forward_cached` (see the rollout issue and
//! `docs/architecture.md`).
