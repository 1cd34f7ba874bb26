//! The arithmetic of the GRAIL proof (grail's proof version v5): a sketch of the model's last
//! hidden state that a rollout worker commits to for every completion token, and that a verifier
//! recomputes from its own forward at challenged positions.
//!
//! A sketch keeps the [`PROOF_TOPK`] activations of largest magnitude (in index order), maps each
//! to a signed logarithmic bucket ([`PROOF_NUM_BUCKETS`] per sign) and takes the dot product of
//! the buckets with coefficients in ±[`PROOF_COEFF_RANGE`] drawn from published randomness,
//! modulo [`PRIME_Q`]. Coarse buckets make it robust to the floating-point drift between
//! machines and backends; the verifier accepts a distance up to [`sketch_tolerance`]. The
//! constants and the derivation of the coefficients are the Python grail's
//! (one-covenant/grail, `grail/protocol/constants.py` and `grail_verifier.py`), so a sketch means
//! the same thing in both systems; the tests check test vectors computed by grail's own code.
//! Which positions are challenged ([`challenge_positions`]) is grail-rs's own derivation.

use std::ops::Range;

use sha2::{Digest, Sha256};
use sha3::Shake256;
use sha3::digest::{ExtendableOutput, Update, XofReader};

use crate::PolicyVersion;

/// The proof version this module implements.
pub const GRAIL_PROOF_VERSION: &str = "v5";
/// The Mersenne prime 2³¹ − 1 that sketches are reduced modulo.
pub const PRIME_Q: u32 = 2_147_483_647;
/// Positions challenged per completion.
pub const CHALLENGE_K: usize = 32;
/// Activations a sketch keeps: the largest in magnitude.
pub const PROOF_TOPK: usize = 16;
/// Logarithmic magnitude buckets per sign.
pub const PROOF_NUM_BUCKETS: i8 = 8;
/// Sketch coefficients lie in `[-PROOF_COEFF_RANGE, PROOF_COEFF_RANGE]`.
pub const PROOF_COEFF_RANGE: i16 = 127;
/// The sketch distance accepted at position 0.
pub const PROOF_SKETCH_TOLERANCE_BASE: f64 = 6000.0;
/// Growth of the accepted distance with the square root of the position: floating-point drift in
/// causal attention grows like √position.
pub const PROOF_SKETCH_TOLERANCE_GROWTH: f64 = 5.0;

/// SHAKE256 of `label`, then each part, separated by `||`: grail's pseudorandom function.
fn prf(label: &[u8], parts: &[&[u8]]) -> impl XofReader + use<> {
    let mut shake = Shake256::default();
    shake.update(label);
    for part in parts {
        shake.update(b"||");
        shake.update(part);
    }
    shake.finalize_xof()
}

/// The coefficients a sketch takes its dot product with, one per kept activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SketchCoefficients(pub [i8; PROOF_TOPK]);

impl SketchCoefficients {
    /// The coefficients for `randomness` (the bytes a trainer publishes with a policy version):
    /// big-endian 16-bit words of the PRF's "sketch" stream, folded into ±127 as grail folds
    /// them (numpy's wrapping `abs`, then a modulo of 255).
    pub fn from_randomness(randomness: &[u8]) -> Self {
        let mut raw = [0u8; 2 * PROOF_TOPK];
        prf(b"sketch", &[randomness]).read(&mut raw);
        let mut coefficients = [0i8; PROOF_TOPK];
        for (c, word) in coefficients.iter_mut().zip(raw.chunks_exact(2)) {
            let word = i16::from_be_bytes([word[0], word[1]]).wrapping_abs();
            let folded = word.rem_euclid(2 * PROOF_COEFF_RANGE + 1) - PROOF_COEFF_RANGE;
            *c = folded as i8;
        }
        Self(coefficients)
    }

    /// The coefficients of `version`'s sketches in a run whose trainer published `seed`: those of
    /// the seed followed by the version as 8 big-endian bytes. A completion whose tokens span
    /// versions (in-flight weight updates) sketches each token with its own version's.
    pub fn for_version(seed: &[u8], version: PolicyVersion) -> Self {
        let mut randomness = seed.to_vec();
        randomness.extend(version.to_be_bytes());
        Self::from_randomness(&randomness)
    }

