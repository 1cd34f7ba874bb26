//! Rollouts in the store: groups written by workers as Parquet objects and read back by the
//! trainer once each, prompt blocks claimed by racing workers, and every object the trainer must
//! refuse (torn, malformed, from another run's shape, from a version never published).

use std::collections::BTreeSet;
use std::sync::Arc;

use grail_protocol::{Group, Sample};
use grail_store::rollout_batch::{decode, encode};
use grail_store::{PromptClaims, RolloutBatch, RolloutCheck, RolloutReader, RolloutWriter, Store};

fn names() -> Vec<String> {
    vec!["correct".into(), "format".into()]
}

/// A group of `g` samples of different lengths; the last sample spans two versions.
fn group(prompt_id: u64, g: usize, version: u64) -> Group {
    let samples = (0..g)
        .map(|i| {
            let n = 1 + (prompt_id as usize + i) % 5;
            let mut s = Sample::new(
                (0..n as u32)
                    .map(|t| (t * 7 + prompt_id as u32) % 50)
                    .collect(),
                (0..n).map(|t| -0.25 * (t + 1) as f32).collect(),
                vec![i as f32, 0.5],
                version,
            );
            if i + 1 == g && n > 1 {
                *s.token_versions.last_mut().unwrap() = version + 1;
            }
            // Some samples carry GRAIL sketches, some none.
            if i % 2 == 0 {
                s.sketches = (0..n as u32).map(|t| t * 1_000_003 + i as u32).collect();
            }
            s
        })
        .collect();
    Group {
        prompt_id,
        prompt_ids: Arc::new(vec![1, 2, prompt_id as u32 % 50]),
        samples,
    }
}

fn check() -> RolloutCheck {
    RolloutCheck {
        vocab_size: 50,
        num_generations: 4,
        max_completion_length: 8,
        reward_names: names(),
    }
}

fn batch(groups: Vec<Group>) -> RolloutBatch {
    RolloutBatch {
        worker_id: "w0".into(),
        reward_names: names(),
        groups,
    }
}

#[test]
fn groups_survive_parquet_exactly() {
    let b = batch((0..5).map(|p| group(p, 4, 3)).collect());
    let bytes = encode(&b).unwrap();
    assert_eq!(decode(bytes.into()).unwrap(), b);
    assert_eq!(check().check(&b, 4), Ok(()));
}

#[test]
fn sketches_are_one_per_token_or_none_and_older_objects_have_none() {
    let mut b = batch(vec![group(3, 4, 0)]);
    b.groups[0].samples[0].sketches.pop();
    let why = decode(encode(&b).unwrap().into()).unwrap_err();
    assert!(
        why.contains("prompt 3 sample 0") && why.contains("sketches"),
        "{why}"
    );

    // An object written before the column existed: the same file without it.
    let b = batch(vec![group(3, 4, 0)]);
    let bytes = bytes::Bytes::from(encode(&b).unwrap());
    let builder =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap();
    let metadata = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .cloned();
    let mut record = builder.build().unwrap().next().unwrap().unwrap();
    let at = record.schema().index_of("sketches").unwrap();
    record.remove_column(at);
    let props = parquet::file::properties::WriterProperties::builder()
        .set_key_value_metadata(metadata)
        .build();
    let mut old = Vec::new();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(&mut old, record.schema(), Some(props)).unwrap();
    writer.write(&record).unwrap();
    writer.close().unwrap();
    let read = decode(old.into()).unwrap();
    let mut want = b;
    for s in &mut want.groups[0].samples {
        s.sketches.clear();
    }
    assert_eq!(read, want);
}

#[test]
fn the_trainer_reads_every_object_once_in_sequence_order() {
    let store = Store::open("memory://", "run").unwrap();
    let mut a = RolloutWriter::new(store.clone(), "a", names()).unwrap();
    let mut b = RolloutWriter::new(store.clone(), "b", names()).unwrap();
    let ka0 = a.write(vec![group(0, 4, 0)]).unwrap();
    let ka1 = a.write(vec![group(1, 4, 0)]).unwrap();
    let kb0 = b.write(vec![group(2, 4, 0), group(3, 4, 0)]).unwrap();
    assert_eq!(ka0, "rollouts/a/000000000000.parquet");
    let mut reader = RolloutReader::new(store.clone());
    let keys: Vec<String> = reader.poll(2).unwrap().into_iter().map(|a| a.key).collect();
    assert_eq!(keys, [ka0.clone(), kb0.clone()]);
    let rest = reader.poll(10).unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].key, ka1);
    assert_eq!(rest[0].batch.as_ref().unwrap().groups, vec![group(1, 4, 0)]);
    assert!(reader.poll(10).unwrap().is_empty());
    // A restarted trainer given the keys it consumed reads only what came after.
    let kb1 = b.write(vec![group(4, 4, 1)]).unwrap();
    let consumed: Vec<String> = reader.read_keys().map(str::to_string).collect();
    let mut again = RolloutReader::after(store.clone(), consumed);
    let next: Vec<String> = again.poll(10).unwrap().into_iter().map(|a| a.key).collect();
    assert_eq!(next, [kb1]);
    // A writer restarted under the same id continues after its objects.
    let mut a2 = RolloutWriter::new(store, "a", names()).unwrap();
    assert_eq!(
        a2.write(vec![group(5, 4, 1)]).unwrap(),
        "rollouts/a/000000000002.parquet"
    );
}

