//! The check of a completion that an untrusted worker claims to have sampled: the GRAIL proof's
//! sketches at challenged positions, every behaviour log-prob, and the sampled tokens'
//! plausibility under the run's sampling settings, all against the verifier's own forward with
//! the weights of the version that sampled each token.
//!
//! The worker cannot know which positions are challenged: they are drawn from the completion's
//! tokens and a secret only the verifier holds ([`challenge_positions`]). A sketch counts as
//! matching when it is within [`RolloutVerifier::sketch_tolerance`] of the recomputed one, and a
//! completion passes when at least [`RolloutVerifier::min_matching_sketches`] of its challenged
//! positions match: all but one exactly equal by default (a decode step and a packed forward of
//! the same weights round differently, and once in a great many positions an activation crosses
//! a bucket's edge), a measured allowance for another backend's arithmetic (docs/architecture.md,
//! verifiable rollouts, says why grail's wide tolerance is not the default).
//!
//! Every token being one the sampler *could* draw does not show that it was drawn: a worker
//! that decodes greedily or at a lower temperature than the run's, and reports the model's true
//! log-probs, passes every per-token check while its importance ratios lie. The challenged
//! positions also give [`SamplingEvidence`]: how much likelier the chosen tokens are than the
//! run's sampler makes them on average, tested over a group by [`RolloutVerifier::check_sampling`].

use std::collections::BTreeSet;
use std::fmt;

use burn::tensor::{Int, Tensor, TensorData};
use grail_core::model::CausalLm;
use grail_protocol::proof::{
    CHALLENGE_K, SketchCoefficients, challenge_positions, sketch_distance,
};
use grail_protocol::{PolicyVersion, Sample};
use rayon::prelude::*;

use crate::sampling::{SamplingConfig, candidate_set, log_softmax, penalised_logits, truncates};

/// Tokens (prompts and completions) per packed forward of [`RolloutVerifier::check_all`].
pub const VERIFY_TOKENS: usize = 16_384;

/// What the verifier accepts, and the secrets it checks with.
#[derive(Debug, Clone)]
pub struct RolloutVerifier {
    /// The seed the workers were given for their sketches (published).
    pub sketch_seed: [u8; 32],
    /// The verifier's secret, which picks the challenged positions (never published).
    pub challenge_secret: [u8; 32],
    /// Positions challenged per completion (all of them in a shorter one).
    pub challenges: usize,
    /// Challenged positions whose sketches must match.
    pub min_matching_sketches: usize,
    /// The largest sketch distance that counts as a match (0: exact equality).
    pub sketch_tolerance: u32,
    /// The largest accepted |claimed − recomputed| behaviour log-prob, for every token.
    pub logprob_tolerance: f32,
    /// How the run samples: a challenged token must be one this sampler could have drawn.
    pub sampling: SamplingConfig,
    /// Slack, in log-prob, at the edge of the candidate set (another backend's rounding can move
    /// a token across it).
    pub candidate_slack: f32,
    /// The largest accepted [`SamplingEvidence::z`] of a group: chosen tokens likelier than the
    /// sampler draws by this many standard deviations are refused.
    pub max_sampling_z: f64,
    /// Challenged positions a group needs before its sampling evidence is tested (fewer are
    /// too few for the normal approximation the limit assumes).
    pub min_sampling_positions: usize,
}

impl RolloutVerifier {
    /// A verifier for workers on the same backend as the verifier: all challenged sketches but
    /// one exactly equal, log-probs within 10⁻³, a group's tokens no likelier than its sampler
    /// draws by more than 5 standard deviations.
    pub fn new(
        sketch_seed: [u8; 32],
        challenge_secret: [u8; 32],
        sampling: SamplingConfig,
    ) -> Self {
        Self {
            sketch_seed,
            challenge_secret,
            challenges: CHALLENGE_K,
            min_matching_sketches: CHALLENGE_K - 1,
            sketch_tolerance: 0,
            logprob_tolerance: 1e-3,
            sampling,
            candidate_slack: 1e-3,
            max_sampling_z: 5.0,
            min_sampling_positions: 32,
        }
    }

