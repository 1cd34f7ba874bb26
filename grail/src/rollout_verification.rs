//! The trainer's check of rollout objects from workers it does not control (`grpo.verify_rollouts`,
//! on by default with a store): every group is recomputed with the weights of the versions that
//! sampled it ([`grail_rollout::verify`]) before any of the object's groups can train, and a
//! worker whose objects keep failing is quarantined.
//!
//! The workers commit to their hidden states with the sketch seed the trainer publishes in the
//! run's manifest (`run/sketch_seed`, kept across resumes so running workers stay valid); the
//! positions it challenges come from a secret that never leaves this process.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use burn::module::Module;
use grail_core::model::{CausalLm, NamedTensorSource};
use grail_protocol::{NamedTensor, PolicyVersion};
use grail_rollout::sampling::SamplingConfig;
use grail_rollout::verify::{Rejection, RolloutVerifier};
use grail_store::{RolloutBatch, Store, layout};

/// The run's sketch seed: the one already in the store (a resumed trainer's workers use it),
/// else a new random one, written there.
pub(crate) fn sketch_seed(store: &Store) -> Result<[u8; 32]> {
    let key = format!("{}sketch_seed", layout::RUN);
    if let Some(bytes) = store.get(&key)? {
        return parse_seed(&bytes).with_context(|| format!("the run manifest's {key}"));
    }
    let seed: [u8; 32] = rand::random();
    store.put(&key, hex(&seed).into_bytes())?;
    Ok(seed)
}

/// The sketch seed a worker reads from the run's manifest.
pub(crate) fn read_sketch_seed(store: &Store) -> Result<[u8; 32]> {
    let key = format!("{}sketch_seed", layout::RUN);
    let bytes = store.get(&key)?.with_context(|| {
        format!("the trainer verifies rollouts (grpo.verify_rollouts) but published no {key}")
    })?;
    parse_seed(&bytes).with_context(|| format!("the run manifest's {key}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_seed(text: &[u8]) -> Result<[u8; 32]> {
    let text = std::str::from_utf8(text).context("not text")?.trim();
    anyhow::ensure!(
        text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()),
        "`{text}` is not 64 hexadecimal digits"
    );
    let mut seed = [0u8; 32];
    for (i, byte) in seed.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("checked hex");
    }
    Ok(seed)
}

/// The weights of the recent policy versions as the workers have them (rounded to the wire
/// dtype), shared by the trainer's publisher (which adds each version) and the inbox (which
/// checks with them).
#[derive(Clone, Default)]
pub(crate) struct RecentPolicies {
    models: Arc<Mutex<BTreeMap<PolicyVersion, CausalLm>>>,
}

impl RecentPolicies {
    /// Adds `version`, built from the `tensors` the workers receive, and forgets versions more
    /// than `keep` older (samples that old are dropped as stale anyway).
    pub(crate) fn add(
        &self,
        version: PolicyVersion,
        like: &CausalLm,
        tensors: &[NamedTensor],
        keep: u64,
    ) -> Result<()> {
        // The trainer's model may be on an autodiff device; the verifier needs no graph.
        let device = like.valid().device();
        let model = CausalLm::build(&like.config, &mut NamedTensorSource::new(tensors, &device))
            .context("the verifier's copy of the published weights")?;
        let mut models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        models.insert(version, model);
        models.retain(|&v, _| v + keep >= version);
        Ok(())
    }

    fn get(&self, version: PolicyVersion) -> Option<CausalLm> {
        let models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        models.get(&version).cloned()
    }
}

/// The inbox's verification state.
pub(crate) struct Verification {
    verifier: RolloutVerifier,
    policies: RecentPolicies,
    /// Failed objects per worker.
    failures: BTreeMap<String, u64>,
    /// Failed objects after which a worker's objects are refused unread (0: never).
    quarantine_after: u64,
}

impl Verification {
    /// Checks with `seed` (published) and a fresh secret, against the run's `sampling`.
    pub(crate) fn new(
        seed: [u8; 32],
        sampling: SamplingConfig,
        policies: RecentPolicies,
        quarantine_after: u64,
    ) -> Self {
        Self {
            verifier: RolloutVerifier::new(seed, rand::random(), sampling),
            policies,
            failures: BTreeMap::new(),
            quarantine_after,
        }
    }

    /// Why `batch` must be refused, if it must: its worker is quarantined, or one of its
    /// samples fails the check (the first one found, named).
    pub(crate) fn check(&mut self, batch: &RolloutBatch) -> Result<(), String> {
        let worker = &batch.worker_id;
        let failed = self.failures.get(worker).copied().unwrap_or(0);
        if self.quarantine_after > 0 && failed >= self.quarantine_after {
            return Err(format!(
                "worker `{worker}` is quarantined ({failed} objects failed verification)"
            ));
        }
        let at = |v: PolicyVersion| self.policies.get(v);
        for g in &batch.groups {
            for (i, s) in g.samples.iter().enumerate() {
                let Err(why) = self.verifier.check(&at, &g.prompt_ids, s) else {
                    continue;
                };
                // Weights the trainer no longer holds (stale, or before a resume) say nothing
                // about the worker's honesty.
                if !matches!(why, Rejection::UnknownVersion { .. }) {
                    let n = self.failures.entry(worker.clone()).or_default();
                    *n += 1;
                    if self.quarantine_after > 0 && *n == self.quarantine_after {
                        tracing::warn!(
                            worker = %worker,
                            "worker quarantined: {n} objects failed verification; its objects are refused from now on"
                        );
                    }
                }
                return Err(format!(
                    "verification ({}): prompt {} sample {i}: {why}",
                    why.reason(),
                    g.prompt_id
                ));
            }
        }
        Ok(())
    }
}
