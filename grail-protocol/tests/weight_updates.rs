//! The weight-update codec on plain tensors: a receiver applying every update in order holds
//! exactly the sender's values; a delta out of order or corrupt is refused and changes nothing.

use std::sync::Arc;

use grail_protocol::{
    Compression, NamedTensor, ProtocolError, SyncMode, WeightPayload, WeightUpdate, WireDtype,
    delta, weights_hash,
};

/// Two tensors with values spread over several binades, rounded to `wire`.
fn tensors(seed: u32, wire: WireDtype) -> Vec<NamedTensor> {
    let values = |n: usize, salt: u32| -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = ((i as u32).wrapping_mul(2_654_435_761) ^ salt) % 10_000;
                wire.round((x as f32 - 5_000.0) * 1e-3)
            })
            .collect()
    };
    vec![
        NamedTensor {
            name: "a.weight".into(),
            shape: vec![8, 16],
            values: values(128, seed),
        },
        NamedTensor {
            name: "b.bias".into(),
            shape: vec![16],
            values: values(16, seed ^ 7),
        },
    ]
}

/// `t` with every `every`-th value of the first tensor nudged (a small optimizer step).
fn step(t: &[NamedTensor], every: usize, wire: WireDtype) -> Vec<NamedTensor> {
    let mut next = t.to_vec();
    for (i, v) in next[0].values.iter_mut().enumerate() {
        if i % every == 0 {
            *v = wire.round(*v + 0.25);
        }
    }
    next
}

#[test]
fn deltas_and_full_updates_reproduce_the_senders_values_bit_for_bit() {
    for wire in [WireDtype::F32, WireDtype::Bf16] {
        let mut sent = tensors(1, wire);
        let mut by_delta = sent.clone();
        let mut by_full = sent.clone();
        for (version, every) in [(1, 7), (2, 1), (3, 40)] {
            let next = step(&sent, every, wire);
            let delta = WeightUpdate {
                version,
                payload: WeightPayload::encode(SyncMode::Delta, wire, version - 1, &sent, &next),
            };
            let full = WeightUpdate {
                version,
                payload: WeightPayload::encode(SyncMode::Full, wire, version - 1, &sent, &next),
            };
            delta.apply_to(&mut by_delta, version - 1).unwrap();
            full.apply_to(&mut by_full, version - 1).unwrap();
            let bits = |t: &[NamedTensor]| -> Vec<Vec<u32>> {
                t.iter()
                    .map(|t| t.values.iter().map(|v| v.to_bits()).collect())
                    .collect()
            };
            assert_eq!(bits(&by_delta), bits(&next), "{wire:?} v{version}: delta");
            assert_eq!(bits(&by_full), bits(&next), "{wire:?} v{version}: full");
            sent = next;
        }
    }
    // Few changes make a small delta.
    let old = tensors(2, WireDtype::Bf16);
    let new = step(&old, 40, WireDtype::Bf16);
    assert!(delta::encode(&old, &new, WireDtype::Bf16).len() < 128 * 2 / 2);
}

#[test]
fn a_full_update_arrives_sorted_by_name() {
    let mut shuffled = tensors(3, WireDtype::F32);
    shuffled.reverse();
    let update = WeightUpdate {
        version: 4,
        payload: WeightPayload::Full(Arc::new(shuffled)),
    };
    let mut held = Vec::new();
    update.apply_to(&mut held, 0).unwrap();
    assert_eq!(held, tensors(3, WireDtype::F32));
}

#[test]
fn a_delta_out_of_order_is_refused() {
    let old = tensors(4, WireDtype::Bf16);
    let new = step(&old, 3, WireDtype::Bf16);
    let update = WeightUpdate {
        version: 6,
        payload: WeightPayload::encode(SyncMode::Delta, WireDtype::Bf16, 5, &old, &new),
    };
    let mut held = old.clone();
    let err = update.apply_to(&mut held, 4).unwrap_err();
    assert_eq!(
        err,
        ProtocolError::OutOfOrder {
            base: 5,
            version: 6,
            held: 4
        }
    );
    assert!(err.to_string().contains("in order"), "{err}");
    assert_eq!(held, old);
}