    /// Checks the sampling evidence of one group's completions (their verdicts from
    /// [`check_all`](Self::check_all)), summed: refused when the chosen tokens are likelier than
    /// the run's sampler draws by more than [`max_sampling_z`](Self::max_sampling_z).
    pub fn check_sampling(&self, verdicts: &[Verified]) -> Result<(), Rejection> {
        let mut evidence = SamplingEvidence::default();
        for v in verdicts {
            evidence.add(&v.sampling);
        }
        if evidence.positions < self.min_sampling_positions {
            return Ok(());
        }
        let z = evidence.z();
        if z > self.max_sampling_z {
            return Err(Rejection::Sampling {
                z,
                positions: evidence.positions,
            });
        }
        Ok(())
    }

    /// Checks one completion of `prompt`. `model_at` gives the weights of a policy version (or
    /// `None` when the verifier no longer holds them); each token is checked with its own
    /// version's.
    pub fn check(
        &self,
        model_at: &dyn Fn(PolicyVersion) -> Option<CausalLm>,
        prompt: &[u32],
        sample: &Sample,
    ) -> Result<Verified, Rejection> {
        let mut results = self.check_all(model_at, &[(prompt, sample)]);
        results.pop().expect("one result per completion")
    }

    /// [`check`](Self::check) of several completions (each with its prompt), in packed forwards
    /// of up to [`VERIFY_TOKENS`] tokens per version: one result per completion, in order.
    pub fn check_all(
        &self,
        model_at: &dyn Fn(PolicyVersion) -> Option<CausalLm>,
        items: &[(&[u32], &Sample)],
    ) -> Vec<Result<Verified, Rejection>> {
        let mut results: Vec<Result<Verified, Rejection>> =
            items.iter().map(|_| Ok(Verified::default())).collect();
        let mut challenged: Vec<Vec<usize>> = vec![Vec::new(); items.len()];
        for (i, (prompt, sample)) in items.iter().enumerate() {
            let n = sample.completion_ids.len();
            if sample.behaviour_logps.len() != n || sample.token_versions.len() != n {
                results[i] = Err(Rejection::Malformed(format!(
                    "{n} completion tokens, {} behaviour log-probs, {} token versions",
                    sample.behaviour_logps.len(),
                    sample.token_versions.len()
                )));
                continue;
            }
            if n > 0 && sample.sketches.len() != n {
                results[i] = Err(Rejection::MissingSketches {
                    tokens: n,
                    sketches: sample.sketches.len(),
                });
                continue;
            }
            let tokens: Vec<u32> = prompt
                .iter()
                .chain(&sample.completion_ids)
                .copied()
                .collect();
            let k = self.challenges.min(n);
            challenged[i] = challenge_positions(&tokens, &self.challenge_secret, 0..n, k);
            if let Ok(v) = &mut results[i] {
                v.challenged = challenged[i].len();
            }
        }
        let versions: BTreeSet<PolicyVersion> = items
            .iter()
            .flat_map(|(_, s)| s.token_versions.iter().copied())
            .collect();
        for version in versions {
            let mut batch: Vec<usize> = (0..items.len())
                .filter(|&i| results[i].is_ok() && items[i].1.token_versions.contains(&version))
                .collect();
            let Some(model) = model_at(version) else {
                for i in batch {
                    results[i] = Err(Rejection::UnknownVersion { version });
                }
                continue;
            };
            let vocab = model.config.vocab_size;
            batch.retain(|&i| {
                let (prompt, sample) = items[i];
                let outside = prompt
                    .iter()
                    .chain(&sample.completion_ids)
                    .find(|&&t| t as usize >= vocab);
                if let Some(&id) = outside {
                    results[i] = Err(Rejection::OutsideVocabulary { id, vocab });
                }
                outside.is_none()
            });
            // Packed forwards of a bounded number of tokens each.
            let mut start = 0;
            while start < batch.len() {
                let mut end = start + 1;
                let mut tokens =
                    items[batch[start]].0.len() + items[batch[start]].1.completion_ids.len();
                while end < batch.len() {
                    let (p, s) = items[batch[end]];
                    if tokens + p.len() + s.completion_ids.len() > VERIFY_TOKENS {
                        break;
                    }
                    tokens += p.len() + s.completion_ids.len();
                    end += 1;
                }
                let chunk = &batch[start..end];
                start = end;
                if let Err(e) =
                    self.check_version(&model, version, items, chunk, &challenged, &mut results)
                {
                    for &i in chunk {
                        results[i] = Err(Rejection::Forward(e.to_string()));
                    }
                }
            }
        }
        for r in &mut results {
            if let Ok(v) = r
                && v.matching < self.min_matching_sketches.min(v.challenged)
            {
                *r = Err(Rejection::Sketches {
                    matching: v.matching,
                    challenged: v.challenged,
                });
            }
        }
        results
    }

