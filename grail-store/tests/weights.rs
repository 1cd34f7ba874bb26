//! Weights in the store: versions written by the trainer's writer and read back by workers'
//! readers on `memory://` and `file://`, and every fault a reader can meet (a torn or corrupt
//! payload, a hash that does not match, a delta whose base is gone, an unreadable marker).

use grail_protocol::{NamedTensor, WireDtype};
use grail_store::{Store, StoreError, VersionKind, WeightReader, WeightWriter, WeightWriterConfig};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const WIRE: WireDtype = WireDtype::Bf16;

/// Two tensors of seeded values, at bf16.
fn initial(seed: u64) -> Vec<NamedTensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = |name: &str, shape: Vec<usize>| NamedTensor {
        name: name.into(),
        values: (0..shape.iter().product::<usize>())
            .map(|_| WIRE.round(rng.random_range(-1.0..1.0f32)))
            .collect(),
        shape,
    };
    vec![t("a.weight", vec![40, 50]), t("b.bias", vec![37])]
}

/// `t` after a small optimizer step: a few values nudged by more than a bf16 ulp.
fn step(t: &mut [NamedTensor], rng: &mut StdRng) {
    for tensor in t.iter_mut() {
        for _ in 0..tensor.values.len() / 50 + 1 {
            let i = rng.random_range(0..tensor.values.len());
            tensor.values[i] = WIRE.round(tensor.values[i] * 1.05 + 0.01);
        }
    }
}

fn config(anchor_interval: u64) -> WeightWriterConfig {
    WeightWriterConfig {
        anchor_interval,
        keep_anchors: 2,
        ..WeightWriterConfig::default()
    }
}

/// The versions with a READY marker in the store.
fn ready_versions(store: &Store) -> Vec<u64> {
    store
        .list("weights/")
        .unwrap()
        .iter()
        .filter(|k| k.ends_with("/READY"))
        .map(|k| k["weights/".len().."weights/".len() + 12].parse().unwrap())
        .collect()
}

/// Publishes versions `0..=last` (anchors every `interval`) and returns the weights of each.
fn publish(store: &Store, interval: u64, last: u64) -> Vec<Vec<NamedTensor>> {
    let mut rng = StdRng::seed_from_u64(7);
    let mut w = initial(1);
    let mut writer = WeightWriter::new(store.clone(), config(interval));
    let mut history = Vec::new();
    for v in 0..=last {
        if v > 0 {
            step(&mut w, &mut rng);
        }
        writer.publish(v, &w).unwrap();
        history.push(w.clone());
    }
    history
}

fn stores() -> Vec<(Store, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    vec![
        (Store::open("memory://", "run").unwrap(), None),
        (Store::open(&url, "run").unwrap(), Some(dir)),
    ]
}

#[test]
fn every_version_reconstructs_bit_for_bit_following_or_joining_late() {
    for (store, _dir) in stores() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut w = initial(1);
        let mut writer = WeightWriter::new(store.clone(), config(4));
        let mut follower = WeightReader::new(store.clone(), WIRE);
        for v in 0..=13u64 {
            if v > 0 {
                step(&mut w, &mut rng);
            }
            let published = writer.publish(v, &w).unwrap();
            let kind = if v % 4 == 0 {
                VersionKind::Full
            } else {
                VersionKind::Delta
            };
            assert_eq!(published.kind, kind, "{store:?} v{v}");
            let (stem, ext) = if v % 4 == 0 {
                ("full-", ".safetensors")
            } else {
                ("delta-", ".bin")
            };
            let folder = format!("run/weights/{v:012}/{stem}");
            assert!(
                published.location.contains(&folder) && published.location.ends_with(ext),
                "{}",
                published.location
            );
            if kind == VersionKind::Delta {
                // A small step is a small delta: well under a tenth of the weights' bytes.
                assert!(
                    published.bytes < 2_037 * 2 / 10,
                    "v{v}: {} bytes",
                    published.bytes
                );
            }
            let caught = follower.catch_up().unwrap();
            assert!(caught.changed && caught.faults.is_empty(), "{caught:?}");
            assert_eq!(follower.version(), Some(v));
            assert_eq!(follower.tensors().unwrap(), &w[..], "{store:?} v{v}");
        }
        // Anchors 0, 4, 8, 12: the newest two are kept, with the deltas after them.
        assert_eq!(ready_versions(&store), (8..=13).collect::<Vec<_>>());
        let mut late = WeightReader::new(store.clone(), WIRE);
        assert!(late.catch_up().unwrap().faults.is_empty());
        assert_eq!(
            (late.version(), late.tensors().unwrap()),
            (Some(13), &w[..])
        );
        // Nothing new: nothing changes.
        assert_eq!(late.catch_up().unwrap(), Default::default());
    }
}

