//! The trainer's check of rollout objects from workers it does not control (`grpo.verify_rollouts`,
//! on by default with a store), before any of an object's groups can train: every prompt lies in
//! a block its worker claimed and is the environment's prompt for its index, every completion
//! ends where the run's generation stops, the rewards are recomputed by the trainer's own
//! reward functions ([`grail_rollout::group_check`]), every token of a secret share of the
//! groups is recomputed with the weights of the version that sampled it and those groups' tokens
//! must look drawn by the run's sampler ([`grail_rollout::verify`]), and no prompt is accepted
//! twice.
//! A worker whose objects keep failing is quarantined.
//!
//! The workers commit to their hidden states with the sketch seed the trainer publishes in the
//! run's manifest (`run/sketch_seed`, kept across resumes so running workers stay valid); the
//! positions it challenges come from a secret that never leaves this process.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use burn::module::Module;
use grail_core::model::{CausalLm, NamedTensorSource};
use grail_protocol::{Group, NamedTensor, PolicyVersion, Sample};
use grail_rollout::generate::GenerationConfig;
use grail_rollout::group_check::check_group;
use grail_rollout::verify::{Rejection, RolloutVerifier};
use grail_rollout::{Environment, PromptLimits};
use grail_store::{RolloutBatch, Store, layout};

use crate::evaluate::prompt_at;

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

    /// The versions whose weights are held.
    fn versions(&self) -> BTreeSet<PolicyVersion> {
        let models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        models.keys().copied().collect()
    }

    fn get(&self, version: PolicyVersion) -> Option<CausalLm> {
        let models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        models.get(&version).cloned()
    }
}

/// Why an object is refused: a short name (per-worker, per-reason counts) and the message logged.
#[derive(Debug)]
pub(crate) struct Refusal {
    /// `identity`, `schema`, `quarantined`, `claim`, `duplicate`, `store`, or a
    /// [`Rejection::reason`].
    pub reason: &'static str,
    /// What was wrong, naming the prompt and sample.
    pub message: String,
}

impl Refusal {
    pub(crate) fn new(reason: &'static str, message: String) -> Self {
        Self { reason, message }
    }
}

/// What the verification checks a rollout object against: the run's prompts and rewards, its
/// generation settings, its prompt claims and the weights the workers sampled with.
pub(crate) struct Verification {
    verifier: RolloutVerifier,
    policies: RecentPolicies,
    env: Arc<dyn Environment>,
    limits: PromptLimits,
    generation: GenerationConfig,
    store: Store,
    /// Prompts per claimed block.
    claim_block: u64,
    /// Claimed blocks and their workers (a claim is written once, so it is read once).
    claims: HashMap<u64, String>,
    /// Prompts whose groups were accepted in this attempt, and from which worker (an object
    /// from before a resume names versions the trainer no longer holds: refused anyway).
    accepted: HashMap<u64, String>,
    /// Hashes of the accepted groups' prompts, tokens and log-probs: a group copied under
    /// another index of the same prompt text (datasets wrap around) is still a copy.
    accepted_groups: HashMap<u64, String>,
    /// Failed objects per worker.
    failures: BTreeMap<String, u64>,
    /// Failed objects after which a worker's objects are refused unread (0: never).
    quarantine_after: u64,
    /// The share of each object's groups the model recomputes.
    verify_fraction: f64,
}

/// The run's settings a [`Verification`] checks against.
pub(crate) struct RunRules {
    /// The training environment (prompts by index, reward functions).
    pub env: Arc<dyn Environment>,
    /// The prompt limits the workers apply.
    pub limits: PromptLimits,
    /// The workers' generation settings (sampling, EOS, stop sequences, length).
    pub generation: GenerationConfig,
    /// Prompts per block a worker claims.
    pub claim_block: u64,
    /// Failed objects after which a worker is quarantined (0: never).
    pub quarantine_after: u64,
    /// The share of each object's groups the model recomputes (at least one).
    pub verify_fraction: f64,
}

