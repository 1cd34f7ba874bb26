//! The error type of grail-core: every failure names what went wrong and where.

use std::path::PathBuf;

/// Errors from loading configs, checkpoints and tokenizers.
#[derive(Debug, thiserror::Error)]
pub enum GrailError {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error (shown in the message, so not chained as a source).
        error: std::io::Error,
    },
    /// A JSON file (config.json, an index, tokenizer_config.json) is not valid JSON or misses a field.
    #[error("{path}: invalid JSON: {message}")]
    Json {
        /// The file involved.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A config value we do not support or that is out of range.
    #[error("config field `{field}` = {value}: {reason}")]
    Config {
        /// The config.json key (dotted for nested keys).
        field: String,
        /// The offending value, as written in the file.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A checkpoint tensor the model needs is absent.
    #[error("checkpoint {path}: missing tensor `{name}` (expected shape {expected:?})")]
    MissingTensor {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// The Hugging Face tensor name.
        name: String,
        /// The shape the model expects.
        expected: Vec<usize>,
    },
    /// A checkpoint holds tensors the model does not know.
    #[error("checkpoint {path}: unexpected tensor(s) {names:?}")]
    UnexpectedTensors {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// The tensor names that were not consumed.
        names: Vec<String>,
    },
    /// A checkpoint tensor has the wrong shape.
    #[error("checkpoint {path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// The Hugging Face tensor name.
        name: String,
        /// The shape the model expects.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A safetensors file is truncated, corrupt or holds an unsupported dtype.
    #[error("checkpoint {path}: {message}")]
    Safetensors {
        /// The file involved.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The tokenizer could not be loaded, trained or run.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A chat template failed to parse or render.
    #[error("chat template: {0}")]
    Template(String),
    /// Bad arguments to a model call (ids out of range, inconsistent layout).
    #[error("invalid input: {0}")]
    Input(String),
    /// A weight update that cannot be applied (corrupt, or out of order).
    #[error(transparent)]
    Protocol(#[from] grail_protocol::ProtocolError),
}

/// Result alias for grail-core.
pub type Result<T, E = GrailError> = std::result::Result<T, E>;

impl GrailError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            error: source,
        }
    }

    /// A config error for `field` holding `value`.
    pub fn config(field: &str, value: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        Self::Config {
            field: field.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

impl From<grail_kernels::device::DeviceError> for GrailError {
    fn from(e: grail_kernels::device::DeviceError) -> Self {
        Self::config("device", e.name, e.reason)
    }
}