    /// Checks the tokens `version` sampled in completions `chunk` of `items` with its weights
    /// `model`, from one packed forward; a failing completion's result becomes its rejection.
    fn check_version(
        &self,
        model: &CausalLm,
        version: PolicyVersion,
        items: &[(&[u32], &Sample)],
        chunk: &[usize],
        challenged: &[Vec<usize>],
        results: &mut [Result<Verified, Rejection>],
    ) -> grail_core::Result<()> {
        let sequences: Vec<(&[u32], &[u32])> = chunk
            .iter()
            .map(|&i| (items[i].0, items[i].1.completion_ids.as_slice()))
            .collect();
        let hidden = model.completions_hidden(&sequences)?;
        let targets: Vec<u32> = sequences
            .iter()
            .flat_map(|(_, c)| c.iter().copied())
            .collect();
        // Greedy runs record log-probs at temperature 1 (`sampling::log_softmax`).
        let temperature = match self.sampling.temperature {
            t if t > 0.0 => f64::from(t),
            _ => 1.0,
        };
        let logps = model.token_logprobs(hidden.clone(), &targets, temperature);
        // Every challenged row of this version, over the chunk: one projection to logits.
        let mut rows = Vec::new();
        let mut offset = 0;
        for &i in chunk {
            let sample = items[i].1;
            let n = sample.completion_ids.len();
            let ours = |j: &usize| sample.token_versions[*j] == version;
            for j in (0..n).filter(ours) {
                let (claimed, recomputed) = (sample.behaviour_logps[j], logps[offset + j]);
                // Written so that a NaN claim fails too.
                let close = (claimed - recomputed).abs() <= self.logprob_tolerance;
                if !close && results[i].is_ok() {
                    results[i] = Err(Rejection::LogProb {
                        token: j,
                        claimed,
                        recomputed,
                    });
                }
            }
            if results[i].is_ok() {
                rows.extend(
                    challenged[i]
                        .iter()
                        .copied()
                        .filter(|j| ours(j))
                        .map(|j| (i, j, offset + j)),
                );
            }
            offset += n;
        }
        if rows.is_empty() {
            return Ok(());
        }
        let picked: Vec<i64> = rows.iter().map(|&(_, _, r)| r as i64).collect();
        let picked =
            Tensor::<1, Int>::from_data(TensorData::new(picked, [rows.len()]), &hidden.device());
        let hidden = hidden.select(0, picked);
        let logits = host(model.logits(hidden.clone()));
        let hidden = host(hidden);
        let coefficients = SketchCoefficients::for_version(&self.sketch_seed, version);
        let width = hidden.len() / rows.len();
        let vocab = logits.len() / rows.len();
        // Each row on its own (a pass or two over the vocabulary), in parallel.
        let verdicts: Vec<(bool, Option<SamplingEvidence>, bool)> = rows
            .par_iter()
            .enumerate()
            .map(|(r, &(i, j, _))| {
                let sample = items[i].1;
                let sketch = coefficients.sketch(&hidden[r * width..(r + 1) * width]);
                let matches = sketch_distance(sample.sketches[j], sketch) <= self.sketch_tolerance;
                let completion = &sample.completion_ids;
                let row = &logits[r * vocab..(r + 1) * vocab];
                let row = penalised_logits(row, &completion[..j], self.sampling.repetition_penalty);
                let logprobs = log_softmax(&row, self.sampling.temperature);
                let evidence = self.sampling_excess(&logprobs, completion[j]);
                (
                    matches,
                    evidence,
                    self.could_sample(&logprobs, completion[j]),
                )
            })
            .collect();
        for (&(i, j, _), (matches, evidence, plausible)) in rows.iter().zip(verdicts) {
            let Ok(verified) = &mut results[i] else {
                continue;
            };
            verified.matching += usize::from(matches);
            if let Some(evidence) = evidence {
                verified.sampling.add(&evidence);
            }
            if !plausible {
                let id = items[i].1.completion_ids[j];
                results[i] = Err(Rejection::Implausible { token: j, id });
            }
        }
        Ok(())
    }