#[test]
fn a_reader_holding_an_old_version_whose_deltas_are_gone_rejoins_at_an_anchor() {
    let store = Store::open("memory://", "run").unwrap();
    let history = publish(&store, 4, 2);
    let mut reader = WeightReader::holding(store.clone(), WIRE, 1, history[1].clone());
    // Versions 3..=13 appear; retention deletes everything before anchor 8.
    let mut rng = StdRng::seed_from_u64(70);
    let mut w = history[2].clone();
    let mut writer = WeightWriter::new(store.clone(), config(4));
    for v in 3..=13 {
        step(&mut w, &mut rng);
        writer.publish(v, &w).unwrap();
    }
    let caught = reader.catch_up().unwrap();
    assert!(caught.faults.is_empty(), "{:?}", caught.faults);
    assert_eq!(
        (reader.version(), reader.tensors().unwrap()),
        (Some(13), &w[..])
    );
}

#[test]
fn a_version_without_its_ready_marker_is_invisible_and_its_payload_may_be_replaced() {
    let store = Store::open("memory://", "run").unwrap();
    let history = publish(&store, 10, 2);
    // A writer that died after the payload of version 3, before its marker.
    store
        .put("weights/000000000003/delta.bin", b"half a delta".to_vec())
        .unwrap();
    let mut reader = WeightReader::new(store.clone(), WIRE);
    let caught = reader.catch_up().unwrap();
    assert!(caught.faults.is_empty(), "{:?}", caught.faults);
    assert_eq!(reader.version(), Some(2));
    // The restarted trainer starts a new chain: version 3 is an anchor, written over the debris.
    let mut w = history[2].clone();
    step(&mut w, &mut StdRng::seed_from_u64(3));
    let mut writer = WeightWriter::new(store.clone(), config(10));
    assert_eq!(writer.publish(3, &w).unwrap().kind, VersionKind::Full);
    reader.catch_up().unwrap();
    assert_eq!(
        (reader.version(), reader.tensors().unwrap()),
        (Some(3), &w[..])
    );
}

