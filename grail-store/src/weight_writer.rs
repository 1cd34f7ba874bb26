//! The trainer's side of weights in the store (PULSE): each version as an immutable object, a
//! full anchor every `anchor_interval` versions and a delta in between, its READY marker last.

use grail_protocol::{Compression, NamedTensor, PolicyVersion, WireDtype, delta, weights_hash};

use crate::anchor;
use crate::error::StoreError;
use crate::layout::{
    READY_FILE, Ready, VersionKind, WEIGHTS, hash_hex, parse_weight_key, weight_key,
};
use crate::store::Store;

/// How the trainer publishes weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightWriterConfig {
    /// The dtype weights travel at (bf16 for PULSE).
    pub wire: WireDtype,
    /// A full anchor every this many versions (`weight_anchor_interval`); deltas in between.
    pub anchor_interval: u64,
    /// How many anchors to keep, with the deltas that follow them; older versions are deleted.
    pub keep_anchors: usize,
    /// How deltas are compressed.
    pub compression: Compression,
}

impl Default for WeightWriterConfig {
    fn default() -> Self {
        Self {
            wire: WireDtype::Bf16,
            anchor_interval: 10,
            keep_anchors: 2,
            compression: Compression::Zstd,
        }
    }
}

/// What one publication wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The version.
    pub version: PolicyVersion,
    /// Anchor or delta.
    pub kind: VersionKind,
    /// Payload bytes.
    pub bytes: usize,
    /// The payload's location.
    pub location: String,
}

/// Publishes weight versions to a run's store.
pub struct WeightWriter {
    store: Store,
    cfg: WeightWriterConfig,
    /// The last version published, its weights at the wire dtype, and its anchor.
    last: Option<(PolicyVersion, Vec<NamedTensor>, PolicyVersion)>,
}

impl WeightWriter {
    /// A writer whose first publication is an anchor (a restarted trainer starts a new chain).
    pub fn new(store: Store, cfg: WeightWriterConfig) -> Self {
        Self {
            store,
            cfg,
            last: None,
        }
    }

