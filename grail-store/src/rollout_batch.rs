//! Scored groups as one Parquet file: the object a rollout worker writes and the trainer reads.
//!
//! One row per completion, so pandas, polars or duckdb read a run's rollouts as a table:
//!
//! | column            | type          | meaning                                            |
//! |-------------------|---------------|----------------------------------------------------|
//! | `prompt_id`       | uint64        | the environment's prompt index                     |
//! | `sample_index`    | uint32        | 0..G within the group                              |
//! | `prompt_ids`      | `list<uint32>` | prompt token ids (the same on every row of a group) |
//! | `completion_ids`  | `list<uint32>` | completion token ids                               |
//! | `behaviour_logps` | `list<float32>` | log-prob of each completion token when sampled     |
//! | `token_versions`  | `list<uint64>` | policy version that sampled each completion token  |
//! | `rewards`         | `list<float32>` | one per reward function, unweighted, in order      |
//! | `sketches`        | `list<uint32>` | GRAIL sketch per completion token, or empty (none) |
//! | `policy_version`  | uint64        | the oldest of `token_versions`                     |
//! | `worker_id`       | string        | the worker that wrote the row                      |
//!
//! The file's key-value metadata `grail.rewards` names the reward functions (a JSON list), so
//! the `rewards` column can be read without the job's config. Rows of a group are consecutive.
//! An object without the `sketches` column (written before it existed) reads as samples without
//! sketches.

use std::sync::Arc;

use arrow_array::builder::{Float32Builder, ListBuilder, UInt32Builder, UInt64Builder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, UInt32Type, UInt64Type};
use arrow_array::{Array, ArrayRef, RecordBatch, StringArray, UInt32Array, UInt64Array};
use bytes::Bytes;
use grail_protocol::{Group, Sample};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

/// The metadata key naming the reward functions.
pub const REWARDS_KEY: &str = "grail.rewards";

/// What a rollout object holds: its groups, the reward functions' names and the worker.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutBatch {
    /// The worker that wrote it.
    pub worker_id: String,
    /// Names of the reward functions, in the order of each sample's `rewards`.
    pub reward_names: Vec<String>,
    /// The groups, each with its samples in `sample_index` order.
    pub groups: Vec<Group>,
}

/// Encodes `batch` as a Parquet file (zstd level 1).
pub fn encode(batch: &RolloutBatch) -> Result<Vec<u8>, String> {
    let rows = batch.groups.iter().map(|g| g.samples.len()).sum::<usize>();
    let mut prompt_id = UInt64Builder::with_capacity(rows);
    let mut sample_index = UInt32Builder::with_capacity(rows);
    let mut prompt_ids = ListBuilder::new(UInt32Builder::new());
    let mut completion_ids = ListBuilder::new(UInt32Builder::new());
    let mut logps = ListBuilder::new(Float32Builder::new());
    let mut versions = ListBuilder::new(UInt64Builder::new());
    let mut rewards = ListBuilder::new(Float32Builder::new());
    let mut sketches = ListBuilder::new(UInt32Builder::new());
    let mut policy_version = UInt64Builder::with_capacity(rows);
    for group in &batch.groups {
        for (i, s) in group.samples.iter().enumerate() {
            prompt_id.append_value(group.prompt_id);
            sample_index.append_value(i as u32);
            prompt_ids.values().append_slice(&group.prompt_ids);
            prompt_ids.append(true);
            completion_ids.values().append_slice(&s.completion_ids);
            completion_ids.append(true);
            logps.values().append_slice(&s.behaviour_logps);
            logps.append(true);
            versions.values().append_slice(&s.token_versions);
            versions.append(true);
            rewards.values().append_slice(&s.rewards);
            rewards.append(true);
            sketches.values().append_slice(&s.sketches);
            sketches.append(true);
            policy_version.append_value(s.policy_version);
        }
    }
    let worker = StringArray::from(vec![batch.worker_id.as_str(); rows]);
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("prompt_id", Arc::new(prompt_id.finish())),
        ("sample_index", Arc::new(sample_index.finish())),
        ("prompt_ids", Arc::new(prompt_ids.finish())),
        ("completion_ids", Arc::new(completion_ids.finish())),
        ("behaviour_logps", Arc::new(logps.finish())),
        ("token_versions", Arc::new(versions.finish())),
        ("rewards", Arc::new(rewards.finish())),
        ("sketches", Arc::new(sketches.finish())),
        ("policy_version", Arc::new(policy_version.finish())),
        ("worker_id", Arc::new(worker)),
    ];
    let record = RecordBatch::try_from_iter(columns).map_err(|e| e.to_string())?;
    let names = serde_json::to_string(&batch.reward_names).expect("strings serialise");
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("level 1")))
        .set_key_value_metadata(Some(vec![KeyValue::new(REWARDS_KEY.into(), names)]))
        .build();
    let mut out = Vec::new();
    let mut writer =
        ArrowWriter::try_new(&mut out, record.schema(), Some(props)).map_err(|e| e.to_string())?;
    writer.write(&record).map_err(|e| e.to_string())?;
    writer.close().map_err(|e| e.to_string())?;
    Ok(out)
}