    /// Whether the run's sampler could have drawn `token` from a row's `logprobs` (penalised and
    /// tempered; within [`candidate_slack`](Self::candidate_slack) of the candidate set's edge).
    ///
    /// The candidate set (`sampling::candidate_set`) keeps the tokens above the min-p floor,
    /// then the top k of those, then the likeliest of those until their mass reaches top-p; so a
    /// token is in it when it clears the floor, fewer than k tokens are likelier, and the
    /// likelier ones hold less than top-p. One pass over the vocabulary, no sort.
    fn could_sample(&self, logprobs: &[f32], token: u32) -> bool {
        let cfg = &self.sampling;
        let Some(&mine) = logprobs.get(token as usize) else {
            return false;
        };
        let best = logprobs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if cfg.temperature == 0.0 {
            return mine >= best - self.candidate_slack;
        }
        if cfg.min_p > 0.0 && mine < best + cfg.min_p.ln() - self.candidate_slack {
            return false;
        }
        // Likelier by more than the slack: rounding cannot have ordered these after it.
        let (likelier, mass) = logprobs
            .iter()
            .filter(|&&l| l > mine + self.candidate_slack)
            .fold((0usize, 0f32), |(n, m), &l| (n + 1, m + l.exp()));
        let in_top_k = cfg.top_k == 0 || likelier < cfg.top_k;
        let in_top_p = cfg.top_p >= 1.0 || mass < cfg.top_p;
        in_top_k && in_top_p
    }

    /// `½ − u` and its variance under `q`, where `q` is the distribution the run's sampler draws
    /// from given a row's `logprobs` (penalised and tempered; then truncated, renormalised) and
    /// `u` is where `token` sits in it: the mass of the likelier tokens plus half its own (`½ − u`
    /// is positive for tokens likelier than a typical draw). `None` for greedy runs (nothing is
    /// drawn) and for a token outside the recomputed candidate set (let in by the slack, it says
    /// nothing).
    fn sampling_excess(&self, logprobs: &[f32], token: u32) -> Option<SamplingEvidence> {
        let cfg = &self.sampling;
        if cfg.temperature == 0.0 {
            return None;
        }
        if truncates(cfg, logprobs.len()) {
            let candidates = candidate_set(logprobs, cfg);
            let mine = candidates.iter().find(|&&(t, _)| t == token)?.1;
            Some(excess_among(candidates.iter().map(|&(_, l)| l), mine))
        } else {
            Some(excess_among(
                logprobs.iter().copied(),
                *logprobs.get(token as usize)?,
            ))
        }
    }
}

