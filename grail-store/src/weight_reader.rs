//! A rollout worker's side of weights in the store: the newest version it can reconstruct,
//! reached by the deltas after the version it holds or else from the newest anchor, every
//! version checked against the hash in its READY marker.
//!
//! What other processes wrote can be wrong (a torn or corrupt object, a hash that does not
//! match, a delta whose base is gone): each such version is reported once as a [`WeightFault`]
//! naming its key, never applied, and the reader goes on with the versions it can trust.

use std::collections::{BTreeMap, BTreeSet};

use grail_protocol::{NamedTensor, PolicyVersion, WireDtype, delta, weights_hash};

use crate::anchor;
use crate::error::StoreError;
use crate::layout::{
    READY_FILE, Ready, VersionKind, WEIGHTS, hash_hex, parse_weight_key, weight_key,
};
use crate::store::Store;

/// A version the reader could not use, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightFault {
    /// The version.
    pub version: PolicyVersion,
    /// The object at fault (its location in the store).
    pub location: String,
    /// What is wrong with it.
    pub reason: String,
}

impl std::fmt::Display for WeightFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "weights version {} at {}: {}",
            self.version, self.location, self.reason
        )
    }
}

/// Why a version cannot be reconstructed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Broken {
    /// A link was found unusable before (and reported then).
    Bad,
    /// A link's READY marker is not in the store.
    Missing(PolicyVersion),
    /// A delta's marker (at the first version) names a base other than the version before it.
    BadBase(PolicyVersion, Option<PolicyVersion>),
}

/// Why following a chain stopped early.
enum Stop {
    /// An object at fault; the version is never tried again.
    Fault(WeightFault),
    /// The version was deleted by the writer's retention while being read: forget it.
    Deleted(PolicyVersion),
    /// The store could not be reached.
    Store(StoreError),
}

/// What one [`WeightReader::catch_up`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatchUp {
    /// Whether the held weights changed.
    pub changed: bool,
    /// Versions found unusable on this call (each is reported once).
    pub faults: Vec<WeightFault>,
}

/// Reads a run's weights from the store, version after version.
pub struct WeightReader {
    store: Store,
    wire: WireDtype,
    held: Option<(PolicyVersion, Vec<NamedTensor>)>,
    markers: BTreeMap<PolicyVersion, Ready>,
    /// Versions at fault: never applied, never reported again.
    bad: BTreeSet<PolicyVersion>,
    /// Deltas reported for a missing base: not tried until the base appears, not reported again.
    reported: BTreeSet<PolicyVersion>,
}

impl WeightReader {
    /// A reader holding no weights: its first catch-up reads the newest anchor.
    pub fn new(store: Store, wire: WireDtype) -> Self {
        Self {
            store,
            wire,
            held: None,
            markers: BTreeMap::new(),
            bad: BTreeSet::new(),
            reported: BTreeSet::new(),
        }
    }

    /// A reader that already holds `version` (e.g. the model directory's weights, version 0):
    /// it follows the deltas after it while the chain from their anchor through `version` is
    /// still in the store, and reads the newest anchor otherwise.
    pub fn holding(
        store: Store,
        wire: WireDtype,
        version: PolicyVersion,
        tensors: Vec<NamedTensor>,
    ) -> Self {
        let mut tensors: Vec<NamedTensor> = tensors
            .into_iter()
            .map(|t| NamedTensor {
                values: t.values.iter().map(|&v| wire.round(v)).collect(),
                ..t
            })
            .collect();
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        Self {
            held: Some((version, tensors)),
            ..Self::new(store, wire)
        }
    }

    /// The version held, if any.
    pub fn version(&self) -> Option<PolicyVersion> {
        self.held.as_ref().map(|(v, _)| *v)
    }

    /// The weights held (sorted by name, at the wire dtype), if any.
    pub fn tensors(&self) -> Option<&[NamedTensor]> {
        self.held.as_ref().map(|(_, t)| t.as_slice())
    }

    /// The READY marker of the version held, if any.
    pub fn marker(&self) -> Option<&Ready> {
        self.markers.get(&self.version()?)
    }