#[test]
fn a_corrupt_delta_is_refused_and_changes_nothing() {
    let wire = WireDtype::Bf16;
    // Unrounded values: an accepted delta would round them, a refused one must not.
    let mut old = tensors(5, WireDtype::F32);
    old[0].values[1] = 0.1;
    let new = step(&tensors(5, wire), 5, wire);
    let good = delta::encode(&old, &new, wire);
    let huge_claim = {
        let mut b = good.clone();
        b[1..9].copy_from_slice(&u64::MAX.to_le_bytes());
        b
    };
    let other_layout = delta::encode(&old[..1], &new[..1], wire);
    let unknown_compression = {
        let mut b = good.clone();
        b[0] = 9;
        b
    };
    let short_claim = {
        let mut b = good.clone();
        let n = u64::from_le_bytes(b[1..9].try_into().unwrap());
        b[1..9].copy_from_slice(&(n - 1).to_le_bytes());
        b
    };
    for (what, bytes) in [
        ("empty", Vec::new()),
        ("unknown compression", unknown_compression),
        ("size shorter than the content", short_claim),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("huge size prefix", huge_claim),
        ("another tensor layout", other_layout),
    ] {
        let mut held = old.clone();
        let err = delta::apply(&mut held, wire, &bytes).unwrap_err();
        assert!(
            matches!(err, ProtocolError::CorruptDelta(_)),
            "{what}: {err}"
        );
        assert_eq!(held, old, "{what}: a refused delta changed the tensors");
    }
    let mut held = old.clone();
    delta::apply(&mut held, wire, &good).unwrap();
    assert_eq!(held, new);
}

/// One tensor of `len` zeros, at bf16.
fn zeros(len: usize) -> Vec<NamedTensor> {
    vec![NamedTensor {
        name: "w".into(),
        shape: vec![len],
        values: vec![0.0; len],
    }]
}

#[test]
fn both_compressions_and_every_index_width_round_trip_and_replay_safely() {
    let wire = WireDtype::Bf16;
    let len = 300_000;
    let old = zeros(len);
    // Gaps that need 1, 2 and 4 bytes: every 3rd of the first 900, then every 1,000th, then
    // one change 200,000 further on.
    let changed: Vec<usize> = (0..900)
        .step_by(3)
        .chain((1_000..90_000).step_by(1_000))
        .chain([290_000])
        .collect();
    for (gaps_up_to, n) in [(255, 300), (65_535, 389), (usize::MAX, 390)] {
        let mut new = old.clone();
        for &i in &changed[..n] {
            new[0].values[i] = wire.round(i as f32 * 0.5 + 1.0);
        }
        for compression in [Compression::Lz4, Compression::Zstd] {
            let bytes = delta::encode_with(&old, &new, wire, compression);
            let mut held = old.clone();
            delta::apply(&mut held, wire, &bytes).unwrap();
            assert_eq!(held, new, "{compression:?}, gaps up to {gaps_up_to}");
            // Overwrites, not increments: applying the same delta again changes nothing.
            delta::apply(&mut held, wire, &bytes).unwrap();
            assert_eq!(held, new, "{compression:?} replayed");
            // Narrow indices: far below 4 bytes of index + 2 of value per change.
            assert!(
                bytes.len() < n * 6,
                "{compression:?}: {} bytes",
                bytes.len()
            );
        }
    }
}

#[test]
fn a_delta_with_a_repeated_index_is_refused() {
    let wire = WireDtype::Bf16;
    let old = zeros(64);
    let mut new = old.clone();
    new[0].values[10] = 1.0;
    new[0].values[11] = 2.0;
    // Hand-made raw bytes: sparse, 2 changes, width 1, gaps 10 and 0 (index 10 twice), the
    // values 1.0 and 2.0 in bf16 byte planes (low bytes 0x80 0x00, high bytes 0x3f 0x40).
    let raw = [0u8, 2, 0, 0, 0, 1, 10, 0, 0x80, 0, 0x3f, 0x40];
    let mut bytes = vec![1u8];
    bytes.extend((raw.len() as u64).to_le_bytes());
    bytes.extend(lz4_flex::compress(&raw));
    let mut held = old.clone();
    let err = delta::apply(&mut held, wire, &bytes).unwrap_err();
    assert!(err.to_string().contains("repeated index 10"), "{err}");
    assert_eq!(held, old);
    // The same bytes with the second gap 1 are a valid delta.
    let raw = [0u8, 2, 0, 0, 0, 1, 10, 1, 0x80, 0, 0x3f, 0x40];
    let mut bytes = vec![1u8];
    bytes.extend((raw.len() as u64).to_le_bytes());
    bytes.extend(lz4_flex::compress(&raw));
    delta::apply(&mut held, wire, &bytes).unwrap();
    assert_eq!(held, new);
}

#[test]
fn the_weights_hash_sees_every_value_name_and_shape() {
    let wire = WireDtype::Bf16;
    let base = tensors(6, wire);
    let h = weights_hash(&base, wire);
    assert_eq!(h, weights_hash(&base.clone(), wire));
    let mut value = base.clone();
    value[1].values[15] = wire.round(value[1].values[15] + 1.0);
    let mut name = base.clone();
    name[0].name = "a.weigh".into();
    let mut shape = base.clone();
    shape[0].shape = vec![16, 8];
    for (what, t) in [("a value", value), ("a name", name), ("a shape", shape)] {
        assert_ne!(
            weights_hash(&t, wire),
            h,
            "{what} changed, the hash did not"
        );
    }
}