/// The [`SamplingEvidence`] of one position: the chosen token's log-prob `mine` among the
/// `candidates`' (renormalised over them).
fn excess_among(candidates: impl Iterator<Item = f32>, mine: f32) -> SamplingEvidence {
    // One pass, normalised at the end: Σ p, the mass above the token (half of its ties'), Σ p³.
    let (mut total, mut above, mut cubes) = (0.0f64, 0.0f64, 0.0f64);
    for l in candidates {
        let p = f64::from(l.exp());
        total += p;
        cubes += p * p * p;
        if l > mine {
            above += p;
        } else if l == mine {
            above += p / 2.0;
        }
    }
    SamplingEvidence {
        excess: 0.5 - above / total,
        variance: (1.0 - cubes / (total * total * total)).max(0.0) / 12.0,
        positions: 1,
    }
}

/// Where the challenged tokens sit in the distributions the run's sampler draws them from: the
/// sum over positions of `½ − u`, where `u` is the mass of the tokens likelier than the chosen
/// one plus half its own (the excess), and of its variance under the sampler,
/// `(1 − Σ q³) / 12`.
///
/// Given the tokens before it, each term has mean 0 when the token was drawn from `q`, and lies
/// within ±½, so over many positions the excess of an honest worker is about normal with the
/// summed variance (a martingale's central limit), whatever the distributions' shapes (unlike
/// the log-prob's excess over the entropy, whose rare large terms a near-flat distribution
/// makes). A worker that keeps likelier tokens than `q` draws (greedy decoding, a lower
/// temperature, the best of several draws) pushes it up by a multiple of its standard
/// deviation that grows with the square root of the positions.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplingEvidence {
    /// Σ (½ − u) over the positions.
    pub excess: f64,
    /// Σ (1 − Σ q³) / 12 over the positions.
    pub variance: f64,
    /// Positions summed.
    pub positions: usize,
}

impl SamplingEvidence {
    /// Adds `other`'s positions.
    pub fn add(&mut self, other: &SamplingEvidence) {
        self.excess += other.excess;
        self.variance += other.variance;
        self.positions += other.positions;
    }

    /// The excess in standard deviations (0 when nothing was random: every position had one
    /// candidate).
    pub fn z(&self) -> f64 {
        if self.variance > 1e-12 {
            self.excess / self.variance.sqrt()
        } else {
            0.0
        }
    }
}

/// What a passing completion showed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Verified {
    /// Positions challenged.
    pub challenged: usize,
    /// Of those, whose sketches matched.
    pub matching: usize,
    /// How likely its challenged tokens are under the run's sampler (tested per group by
    /// [`RolloutVerifier::check_sampling`]).
    pub sampling: SamplingEvidence,
}

/// Why a completion was rejected.
#[derive(Debug, Clone, PartialEq)]
pub enum Rejection {
    /// Not one sketch per completion token.
    MissingSketches {
        /// Completion tokens.
        tokens: usize,
        /// Sketches sent.
        sketches: usize,
    },
    /// Too few challenged sketches matched the recomputed ones.
    Sketches {
        /// Sketches that matched.
        matching: usize,
        /// Positions challenged.
        challenged: usize,
    },
    /// A behaviour log-prob is not the model's.
    LogProb {
        /// Index of the completion token.
        token: usize,
        /// What the worker sent.
        claimed: f32,
        /// What the verifier computed.
        recomputed: f32,
    },
    /// A challenged token lies outside what the run's sampler could draw.
    Implausible {
        /// Index of the completion token.
        token: usize,
        /// The token id.
        id: u32,
    },
    /// A group's challenged tokens are likelier than the run's sampler draws (greedy decoding or
    /// a lower temperature than claimed): see [`SamplingEvidence`].
    Sampling {
        /// The group's excess in standard deviations.
        z: f64,
        /// Challenged positions it summed.
        positions: usize,
    },
    /// A token claims a version whose weights the verifier does not hold.
    UnknownVersion {
        /// The claimed version.
        version: PolicyVersion,
    },
    /// A prompt or completion token is not in the model's vocabulary.
    OutsideVocabulary {
        /// The token id.
        id: u32,
        /// The vocabulary's size.
        vocab: usize,
    },
    /// The verifier's own forward failed.
    Forward(String),
    /// The sample's columns do not line up (one log-prob and one version per token).
    Malformed(String),
    /// The group's prompt is not the environment's prompt for the claimed index.
    Prompt {
        /// The claimed prompt index.
        prompt_id: u64,
        /// What differs (or why the environment has no such prompt).
        why: String,
    },
    /// A completion does not end where the run's generation stops: it goes on after an EOS
    /// or stop sequence, or stops short of both and of `max_completion_length`.
    Termination {
        /// Tokens in the completion.
        tokens: usize,
        /// Where generation would have stopped (`None`: it would not have).
        stops_after: Option<usize>,
    },
    /// The rewards sent are not those the trainer's environment gives the completion.
    Rewards {
        /// What the worker sent.
        claimed: Vec<f32>,
        /// What the environment gives (or why it failed).
        recomputed: Result<Vec<f32>, String>,
    },
}