impl Verification {
    /// Checks with `seed` (published) and a fresh secret against `rules` and `policies`.
    pub(crate) fn new(
        store: Store,
        seed: [u8; 32],
        policies: RecentPolicies,
        rules: RunRules,
    ) -> Self {
        Self {
            verifier: RolloutVerifier::new(seed, rand::random(), rules.generation.sampling.clone()),
            policies,
            env: rules.env,
            limits: rules.limits,
            generation: rules.generation,
            store,
            claim_block: rules.claim_block.max(1),
            claims: HashMap::new(),
            accepted: HashMap::new(),
            accepted_groups: HashMap::new(),
            failures: BTreeMap::new(),
            quarantine_after: rules.quarantine_after,
            verify_fraction: rules.verify_fraction,
        }
    }

    /// Why `batch` must be refused, if it must: its worker is quarantined, sent a prompt it did
    /// not claim, a group that fails a check, or a prompt already accepted. An accepted
    /// object's rewards are replaced by the environment's. Its worker is the one whose folder
    /// holds it (the caller checked).
    pub(crate) fn check(&mut self, batch: &mut RolloutBatch) -> Result<(), Refusal> {
        let worker = batch.worker_id.clone();
        let failed = self.failures.get(&worker).copied().unwrap_or(0);
        if self.quarantine_after > 0 && failed >= self.quarantine_after {
            return Err(Refusal::new(
                "quarantined",
                format!("worker `{worker}` is quarantined ({failed} objects failed verification)"),
            ));
        }
        let refusal = match self.find_fault(batch) {
            Ok(()) => {
                for g in &batch.groups {
                    self.accepted.insert(g.prompt_id, worker.clone());
                    self.accepted_groups.insert(group_hash(g), worker.clone());
                }
                return Ok(());
            }
            Err(refusal) => refusal,
        };
        // Weights the trainer no longer holds (stale, or before a resume), the store's errors
        // and the trainer's own forward failing say nothing about the worker's honesty.
        if !matches!(refusal.reason, "unknown_version" | "store" | "forward") {
            let n = self.failures.entry(worker.clone()).or_default();
            *n += 1;
            if self.quarantine_after > 0 && *n == self.quarantine_after {
                tracing::warn!(
                    worker = %worker,
                    "worker quarantined: {n} objects failed verification; its objects are refused from now on"
                );
            }
        }
        Err(refusal)
    }