    /// Publishes `tensors` as `version`: the payload, then its READY marker naming it. A
    /// version whose marker exists is never rewritten ([`StoreError::VersionExists`]). Tensors
    /// are published sorted by name, each rounded to the wire dtype.
    pub fn publish(
        &mut self,
        version: PolicyVersion,
        tensors: &[NamedTensor],
    ) -> Result<Published, StoreError> {
        let wire = self.cfg.wire;
        let ready_key = weight_key(version, READY_FILE);
        let exists = || StoreError::VersionExists {
            version,
            key: self.store.location(&ready_key),
        };
        if self.store.get(&ready_key)?.is_some() {
            return Err(exists());
        }
        let mut rounded: Vec<NamedTensor> = tensors
            .iter()
            .map(|t| NamedTensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                values: t.values.iter().map(|&v| wire.round(v)).collect(),
            })
            .collect();
        rounded.sort_by(|a, b| a.name.cmp(&b.name));
        check_tensors(&rounded).map_err(|why| StoreError::Layout { version, why })?;
        let interval = self.cfg.anchor_interval.max(1);
        let follows = match &self.last {
            Some((v, last, anchor)) if v + 1 == version && !version.is_multiple_of(interval) => {
                same_layout(last, &rounded).map_err(|why| StoreError::Layout { version, why })?;
                Some((*v, last, *anchor))
            }
            _ => None,
        };
        let (kind, base, anchor, payload) = match follows {
            Some((base, last, anchor)) => (
                VersionKind::Delta,
                Some(base),
                anchor,
                delta::encode_with(last, &rounded, wire, self.cfg.compression),
            ),
            None => (
                VersionKind::Full,
                None,
                version,
                anchor::encode(&rounded, wire)
                    .map_err(|why| StoreError::Layout { version, why })?,
            ),
        };
        let name = kind.payload_name(&payload);
        let payload_key = weight_key(version, &name);
        let bytes = payload.len();
        self.store.put(&payload_key, payload)?;
        let ready = Ready {
            version,
            kind,
            base,
            anchor,
            payload: name,
            wire,
            hash: hash_hex(weights_hash(&rounded, wire)),
            bytes: bytes as u64,
            published_ms: Some(crate::progress::now_ms()),
        };
        let marker = serde_json::to_vec_pretty(&ready).expect("a READY marker serialises");
        if !self.store.create(&ready_key, marker)? {
            return Err(exists());
        }
        self.last = Some((version, rounded, anchor));
        if kind == VersionKind::Full {
            // The version is published; old versions left behind cost only space.
            if let Err(e) = self.retain() {
                tracing::warn!("weights retention after version {version}: {e}");
            }
        }
        Ok(Published {
            version,
            kind,
            bytes,
            location: self.store.location(&payload_key),
        })
    }

    /// Deletes every version older than the oldest of the newest `keep_anchors` anchors,
    /// oldest first and each marker before its payload, so a version disappears as a whole
    /// (a reader that finds its marker gone forgets it).
    fn retain(&self) -> Result<(), StoreError> {
        let keys = self.store.list(WEIGHTS)?;
        let ready: std::collections::BTreeSet<PolicyVersion> = keys
            .iter()
            .filter_map(|k| parse_weight_key(k))
            .filter(|(_, f)| *f == READY_FILE)
            .map(|(v, _)| v)
            .collect();
        let mut anchors: Vec<PolicyVersion> = keys
            .iter()
            .filter_map(|k| parse_weight_key(k))
            .filter(|(v, f)| f.starts_with("full-") && ready.contains(v))
            .map(|(v, _)| v)
            .collect();
        anchors.sort_unstable();
        anchors.dedup();
        let keep = self.cfg.keep_anchors.max(1);
        if anchors.len() <= keep {
            return Ok(());
        }
        let oldest_kept = anchors[anchors.len() - keep];
        let mut old: Vec<(PolicyVersion, &str, &String)> = keys
            .iter()
            .filter_map(|k| parse_weight_key(k).map(|(v, f)| (v, f, k)))
            .filter(|(v, _, _)| *v < oldest_kept)
            .collect();
        old.sort_by_key(|(v, f, _)| (*v, *f != READY_FILE));
        for (_, _, key) in old {
            self.store.delete(key)?;
        }
        Ok(())
    }
}

/// Whether tensor names are unique and every tensor has as many values as its shape says.
fn check_tensors(tensors: &[NamedTensor]) -> Result<(), String> {
    for pair in tensors.windows(2) {
        if pair[0].name == pair[1].name {
            return Err(format!("tensor `{}` appears twice", pair[0].name));
        }
    }
    for t in tensors {
        let expected: usize = t.shape.iter().product();
        if t.values.len() != expected {
            return Err(format!(
                "tensor `{}` has {} values for shape {:?}",
                t.name,
                t.values.len(),
                t.shape
            ));
        }
    }
    Ok(())
}

/// Whether `new` lists the same tensors with the same shapes as `old`.
fn same_layout(old: &[NamedTensor], new: &[NamedTensor]) -> Result<(), String> {
    if old.len() != new.len() {
        return Err(format!(
            "{} tensors where the previous version had {}",
            new.len(),
            old.len()
        ));
    }
    for (o, n) in old.iter().zip(new) {
        if o.name != n.name || o.shape != n.shape {
            return Err(format!(
                "tensor `{}` {:?} where the previous version had `{}` {:?}",
                n.name, n.shape, o.name, o.shape
            ));
        }
    }
    Ok(())
}

/// The newest version with a READY marker in `store` (`None` before the first publish): where a
/// restarted trainer continues from.
pub fn newest_version(store: &Store) -> Result<Option<PolicyVersion>, StoreError> {
    Ok(store
        .list(WEIGHTS)?
        .iter()
        .filter_map(|k| parse_weight_key(k))
        .filter(|(_, file)| *file == READY_FILE)
        .map(|(v, _)| v)
        .max())
}