/// Decodes a rollout object. Anything that is not what [`encode`] writes — not Parquet, a
/// missing or mistyped column, a group whose rows are not consecutive or not numbered 0..G, a
/// sample whose per-token columns differ in length — is an error saying what.
pub fn decode(bytes: Bytes) -> Result<RolloutBatch, String> {
    // The parquet crate panics on some corrupt files (negative column offsets, among others):
    // an object from another process must never take the trainer down.
    std::panic::catch_unwind(|| decode_unchecked(bytes)).unwrap_or_else(|panic| {
        let why = grail_protocol::panic_message(panic.as_ref());
        Err(format!("corrupt Parquet ({why})"))
    })
}

fn decode_unchecked(bytes: Bytes) -> Result<RolloutBatch, String> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| e.to_string())?;
    let reward_names = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|k| k.key == REWARDS_KEY))
        .and_then(|k| k.value.as_deref())
        .ok_or_else(|| format!("no `{REWARDS_KEY}` metadata"))
        .and_then(|v| {
            serde_json::from_str::<Vec<String>>(v)
                .map_err(|e| format!("`{REWARDS_KEY}` metadata: {e}"))
        })?;
    let reader = builder.build().map_err(|e| e.to_string())?;
    let mut worker_id: Option<String> = None;
    let mut groups: Vec<Group> = Vec::new();
    for record in reader {
        let record = record.map_err(|e| e.to_string())?;
        let cols = Columns::of(&record)?;
        for row in 0..record.num_rows() {
            let worker = cols.worker_id.value(row);
            match &worker_id {
                None => worker_id = Some(worker.to_string()),
                Some(w) if w != worker => {
                    return Err(format!("row {row}: worker `{worker}` in `{w}`'s object"));
                }
                Some(_) => {}
            }
            let id = cols.prompt_id.value(row);
            let index = cols.sample_index.value(row) as usize;
            let sample = Sample {
                completion_ids: list::<UInt32Type>(cols.completion_ids, row),
                behaviour_logps: list::<Float32Type>(cols.logps, row),
                rewards: list::<Float32Type>(cols.rewards, row),
                policy_version: cols.policy_version.value(row),
                token_versions: list::<UInt64Type>(cols.versions, row),
                sketches: cols
                    .sketches
                    .map_or_else(Vec::new, |c| list::<UInt32Type>(c, row)),
            };
            let n = sample.completion_ids.len();
            if sample.behaviour_logps.len() != n
                || sample.token_versions.len() != n
                || !(sample.sketches.is_empty() || sample.sketches.len() == n)
            {
                return Err(format!(
                    "prompt {id} sample {index}: {n} tokens, {} log-probs, {} token versions, \
                     {} sketches",
                    sample.behaviour_logps.len(),
                    sample.token_versions.len(),
                    sample.sketches.len()
                ));
            }
            let prompt = list::<UInt32Type>(cols.prompt_ids, row);
            let continues = groups
                .last()
                .is_some_and(|g| g.prompt_id == id && index > 0);
            if !continues {
                groups.push(Group {
                    prompt_id: id,
                    prompt_ids: Arc::new(prompt),
                    samples: Vec::new(),
                });
            } else if *groups.last().expect("continues").prompt_ids != prompt {
                return Err(format!("prompt {id} sample {index}: a different prompt"));
            }
            let group = groups.last_mut().expect("pushed");
            if index != group.samples.len() {
                return Err(format!(
                    "prompt {id}: sample {index} where sample {} was due",
                    group.samples.len()
                ));
            }
            group.samples.push(sample);
        }
    }
    Ok(RolloutBatch {
        worker_id: worker_id.unwrap_or_default(),
        reward_names,
        groups,
    })
}