#[test]
fn a_published_version_is_never_rewritten() {
    let store = Store::open("memory://", "run").unwrap();
    let history = publish(&store, 10, 2);
    let mut writer = WeightWriter::new(store.clone(), config(10));
    let err = writer.publish(2, &history[0]).unwrap_err();
    assert!(
        matches!(err, StoreError::VersionExists { version: 2, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("run/weights/000000000002/READY"),
        "{err}"
    );
    let mut reader = WeightReader::new(store, WIRE);
    reader.catch_up().unwrap();
    assert_eq!(reader.tensors().unwrap(), &history[2][..]);
}

/// Rewrites version `v`'s marker with one digit of its hash changed.
fn flip_hash(store: &Store, v: u64) {
    let ready = format!("weights/{v:012}/READY");
    let text = String::from_utf8(store.get(&ready).unwrap().unwrap().to_vec()).unwrap();
    let at = text.find("\"hash\": \"").unwrap() + 9;
    let flipped = if &text[at..at + 1] == "0" { "1" } else { "0" };
    let text = format!("{}{flipped}{}", &text[..at], &text[at + 1..]);
    store.put(&ready, text.into_bytes()).unwrap();
}

/// The key of version `v`'s payload.
fn payload_key(store: &Store, v: u64) -> String {
    let folder = format!("weights/{v:012}/");
    store
        .list(&folder)
        .unwrap()
        .into_iter()
        .find(|k| !k.ends_with("/READY"))
        .unwrap_or_else(|| panic!("no payload in {folder}"))
}

/// Publishes versions 0..=7 (one anchor, then deltas), damages the
/// store with `damage`, and checks that a reader holding version 2 reports exactly one fault
/// naming `key` and `reason`, ends at `expect_version` with exactly that version's weights, and
/// never reports the fault again.
fn check_fault(damage: impl Fn(&Store) -> String, reason: &str, expect_version: u64) {
    let store = Store::open("memory://", "run").unwrap();
    let history = publish(&store, 10, 7);
    let key = damage(&store);
    let mut reader = WeightReader::holding(store.clone(), WIRE, 2, history[2].clone());
    let caught = reader.catch_up().unwrap();
    assert_eq!(caught.faults.len(), 1, "{key}: {:?}", caught.faults);
    let key = key.as_str();
    let fault = &caught.faults[0];
    assert!(fault.location.ends_with(&format!("run/{key}")), "{fault}");
    assert!(fault.to_string().contains(reason), "{fault}");
    assert_eq!(reader.version(), Some(expect_version), "{key}");
    assert_eq!(
        reader.tensors().unwrap(),
        &history[expect_version as usize][..]
    );
    assert!(
        reader.catch_up().unwrap().faults.is_empty(),
        "{key}: reported twice"
    );
}

#[test]
fn a_torn_payload_is_a_fault_naming_its_key_and_is_never_applied() {
    check_fault(
        |s| {
            let key = payload_key(s, 5);
            let b = s.get(&key).unwrap().unwrap();
            s.put(&key, b[..b.len() / 2].to_vec()).unwrap();
            key
        },
        "torn",
        4,
    );
}

#[test]
fn a_corrupt_delta_is_a_fault_naming_its_key_and_is_never_applied() {
    check_fault(
        |s| {
            let key = payload_key(s, 5);
            let mut b = s.get(&key).unwrap().unwrap().to_vec();
            // Same length, compression tag changed: the bytes no longer decode.
            b[0] = 7;
            s.put(&key, b).unwrap();
            key
        },
        "corrupt weight delta",
        4,
    );
}

#[test]
fn a_hash_mismatch_is_a_fault_and_the_reader_falls_back_to_verified_weights() {
    // A delta that decodes but reconstructs other weights than the marker's hash.
    check_fault(
        |s| {
            flip_hash(s, 6);
            payload_key(s, 6)
        },
        "hash",
        5,
    );
}

#[test]
fn a_delta_whose_base_is_gone_is_a_fault_naming_it() {
    check_fault(
        |s| {
            s.delete(&payload_key(s, 4)).unwrap();
            s.delete("weights/000000000004/READY").unwrap();
            payload_key(s, 5)
        },
        "its base (version 4) is not in the store",
        3,
    );
}

#[test]
fn an_unreadable_marker_is_a_fault_naming_it() {
    check_fault(
        |s| {
            let key = "weights/000000000007/READY";
            s.put(key, b"{not json".to_vec()).unwrap();
            key.to_string()
        },
        "unreadable READY",
        6,
    );
}

#[test]
fn bad_store_urls_and_run_ids_are_errors_naming_them() {
    for (url, run, needle) in [
        ("s4://bucket", "run", "unsupported scheme `s4`"),
        ("not a url", "run", "store URL `not a url`"),
        ("memory://", "a/b", "run id `a/b`"),
        ("memory://", "", "run id ``"),
    ] {
        let err = Store::open(url, run).unwrap_err().to_string();
        assert!(err.contains(needle), "{url} {run}: {err}");
    }
}

#[test]
fn a_reader_of_a_run_with_no_weights_yet_waits_without_error() {
    for (store, _dir) in stores() {
        let mut reader = WeightReader::new(store.clone(), WIRE);
        assert_eq!(reader.catch_up().unwrap(), Default::default(), "{store:?}");
        assert_eq!(reader.version(), None);
        assert!(store.get("weights/000000000000/READY").unwrap().is_none());
    }
}

#[test]
fn a_bad_anchor_leaves_the_weights_held_alone() {
    let store = Store::open("memory://", "run").unwrap();
    let history = publish(&store, 4, 7);
    // Anchor 4's marker claims other weights; versions 5..=7 chain to it.
    flip_hash(&store, 4);
    let mut reader = WeightReader::holding(store.clone(), WIRE, 1, history[1].clone());
    let caught = reader.catch_up().unwrap();
    // The anchor fails its check and the reader keeps version 1, then goes on to 3 by deltas.
    assert_eq!(caught.faults.len(), 1, "{:?}", caught.faults);
    assert!(
        caught.faults[0]
            .location
            .contains("weights/000000000004/full-")
    );
    assert_eq!(
        (reader.version(), reader.tensors().unwrap()),
        (Some(3), &history[3][..])
    );
}

#[test]
fn tensors_in_any_order_are_published_sorted_and_bad_layouts_are_errors() {
    let store = Store::open("memory://", "run").unwrap();
    let mut w = initial(2);
    w.reverse();
    let mut writer = WeightWriter::new(store.clone(), config(10));
    writer.publish(0, &w).unwrap();
    let mut reader = WeightReader::new(store.clone(), WIRE);
    assert!(reader.catch_up().unwrap().faults.is_empty());
    w.reverse();
    assert_eq!(reader.tensors().unwrap(), &w[..]);
    let mut twice = w.clone();
    twice[1].name = twice[0].name.clone();
    let mut short = w.clone();
    short[1].values.pop();
    for (what, tensors, needle) in [
        ("a repeated name", twice, "appears twice"),
        ("a short tensor", short, "36 values for shape [37]"),
    ] {
        let err = writer.publish(1, &tensors).unwrap_err().to_string();
        assert!(err.contains(needle), "{what}: {err}");
    }
}
