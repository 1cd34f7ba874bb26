//! The train / held-out split: an instance is held out exactly when a hash of its content falls
//! in the held-out bucket, so the two sides never share one, whatever the seed or the order.

/// Which side of the train / held-out split an environment serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Training prompts.
    Train,
    /// Held-out prompts (accuracy is measured on these).
    Eval,
}

/// One instance in ten is held out.
pub(crate) const EVAL_BUCKETS: u64 = 10;

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Split {
    /// Whether the instance identified by `key` (its prompt text, say) belongs to this split.
    pub fn contains(self, key: &str) -> bool {
        fnv(key.as_bytes()).is_multiple_of(EVAL_BUCKETS) == (self == Split::Eval)
    }
}