    /// The first fault of `batch`, cheapest checks first: the model's forward comes last but
    /// one, and the duplicate check last (a replayed group passes every other check).
    fn find_fault(&mut self, batch: &mut RolloutBatch) -> Result<(), Refusal> {
        let worker = batch.worker_id.as_str();
        for g in batch.groups.iter_mut() {
            let block = g.prompt_id / self.claim_block;
            let claimant = self.claimant(block)?;
            if claimant.as_deref() != Some(worker) {
                let by = claimant.map_or("nobody".to_string(), |w| format!("worker `{w}`"));
                return Err(Refusal::new(
                    "claim",
                    format!(
                        "prompt {}: its block {block} was claimed by {by}, not `{worker}`",
                        g.prompt_id
                    ),
                ));
            }
            let prompt = match prompt_at(self.env.as_ref(), g.prompt_id, &self.limits) {
                Ok(Some(p)) => p,
                Ok(None) => {
                    return Err(Refusal::new(
                        "prompt",
                        format!("prompt {}: the environment has no such prompt", g.prompt_id),
                    ));
                }
                Err(e) => {
                    return Err(Refusal::new(
                        "prompt",
                        format!("prompt {}: {e:#}", g.prompt_id),
                    ));
                }
            };
            if let Err((i, why)) = check_group(self.env.as_ref(), &prompt, &self.generation, g) {
                return Err(rejected(g.prompt_id, i, why));
            }
        }
        // Every group's versions, not only the picked ones: labels from before a resume must
        // not ride along with a group that passes.
        let held = self.policies.versions();
        for g in &batch.groups {
            for (i, s) in g.samples.iter().enumerate() {
                if let Some(&version) = s.token_versions.iter().find(|v| !held.contains(v)) {
                    return Err(rejected(
                        g.prompt_id,
                        i,
                        Rejection::UnknownVersion { version },
                    ));
                }
            }
        }
        // The groups the model recomputes, picked in secret, all their samples in packed
        // forwards (one per version that sampled them).
        let groups = batch.groups.len();
        let picked =
            ((self.verify_fraction * groups as f64).ceil() as usize).clamp(1, groups.max(1));
        let mut picked =
            rand::seq::index::sample(&mut rand::rng(), groups, picked.min(groups)).into_vec();
        picked.sort_unstable();
        let items: Vec<(u64, usize, &[u32], &Sample)> = picked
            .iter()
            .flat_map(|&g| {
                let g = &batch.groups[g];
                g.samples
                    .iter()
                    .enumerate()
                    .map(move |(i, s)| (g.prompt_id, i, g.prompt_ids.as_slice(), s))
            })
            .collect();
        let pairs: Vec<(&[u32], &Sample)> = items.iter().map(|&(_, _, p, s)| (p, s)).collect();
        let at = |v: PolicyVersion| self.policies.get(v);
        let mut verdicts = Vec::with_capacity(items.len());
        for (&(prompt_id, i, _, _), result) in
            items.iter().zip(self.verifier.check_all(&at, &pairs))
        {
            verdicts.push(result.map_err(|why| rejected(prompt_id, i, why))?);
        }
        // Each picked group's tokens, no likelier than the run's sampler draws them.
        let mut verdicts = verdicts.as_slice();
        for &g in &picked {
            let group = &batch.groups[g];
            let (these, rest) = verdicts.split_at(group.samples.len());
            verdicts = rest;
            if let Err(why) = self.verifier.check_sampling(these) {
                return Err(Refusal::new(
                    why.reason(),
                    format!("prompt {}: {why}", group.prompt_id),
                ));
            }
        }
        let (mut seen, mut seen_groups) = (HashSet::new(), HashSet::new());
        for g in &batch.groups {
            let (id, hash) = (g.prompt_id, group_hash(g));
            let earlier = match (self.accepted.get(&id), self.accepted_groups.get(&hash)) {
                (Some(w), _) => Some(format!("was already accepted from worker `{w}`")),
                (None, Some(w)) => Some(format!("equal to one accepted from worker `{w}`")),
                _ if !seen.insert(id) || !seen_groups.insert(hash) => {
                    Some("comes twice in this object".to_string())
                }
                _ => None,
            };
            if let Some(earlier) = earlier {
                return Err(Refusal::new(
                    "duplicate",
                    format!("prompt {id}: a group {earlier}"),
                ));
            }
        }
        Ok(())
    }

    /// The worker that claimed prompt block `block`, if any.
    fn claimant(&mut self, block: u64) -> Result<Option<String>, Refusal> {
        if let Some(w) = self.claims.get(&block) {
            return Ok(Some(w.clone()));
        }
        let key = layout::claim_key(block);
        let bytes = self
            .store
            .get(&key)
            .map_err(|e| Refusal::new("store", format!("reading {key}: {e}")))?;
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let worker = String::from_utf8_lossy(&bytes).trim().to_string();
        self.claims.insert(block, worker.clone());
        Ok(Some(worker))
    }
}

/// A hash of what makes `group` the worker's: its prompt and every sample's tokens and
/// log-probs (an honest group sampled again from the same prompt differs in them).
fn group_hash(group: &Group) -> u64 {
    let mut h = DefaultHasher::new();
    group.prompt_ids.hash(&mut h);
    for s in &group.samples {
        s.completion_ids.hash(&mut h);
        for l in &s.behaviour_logps {
            l.to_bits().hash(&mut h);
        }
    }
    h.finish()
}

fn rejected(prompt_id: u64, sample: usize, why: Rejection) -> Refusal {
    Refusal::new(
        why.reason(),
        format!("prompt {prompt_id} sample {sample}: {why}"),
    )
}
