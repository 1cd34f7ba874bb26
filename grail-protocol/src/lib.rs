//! grail-protocol: the data that crosses between the rollout pool and the trainer, and the codec
//! of weight updates.
//!
//! Plain data, with no model and no transport: scored [`Group`]s of [`Sample`]s go one way,
//! [`PoolMessage`]s (a [`WeightUpdate`] or the count of groups consumed) the other. A weight
//! update carries [`NamedTensor`]s in Hugging Face naming, whole or as a sparse delta
//! ([`delta`]); reading them out of a model and building a model from them is the model's side.
//! [`proof`] holds the arithmetic of the GRAIL proof: the hidden-state sketches a worker commits
//! to and a trainer checks at challenged positions when rollouts come from untrusted machines.
//!
//! ```
//! use grail_protocol::{NamedTensor, SyncMode, WeightPayload, WeightUpdate, WireDtype};
//!
//! let old = vec![NamedTensor { name: "w".into(), shape: vec![3], values: vec![1.0, 2.0, 3.0] }];
//! let mut new = old.clone();
//! new[0].values[1] = 2.5;
//! let payload = WeightPayload::encode(SyncMode::Delta, WireDtype::F32, 0, &old, &new);
//! let mut held = old.clone();
//! WeightUpdate { version: 1, payload }.apply_to(&mut held, 0).unwrap();
//! assert_eq!(held, new);
//! ```
#![warn(missing_docs)]

pub mod delta;
pub mod error;
pub mod group;
pub mod message;
pub mod panic_message;
pub mod proof;
pub mod weights;

pub use delta::Compression;
pub use error::ProtocolError;
pub use group::{Group, PolicyVersion, Sample};
pub use message::PoolMessage;
pub use panic_message::panic_message;
pub use weights::{NamedTensor, SyncMode, WeightPayload, WeightUpdate, WireDtype, weights_hash};