#[test]
fn torn_and_foreign_objects_are_faults_naming_the_key_read_once() {
    let store = Store::open("memory://", "run").unwrap();
    let good = encode(&batch(vec![group(0, 4, 0)])).unwrap();
    store
        .put(
            "rollouts/x/000000000000.parquet",
            good[..good.len() / 2].to_vec(),
        )
        .unwrap();
    store
        .put("rollouts/x/000000000001.parquet", b"not parquet".to_vec())
        .unwrap();
    let mut reader = RolloutReader::new(store);
    let arrivals = reader.poll(10).unwrap();
    assert_eq!(arrivals.len(), 2);
    for a in &arrivals {
        let why = a.batch.as_ref().unwrap_err();
        assert!(why.contains(&a.key), "{why}");
    }
    assert!(reader.poll(10).unwrap().is_empty());
}

#[test]
fn the_check_refuses_what_this_run_cannot_have_made() {
    let c = check();
    let refused = |edit: &dyn Fn(&mut RolloutBatch), newest: u64, want: &str| {
        let mut b = batch(vec![group(0, 4, 2), group(1, 4, 2)]);
        edit(&mut b);
        let why = c.check(&b, newest).unwrap_err();
        assert!(why.contains(want), "{why} lacks {want}");
    };
    refused(&|_| {}, 2, "version 3 was never published");
    refused(
        &|b| b.groups[1].samples.pop().map(drop).unwrap(),
        3,
        "3 samples",
    );
    refused(
        &|b| b.groups[0].samples[1].completion_ids[0] = 50,
        3,
        "token 50",
    );
    refused(
        &|b| Arc::make_mut(&mut b.groups[1].prompt_ids)[0] = 99,
        3,
        "prompt token 99",
    );
    refused(
        &|b| b.groups[0].samples[0].behaviour_logps[0] = f32::NAN,
        3,
        "log-prob NaN",
    );
    refused(
        &|b| b.groups[0].samples[0].behaviour_logps[0] = 0.5,
        3,
        "log-prob 0.5",
    );
    refused(
        &|b| b.groups[0].samples[2].rewards.pop().map(drop).unwrap(),
        3,
        "rewards",
    );
    refused(&|b| b.reward_names.reverse(), 3, "this run's are");
    refused(
        &|b| b.groups[1].samples[0].policy_version = 3,
        3,
        "not the oldest",
    );
    refused(
        &|b| b.groups[0].samples[0].completion_ids = vec![1; 9],
        3,
        "9 completion tokens",
    );
}

#[test]
fn a_group_split_by_another_fails_the_check() {
    let mut b = batch(vec![group(0, 4, 0)]);
    let tail = b.groups[0].samples.split_off(2);
    b.groups.push(group(1, 4, 0));
    b.groups.push(Group {
        samples: tail,
        ..group(0, 4, 0)
    });
    let decoded = decode(encode(&b).unwrap().into()).unwrap();
    assert_eq!(decoded.groups.len(), 3);
    let why = check().check(&decoded, 1).unwrap_err();
    assert!(why.contains("prompt 0: 2 samples"), "{why}");
}

#[test]
fn racing_workers_never_claim_the_same_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let handles: Vec<_> = (0..3)
        .map(|w| {
            let store = Store::open(&url, "run").unwrap();
            std::thread::spawn(move || {
                let mut claims = PromptClaims::new(store, &format!("w{w}"), 4).unwrap();
                (0..20).map(|_| claims.claim().unwrap()).collect::<Vec<_>>()
            })
        })
        .collect();
    let mut seen = BTreeSet::new();
    for h in handles {
        for range in h.join().unwrap() {
            assert_eq!(range.end - range.start, 4);
            for p in range {
                assert!(seen.insert(p), "prompt {p} claimed twice");
            }
        }
    }
    // 60 blocks, no gaps beyond the 60 claimed.
    assert_eq!(seen.len(), 240);
    assert_eq!(*seen.last().unwrap(), 239);
    // A worker that joins later starts after every claim.
    let late = Store::open(&url, "run").unwrap();
    assert_eq!(
        PromptClaims::new(late, "w9", 4).unwrap().claim().unwrap(),
        240..244
    );
}

#[test]
fn worker_ids_must_be_folder_names() {
    let store = Store::open("memory://", "run").unwrap();
    for bad in ["", "a/b", ".hidden", "sp ace"] {
        assert!(
            RolloutWriter::new(store.clone(), bad, names()).is_err(),
            "{bad}"
        );
    }
}