    /// Moves to the newest version that can be reconstructed and checked. Errors are failures
    /// to reach the store (the reader keeps what it holds); faults in its objects are in the
    /// result.
    pub fn catch_up(&mut self) -> Result<CatchUp, StoreError> {
        let mut out = CatchUp::default();
        self.refresh_markers(&mut out.faults)?;
        loop {
            let held = self.version();
            let Some(target) = self
                .markers
                .keys()
                .rev()
                .copied()
                .filter(|&v| held.is_none_or(|h| v > h))
                .find(|&v| self.chain(v).is_ok())
            else {
                break;
            };
            let chain = self.chain(target).expect("the target is reachable");
            // Deltas from the version held when it is on the chain, else from the anchor.
            let start = match held {
                Some(h) if chain.contains(&h) => chain.iter().position(|&v| v == h).unwrap() + 1,
                _ => 0,
            };
            let result = self.follow(&chain[start..]);
            out.changed |= self.version() != held;
            match result {
                Ok(()) => {}
                Err(Stop::Fault(fault)) => {
                    self.bad.insert(fault.version);
                    tracing::warn!("{fault}; skipped");
                    out.faults.push(fault);
                }
                Err(Stop::Deleted(version)) => {
                    self.markers.remove(&version);
                }
                Err(Stop::Store(e)) => return Err(e),
            }
        }
        self.report_broken_chains(&mut out.faults);
        Ok(out)
    }

    /// Newer versions that no chain reaches: names the broken link, once. A missing base is not
    /// held against the delta for good (a listing may have missed a marker written a moment
    /// before): it is tried again when the base appears.
    fn report_broken_chains(&mut self, faults: &mut Vec<WeightFault>) {
        let newer: Vec<PolicyVersion> = self
            .markers
            .keys()
            .copied()
            .filter(|&v| self.version().is_none_or(|h| v > h))
            .collect();
        for v in newer {
            let broken = match self.chain(v) {
                Ok(_) | Err(Broken::Bad) => continue,
                Err(broken) => broken,
            };
            let (version, reason, for_good) = match broken {
                Broken::Bad => continue,
                Broken::Missing(base) => (
                    base + 1,
                    format!(
                        "its base (version {base}) is not in the store (deleted, or never published)"
                    ),
                    false,
                ),
                Broken::BadBase(at, base) => (
                    at,
                    format!(
                        "a delta applies to the version before it; its marker names base {base:?}"
                    ),
                    true,
                ),
            };
            if let Broken::Missing(base) = broken {
                // A listing is not a snapshot: the base's marker may have been written just
                // before this listing reached its folder. Ask for it directly before blaming.
                if matches!(self.store.get(&weight_key(base, READY_FILE)), Ok(Some(_))) {
                    continue;
                }
            }
            if !self.reported.insert(version) {
                continue;
            }
            if for_good {
                self.bad.insert(version);
            }
            let fault = WeightFault {
                version,
                location: self
                    .store
                    .location(&weight_key(version, &self.markers[&version].payload)),
                reason,
            };
            tracing::warn!("{fault}; skipped");
            faults.push(fault);
        }
    }

    /// Reads the markers of versions not seen before and forgets those no longer listed.
    fn refresh_markers(&mut self, faults: &mut Vec<WeightFault>) -> Result<(), StoreError> {
        let keys = self.store.list(WEIGHTS)?;
        let listed: BTreeSet<PolicyVersion> = keys
            .iter()
            .filter_map(|k| parse_weight_key(k))
            .filter(|(_, f)| *f == READY_FILE)
            .map(|(v, _)| v)
            .collect();
        self.markers.retain(|v, _| listed.contains(v));
        for &version in &listed {
            if self.markers.contains_key(&version) || self.bad.contains(&version) {
                continue;
            }
            let key = weight_key(version, READY_FILE);
            let Some(bytes) = self.store.get(&key)? else {
                continue; // deleted since the listing
            };
            let fault = |reason: String| WeightFault {
                version,
                location: self.store.location(&key),
                reason,
            };
            match serde_json::from_slice::<Ready>(&bytes) {
                Ok(r) if r.version != version => {
                    faults.push(fault(format!("marker names version {}", r.version)))
                }
                Ok(r) if r.wire != self.wire => faults.push(fault(format!(
                    "weights travel as {:?}, this reader expects {:?}",
                    r.wire, self.wire
                ))),
                Ok(r) if !payload_name_fits(&r) => faults.push(fault(format!(
                    "payload `{}` is not a {:?} file of this version's folder",
                    r.payload, r.kind
                ))),
                Ok(r) => {
                    self.markers.insert(version, r);
                    continue;
                }
                Err(e) => faults.push(fault(format!("unreadable READY marker: {e}"))),
            }
            let last = faults.last().expect("just pushed");
            tracing::warn!("{last}; skipped");
            self.bad.insert(version);
        }
        Ok(())
    }