impl Rejection {
    /// A short name of the reason, for per-reason counts.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::MissingSketches { .. } => "missing_sketches",
            Rejection::Sketches { .. } => "sketches",
            Rejection::LogProb { .. } => "logprob",
            Rejection::Implausible { .. } => "implausible_token",
            Rejection::Sampling { .. } => "sampling",
            Rejection::UnknownVersion { .. } => "unknown_version",
            Rejection::OutsideVocabulary { .. } => "outside_vocabulary",
            Rejection::Forward(_) => "forward",
            Rejection::Malformed(_) => "malformed",
            Rejection::Prompt { .. } => "prompt",
            Rejection::Termination { .. } => "termination",
            Rejection::Rewards { .. } => "rewards",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::MissingSketches { tokens, sketches } => {
                write!(f, "{sketches} sketches for {tokens} completion tokens")
            }
            Rejection::Sketches {
                matching,
                challenged,
            } => write!(
                f,
                "{matching} of {challenged} challenged sketches match the recomputed ones"
            ),
            Rejection::LogProb {
                token,
                claimed,
                recomputed,
            } => write!(
                f,
                "token {token}: behaviour log-prob {claimed}, the model gives {recomputed}"
            ),
            Rejection::Implausible { token, id } => write!(
                f,
                "token {token} (id {id}) is outside what the sampling settings can draw"
            ),
            Rejection::Sampling { z, positions } => write!(
                f,
                "its tokens are likelier than the run's sampler draws: {z:.1} standard deviations \
                 over {positions} challenged positions"
            ),
            Rejection::UnknownVersion { version } => {
                write!(f, "policy version {version} is not held by the verifier")
            }
            Rejection::OutsideVocabulary { id, vocab } => {
                write!(f, "token id {id} is outside the vocabulary ({vocab})")
            }
            Rejection::Forward(e) => write!(f, "the verifier's forward failed: {e}"),
            Rejection::Malformed(e) => write!(f, "malformed sample: {e}"),
            Rejection::Prompt { prompt_id, why } => {
                write!(f, "prompt {prompt_id} is not the environment's: {why}")
            }
            Rejection::Termination {
                tokens,
                stops_after: Some(at),
            } => write!(
                f,
                "{tokens} completion tokens, but generation stops after {at} (EOS or stop sequence)"
            ),
            Rejection::Termination {
                tokens,
                stops_after: None,
            } => write!(
                f,
                "{tokens} completion tokens end with neither EOS nor a stop sequence, short of \
                 max_completion_length"
            ),
            Rejection::Rewards {
                claimed,
                recomputed: Ok(r),
            } => write!(f, "rewards {claimed:?}, the environment gives {r:?}"),
            Rejection::Rewards {
                claimed,
                recomputed: Err(e),
            } => write!(f, "rewards {claimed:?}, the environment fails: {e}"),
        }
    }
}

impl std::error::Error for Rejection {}

/// A tensor's values on the host.
fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 values")
}
