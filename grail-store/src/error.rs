//! What can go wrong between grail and its object store.

use grail_protocol::PolicyVersion;

/// An error reaching or reading the store. Faults in what other processes wrote (a torn or
/// corrupt object, a hash that does not match) are not errors: readers report them as
/// [`crate::WeightFault`]s and go on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store URL cannot be used.
    #[error("store URL `{url}`: {why}")]
    Url {
        /// The URL as given.
        url: String,
        /// Why it cannot be used.
        why: String,
    },
    /// The run id cannot be a folder name.
    #[error("run id `{0}` must be one non-empty path segment (no `/`, no control characters)")]
    RunId(String),
    /// A request to the store failed.
    #[error("object store, {key}: {source}")]
    Io {
        /// The object's location.
        key: String,
        /// What the store said.
        #[source]
        source: Box<object_store::Error>,
    },
    /// A version is already published: versions are immutable.
    #[error(
        "weights version {version} is already published at {key}; versions are never rewritten"
    )]
    VersionExists {
        /// The version.
        version: PolicyVersion,
        /// Its READY marker.
        key: String,
    },
    /// Weights to publish that the writer cannot encode (they differ in layout from the last
    /// version it published).
    #[error("weights version {version}: {why}")]
    Layout {
        /// The version.
        version: PolicyVersion,
        /// What differs.
        why: String,
    },
    /// A worker id that cannot be a folder name.
    #[error(
        "worker id `{0}` must be one path segment of letters, digits, `-`, `_` and `.` (not first)"
    )]
    WorkerId(String),
    /// Data that could not be encoded for the store.
    #[error("{key}: cannot encode: {why}")]
    Encode {
        /// Where it was to go.
        key: String,
        /// Why.
        why: String,
    },
    /// An object that is not what its writer's marker says (a torn upload, a changed file).
    #[error("{key}: {why}")]
    Corrupt {
        /// The object's location.
        key: String,
        /// What is wrong.
        why: String,
    },
    /// A local file that could not be read or written.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}
