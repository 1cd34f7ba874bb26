//! grail-core: the model (Qwen2/Llama decoder in burn), Hugging Face checkpoint I/O and the
//! tokenizer. The rollout pool and the trainer both build on these.
//!
//! ```no_run
//! use grail_core::{checkpoint, device};
//! let device = device::parse_device("cpu").unwrap();
//! let model = checkpoint::load_model("path/to/hf-model", &device).unwrap();
//! let tokens = grail_core::model::greedy(&model, &[1, 2, 3], 8, true).unwrap();
//! ```
#![warn(missing_docs)]

pub mod atomic;
pub mod checkpoint;
pub mod error;
pub mod model;
pub mod tokenizer;

pub use error::{GrailError, Result};
/// Device selection lives with the kernels that run on it.
pub use grail_kernels::device;
