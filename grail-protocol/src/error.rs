//! Why a weight update cannot be applied.

use crate::group::PolicyVersion;

/// A weight update the receiver refuses; its tensors stay as they were.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The delta's bytes do not decode against the tensors it is applied to.
    #[error("corrupt weight delta: {0}")]
    CorruptDelta(String),
    /// A delta applied to a version other than the one it was encoded against.
    #[error(
        "weight delta from version {base} to {version} applied on version {held} (deltas must arrive in order)"
    )]
    OutOfOrder {
        /// The version the delta applies to.
        base: PolicyVersion,
        /// The version it brings the receiver to.
        version: PolicyVersion,
        /// The version the receiver holds.
        held: PolicyVersion,
    },
}
