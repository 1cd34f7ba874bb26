//! grail-store: a run's objects in an object store, for runs that span processes and machines.
//!
//! The trainer publishes each weight version as an immutable object — a full anchor every
//! `anchor_interval` versions, a sparse bf16 delta in between (PULSE, as one-covenant/grail
//! does it) — and writes the version's READY marker last; rollout workers read the newest
//! version they can reconstruct and check its hash. Stores are given by URL (`file:///path`,
//! `memory://`) through the `object_store` crate; the calls block, so threads use them directly.
//!
//! ```
//! use grail_protocol::{NamedTensor, WireDtype};
//! use grail_store::{Store, WeightReader, WeightWriter, WeightWriterConfig};
//!
//! let store = Store::open("memory://", "my-run")?;
//! let mut weights = vec![NamedTensor { name: "w".into(), shape: vec![2], values: vec![1.0, 2.0] }];
//! let mut writer = WeightWriter::new(store.clone(), WeightWriterConfig::default());
//! writer.publish(0, &weights)?; // an anchor
//! weights[0].values[1] = 3.0;
//! writer.publish(1, &weights)?; // a delta
//! let mut reader = WeightReader::new(store, WireDtype::Bf16);
//! reader.catch_up()?;
//! assert_eq!((reader.version(), reader.tensors()), (Some(1), Some(&weights[..])));
//! # Ok::<(), grail_store::StoreError>(())
//! ```
#![warn(missing_docs)]

pub mod anchor;
pub mod checkpoints;
pub mod error;
pub mod layout;
pub mod progress;
pub mod prompt_claims;
pub mod rollout_batch;
pub mod rollout_check;
pub mod rollout_reader;
pub mod rollout_writer;
pub mod store;
pub mod weight_reader;
pub mod weight_writer;

pub use error::StoreError;
pub use layout::{Ready, VersionKind};
pub use progress::{TrainerProgress, WorkerCounters};
pub use prompt_claims::PromptClaims;
pub use rollout_batch::RolloutBatch;
pub use rollout_check::RolloutCheck;
pub use rollout_reader::{Arrival, RolloutReader};
pub use rollout_writer::RolloutWriter;
pub use store::Store;
pub use weight_reader::{CatchUp, WeightFault, WeightReader};
pub use weight_writer::{Published, WeightWriter, WeightWriterConfig};