    /// The sketch of one position's hidden state, in `[0, PRIME_Q)`. A hidden state with fewer
    /// than [`PROOF_TOPK`] activations keeps all of them.
    pub fn sketch(&self, hidden: &[f32]) -> u32 {
        let mut order: Vec<usize> = (0..hidden.len()).collect();
        let keep = PROOF_TOPK.min(hidden.len());
        // Largest magnitude first (NaN above everything, as torch.topk ranks it), ties to the
        // lower index; the kept ones then go back to index order, which does not depend on how
        // near-tied activations happen to rank on one machine or another.
        let by_magnitude =
            |&a: &usize, &b: &usize| hidden[b].abs().total_cmp(&hidden[a].abs()).then(a.cmp(&b));
        if keep < order.len() {
            order.select_nth_unstable_by(keep - 1, by_magnitude);
        }
        let kept = &mut order[..keep];
        kept.sort_unstable();
        let dot: i64 = kept
            .iter()
            .zip(self.0)
            .map(|(&i, c)| i64::from(log_magnitude_bucket(hidden[i])) * i64::from(c))
            .sum();
        dot.rem_euclid(i64::from(PRIME_Q)) as u32
    }

    /// The sketch of each row of `hidden` (rows of `hidden_size` activations, one per position).
    pub fn sketches(&self, hidden: &[f32], hidden_size: usize) -> Vec<u32> {
        hidden
            .chunks_exact(hidden_size)
            .map(|row| self.sketch(row))
            .collect()
    }
}

/// The signed logarithmic bucket of one activation: `⌊0.8·log₂(|x| + 1)⌋` clamped to
/// `0..=7`, with `x`'s sign; 0 for |x| < 10⁻⁶ and for NaN, ±7 for infinities.
pub fn log_magnitude_bucket(value: f32) -> i8 {
    let top = PROOF_NUM_BUCKETS - 1;
    if value.is_nan() {
        return 0;
    }
    if value.is_infinite() {
        return if value > 0.0 { top } else { -top };
    }
    let magnitude = f64::from(value.abs());
    if magnitude < 1e-6 {
        return 0;
    }
    // grail assumes log₂ values up to about 10; `as` truncates like Python's int().
    let scale = f64::from(PROOF_NUM_BUCKETS) / 10.0;
    let bucket = ((magnitude + 1.0).log2() * scale) as i64;
    let bucket = bucket.clamp(0, i64::from(top)) as i8;
    if value >= 0.0 { bucket } else { -bucket }
}

/// The largest sketch distance accepted at `position` (the hidden state's index in the whole
/// sequence, prompt included): `6000 + 5·√position`.
pub fn sketch_tolerance(position: usize) -> u32 {
    (PROOF_SKETCH_TOLERANCE_BASE + PROOF_SKETCH_TOLERANCE_GROWTH * (position as f64).sqrt()) as u32
}

/// The distance between two sketches on the circle of residues modulo [`PRIME_Q`].
pub fn sketch_distance(a: u32, b: u32) -> u32 {
    let d = (a % PRIME_Q).abs_diff(b % PRIME_Q);
    d.min(PRIME_Q - d)
}

/// Whether a claimed sketch is a residue (below [`PRIME_Q`]) within tolerance of the one
/// recomputed at `position`.
pub fn sketch_matches(claimed: u32, recomputed: u32, position: usize) -> bool {
    claimed < PRIME_Q && sketch_distance(claimed, recomputed) <= sketch_tolerance(position)
}

/// `k` distinct positions of `range`, in increasing order (all of them when the range holds no
/// more than `k`), drawn from the PRF's "open" stream keyed by the SHA-256 of `tokens` (as
/// big-endian 32-bit words) and `randomness`. With `randomness` unknown to a worker while it
/// generates (a trainer secret, the next version's seed), it cannot know which of its tokens
/// will be checked; binding the tokens makes each sequence's challenge its own.
pub fn challenge_positions(
    tokens: &[u32],
    randomness: &[u8],
    range: Range<usize>,
    k: usize,
) -> Vec<usize> {
    let mut positions: Vec<usize> = range.collect();
    if positions.len() <= k {
        return positions;
    }
    let mut token_hash = Sha256::new();
    for t in tokens {
        Digest::update(&mut token_hash, t.to_be_bytes());
    }
    let token_hash = token_hash.finalize();
    let mut stream = prf(b"open", &[&token_hash, randomness]);
    // A partial Fisher–Yates shuffle: the first k slots end up a uniform k-subset. The modulo of
    // a 64-bit draw is biased by less than n / 2⁶⁴, far below anything measurable.
    let n = positions.len();
    for i in 0..k {
        let mut word = [0u8; 8];
        stream.read(&mut word);
        let j = i + (u64::from_be_bytes(word) % (n - i) as u64) as usize;
        positions.swap(i, j);
    }
    positions.truncate(k);
    positions.sort_unstable();
    positions
}
