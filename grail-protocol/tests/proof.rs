//! The GRAIL proof's sketches against test vectors computed by the Python grail's own verifier
//! (`scripts/grail_sketch_vectors.py`), and the challenge positions' guarantees.

use grail_protocol::proof::{
    CHALLENGE_K, PRIME_Q, SketchCoefficients, challenge_positions, log_magnitude_bucket,
    sketch_distance, sketch_matches, sketch_tolerance,
};
use serde_json::Value;

fn vectors() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/grail_v5_sketches.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// The bytes grail reads from a randomness hex string: `0x` dropped, an odd length padded with a
/// leading zero.
fn randomness_bytes(hex: &str) -> Vec<u8> {
    let hex = hex.trim().trim_start_matches("0x");
    let hex = if hex.len() % 2 == 1 {
        format!("0{hex}")
    } else {
        hex.to_string()
    };
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

fn value_f32(v: &Value) -> f32 {
    match v {
        Value::String(s) => s.parse().unwrap(),
        v => v.as_f64().unwrap() as f32,
    }
}

#[test]
fn sketches_equal_grails_own() {
    let vectors = vectors();
    assert_eq!(vectors["prime_q"].as_u64(), Some(u64::from(PRIME_Q)));
    let cases = vectors["cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let randomness = case["randomness"].as_str().unwrap();
        let coefficients = SketchCoefficients::from_randomness(&randomness_bytes(randomness));
        let expected: Vec<i8> = case["coefficients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_i64().unwrap() as i8)
            .collect();
        assert_eq!(coefficients.0.to_vec(), expected, "randomness {randomness}");
        for (row, expected) in case["hidden"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["sketches"].as_array().unwrap())
        {
            let hidden: Vec<f32> = row.as_array().unwrap().iter().map(value_f32).collect();
            assert_eq!(
                u64::from(coefficients.sketch(&hidden)),
                expected.as_u64().unwrap(),
                "randomness {randomness}, hidden size {}",
                hidden.len()
            );
        }
    }
}

#[test]
fn buckets_and_tolerances_equal_grails_own() {
    let vectors = vectors();
    for pair in vectors["buckets"].as_array().unwrap() {
        let value = value_f32(&pair[0]);
        assert_eq!(
            i64::from(log_magnitude_bucket(value)),
            pair[1].as_i64().unwrap(),
            "bucket of {value:e}"
        );
    }
    for pair in vectors["tolerances"].as_array().unwrap() {
        let position = pair[0].as_u64().unwrap() as usize;
        assert_eq!(
            u64::from(sketch_tolerance(position)),
            pair[1].as_u64().unwrap(),
            "tolerance at {position}"
        );
    }
}

#[test]
fn a_batched_sketch_is_the_sketch_of_each_row() {
    let hidden: Vec<f32> = (0..4 * 40)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
        .collect();
    let coefficients = SketchCoefficients::from_randomness(b"version 3");
    let each: Vec<u32> = hidden
        .chunks(40)
        .map(|row| coefficients.sketch(row))
        .collect();
    assert_eq!(coefficients.sketches(&hidden, 40), each);
}

#[test]
fn distance_wraps_around_the_prime_and_claims_outside_it_fail() {
    assert_eq!(sketch_distance(1, PRIME_Q - 1), 2);
    assert_eq!(sketch_distance(PRIME_Q - 1, 1), 2);
    assert_eq!(sketch_distance(10, 6010), 6000);
    assert!(sketch_matches(10, 6010, 0));
    assert!(!sketch_matches(10, 6011, 0));
    assert!(sketch_matches(10, 6015, 1));
    // A claim that is no residue is refused, however near it reduces to.
    assert!(!sketch_matches(PRIME_Q + 5, 5, 0));
    assert!(!sketch_matches(u32::MAX, 5, 100));
}

#[test]
fn challenge_positions_are_distinct_sorted_in_range_and_bound_to_tokens_and_randomness() {
    let tokens: Vec<u32> = (0..300).collect();
    let picked = challenge_positions(&tokens, b"secret", 100..300, CHALLENGE_K);
    assert_eq!(picked.len(), CHALLENGE_K);
    assert!(picked.windows(2).all(|w| w[0] < w[1]), "{picked:?}");
    assert!(picked.iter().all(|p| (100..300).contains(p)), "{picked:?}");
    assert_eq!(
        picked,
        challenge_positions(&tokens, b"secret", 100..300, CHALLENGE_K)
    );
    assert_ne!(
        picked,
        challenge_positions(&tokens, b"secres", 100..300, CHALLENGE_K)
    );
    let mut other = tokens.clone();
    other[299] = 7;
    assert_ne!(
        picked,
        challenge_positions(&other, b"secret", 100..300, CHALLENGE_K)
    );
    // A completion no longer than k is checked everywhere.
    assert_eq!(
        challenge_positions(&tokens, b"secret", 5..20, CHALLENGE_K),
        (5..20).collect::<Vec<_>>()
    );
    assert!(challenge_positions(&tokens, b"secret", 5..5, CHALLENGE_K).is_empty());
}

#[test]
fn challenge_positions_cover_the_range_uniformly() {
    // 4,000 draws of 32 of 64 positions: each position is expected 2,000 times (sd ≈ 32); a
    // biased shuffle (always keeping a slot, skipping the range's end) lands far outside ±250.
    let mut counts = [0usize; 64];
    for seed in 0u32..4_000 {
        for p in challenge_positions(&[seed], b"uniform", 0..64, CHALLENGE_K) {
            counts[p] += 1;
        }
    }
    for (p, &c) in counts.iter().enumerate() {
        assert!((1_750..=2_250).contains(&c), "position {p} drawn {c} times");
    }
}

#[test]
fn each_version_has_its_own_coefficients_derived_from_the_seed() {
    let seed = [9u8; 32];
    let v3 = SketchCoefficients::for_version(&seed, 3);
    let mut bytes = seed.to_vec();
    bytes.extend([0, 0, 0, 0, 0, 0, 0, 3]);
    assert_eq!(v3, SketchCoefficients::from_randomness(&bytes));
    assert_ne!(v3, SketchCoefficients::for_version(&seed, 4));
    assert_ne!(v3, SketchCoefficients::for_version(&[8u8; 32], 3));
}