    /// The versions that reconstruct `version`: its anchor first, then each delta in order.
    fn chain(&self, version: PolicyVersion) -> Result<Vec<PolicyVersion>, Broken> {
        let mut chain = vec![version];
        let mut at = version;
        loop {
            if self.bad.contains(&at) {
                return Err(Broken::Bad);
            }
            let marker = self.markers.get(&at).ok_or(Broken::Missing(at))?;
            match (marker.kind, marker.base) {
                (VersionKind::Full, _) => break,
                (VersionKind::Delta, Some(base)) if at.checked_sub(1) == Some(base) => {
                    chain.push(base);
                    at = base;
                }
                (VersionKind::Delta, base) => return Err(Broken::BadBase(at, base)),
            }
        }
        chain.reverse();
        Ok(chain)
    }

    /// Applies `versions` in order to the held weights (the first may be an anchor), checking
    /// each against its marker's size and hash. An anchor replaces the held weights only once
    /// it checks out; a delta that does not leaves weights that match no version, so the
    /// reader then holds nothing (and reads an anchor next).
    fn follow(&mut self, versions: &[PolicyVersion]) -> Result<(), Stop> {
        for &version in versions {
            let marker = self.markers[&version].clone();
            let key = weight_key(version, &marker.payload);
            let fault = |reason: String| {
                Stop::Fault(WeightFault {
                    version,
                    location: self.store.location(&key),
                    reason,
                })
            };
            let bytes = match self.store.get(&key).map_err(Stop::Store)? {
                Some(b) => b,
                // Retention deletes the marker first: if it is gone too, so is the version.
                None => match self.store.get(&weight_key(version, READY_FILE)) {
                    Ok(None) => return Err(Stop::Deleted(version)),
                    Ok(Some(_)) => return Err(fault("payload missing".into())),
                    Err(e) => return Err(Stop::Store(e)),
                },
            };
            if bytes.len() as u64 != marker.bytes {
                return Err(fault(format!(
                    "{} bytes where the marker says {} (torn write?)",
                    bytes.len(),
                    marker.bytes
                )));
            }
            let mismatch = |hash: String| {
                fault(format!(
                    "hash {hash} of the reconstructed weights, marker says {}",
                    marker.hash
                ))
            };
            match marker.kind {
                VersionKind::Full => {
                    let tensors = anchor::decode(&bytes, self.wire).map_err(&fault)?;
                    let hash = hash_hex(weights_hash(&tensors, self.wire));
                    if hash != marker.hash {
                        return Err(mismatch(hash));
                    }
                    self.held = Some((version, tensors));
                }
                VersionKind::Delta => {
                    let (held, tensors) =
                        self.held.as_mut().expect("a delta follows a held version");
                    delta::apply(tensors, self.wire, &bytes).map_err(|e| fault(e.to_string()))?;
                    *held = version;
                    let hash = hash_hex(weights_hash(tensors, self.wire));
                    if hash != marker.hash {
                        self.held = None;
                        return Err(mismatch(hash));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Whether a marker's payload is a file of its own kind in its own folder.
fn payload_name_fits(r: &Ready) -> bool {
    let (stem, ext) = match r.kind {
        VersionKind::Full => ("full-", ".safetensors"),
        VersionKind::Delta => ("delta-", ".bin"),
    };
    r.payload.starts_with(stem)
        && r.payload.ends_with(ext)
        && r.payload
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}