/// The columns of a record batch, each checked for its type.
struct Columns<'a> {
    prompt_id: &'a UInt64Array,
    sample_index: &'a UInt32Array,
    prompt_ids: &'a dyn Array,
    completion_ids: &'a dyn Array,
    logps: &'a dyn Array,
    versions: &'a dyn Array,
    rewards: &'a dyn Array,
    /// Absent in objects written before sketches existed.
    sketches: Option<&'a dyn Array>,
    policy_version: &'a UInt64Array,
    worker_id: &'a StringArray,
}

impl<'a> Columns<'a> {
    fn of(record: &'a RecordBatch) -> Result<Self, String> {
        use arrow_schema::DataType as T;
        Ok(Self {
            prompt_id: column(record, "prompt_id")?
                .as_primitive_opt::<UInt64Type>()
                .ok_or("column `prompt_id` is not uint64")?,
            sample_index: column(record, "sample_index")?
                .as_primitive_opt::<UInt32Type>()
                .ok_or("column `sample_index` is not uint32")?,
            prompt_ids: list_column(record, "prompt_ids", &T::UInt32)?,
            completion_ids: list_column(record, "completion_ids", &T::UInt32)?,
            logps: list_column(record, "behaviour_logps", &T::Float32)?,
            versions: list_column(record, "token_versions", &T::UInt64)?,
            rewards: list_column(record, "rewards", &T::Float32)?,
            sketches: match record.column_by_name("sketches") {
                Some(_) => Some(list_column(record, "sketches", &T::UInt32)?),
                None => None,
            },
            policy_version: column(record, "policy_version")?
                .as_primitive_opt::<UInt64Type>()
                .ok_or("column `policy_version` is not uint64")?,
            worker_id: column(record, "worker_id")?
                .as_string_opt::<i32>()
                .ok_or("column `worker_id` is not a string")?,
        })
    }
}

/// Column `name`, which must be there and hold no nulls.
fn column<'a>(record: &'a RecordBatch, name: &str) -> Result<&'a dyn Array, String> {
    let c = record
        .column_by_name(name)
        .ok_or_else(|| format!("no column `{name}`"))?;
    if c.null_count() > 0 {
        return Err(format!("column `{name}` has nulls"));
    }
    Ok(c.as_ref())
}

/// Column `name`, which must be a list of `item`s without nulls.
fn list_column<'a>(
    record: &'a RecordBatch,
    name: &str,
    item: &arrow_schema::DataType,
) -> Result<&'a dyn Array, String> {
    let c = column(record, name)?;
    match c.as_list_opt::<i32>() {
        Some(l) if l.values().data_type() == item && l.values().null_count() == 0 => Ok(c),
        _ => Err(format!("column `{name}` is not a list of {item}")),
    }
}

/// Row `row` of a list column whose items are `T` (checked by [`Columns::of`]).
fn list<T: arrow_array::ArrowPrimitiveType>(column: &dyn Array, row: usize) -> Vec<T::Native> {
    column
        .as_list::<i32>()
        .value(row)
        .as_primitive::<T>()
        .values()
        .to_vec()
}
