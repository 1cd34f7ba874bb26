//! The trainer's record of the store's rollout objects: which it read, handed to the trainer,
//! refused or could not decode. A checkpoint saves it as a [`RolloutCursor`], from which a
//! resumed trainer reads on: objects settled before the checkpoint are never trained on again,
//! the one in progress continues after its settled groups, and everything later is read again.

use std::collections::BTreeMap;

use crate::checkpoint::RolloutCursor;

/// One object the inbox is done reading, in the order it was read.
#[derive(Debug)]
struct Entry {
    key: String,
    /// The worker that wrote it (`None`: it could not be decoded).
    worker: Option<String>,
    /// Groups handed to the trainer (0 for a refused object).
    groups: usize,
    /// Groups skipped at its start (settled before the checkpoint this attempt resumed from).
    skipped: usize,
    /// Samples in the whole object.
    samples: u64,
}

/// What the inbox did with each rollout object, since the run began.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    /// Where this attempt began (the checkpoint's cursor; empty for a new run).
    base: RolloutCursor,
    entries: Vec<Entry>,
    /// Samples in every decodable object read, by worker (the base's settled ones included).
    pub decoded: BTreeMap<String, u64>,
    /// Samples in objects refused by the check.
    pub refused_samples: u64,
    /// Groups in objects refused by the check.
    pub refused_groups: u64,
    /// Samples in objects refused by the check, by worker and reason.
    pub refused_by: BTreeMap<String, BTreeMap<String, u64>>,
    /// Objects refused or undecodable in this attempt.
    pub faults: u64,
    /// Samples accepted but not handed to the trainer when it stopped.
    pub held: u64,
}

impl Ledger {
    /// The ledger of an attempt that begins at `base` (a checkpoint's cursor, if any).
    pub(crate) fn resume(base: Option<RolloutCursor>) -> Self {
        let base = base.unwrap_or_default();
        Self {
            decoded: base.decoded.clone(),
            refused_samples: base.refused_samples,
            refused_groups: base.refused_groups,
            refused_by: base.refused_by.clone(),
            base,
            ..Self::default()
        }
    }

    /// Objects the reader of this attempt skips: those settled before it began, and the one
    /// that was in progress (the inbox takes it up first, before any other).
    pub(crate) fn not_to_list(&self) -> impl Iterator<Item = String> + '_ {
        let partial = self.base.partial.iter().map(|(key, _)| key.clone());
        self.base.settled.iter().cloned().chain(partial)
    }

    /// The object in progress when this attempt began, if any.
    pub(crate) fn in_progress(&self) -> Option<String> {
        self.base.partial.as_ref().map(|(key, _)| key.clone())
    }

    /// Groups at the start of `key` that were settled before this attempt began.
    pub(crate) fn skip(&self, key: &str) -> usize {
        match &self.base.partial {
            Some((k, n)) if k == key => *n,
            _ => 0,
        }
    }

    /// Groups settled by the trainer since the run began, `settled` of them in this attempt.
    pub(crate) fn consumed_groups(&self, settled: usize) -> u64 {
        self.base.consumed_groups + settled as u64
    }

    /// `key` could not be decoded.
    pub(crate) fn undecodable(&mut self, key: String) {
        self.faults += 1;
        self.entries.push(Entry {
            key,
            worker: None,
            groups: 0,
            skipped: 0,
            samples: 0,
        });
    }

    /// `key`, from `worker` (`samples` samples in all), failed the check for `reason`: its
    /// `groups` groups of `refused` samples not settled before this attempt are refused.
    pub(crate) fn refused(
        &mut self,
        key: String,
        worker: String,
        reason: &str,
        groups: usize,
        samples: u64,
        refused: u64,
    ) {
        self.faults += 1;
        self.refused_samples += refused;
        self.refused_groups += groups as u64;
        *self
            .refused_by
            .entry(worker.clone())
            .or_default()
            .entry(reason.to_string())
            .or_default() += refused;
        *self.decoded.entry(worker.clone()).or_default() += samples;
        self.entries.push(Entry {
            key,
            worker: Some(worker),
            groups: 0,
            skipped: 0,
            samples,
        });
    }

    /// `key`, from `worker` (`samples` samples in all), goes to the trainer: `groups` groups
    /// after the `skipped` first.
    pub(crate) fn handed(
        &mut self,
        key: String,
        worker: String,
        groups: usize,
        skipped: usize,
        samples: u64,
    ) {
        *self.decoded.entry(worker.clone()).or_default() += samples;
        self.entries.push(Entry {
            key,
            worker: Some(worker),
            groups,
            skipped,
            samples,
        });
    }

    /// The cursor once the trainer has taken the first `settled` groups handed to it in this
    /// attempt off its channel (it takes them in the order they were handed; those of a batch
    /// it stopped in count as unused and are not read again).
    pub(crate) fn cursor(&self, settled: usize) -> RolloutCursor {
        let mut cursor = RolloutCursor {
            partial: None,
            consumed_groups: self.consumed_groups(settled),
            refused_samples: self.refused_samples,
            refused_groups: self.refused_groups,
            refused_by: self.refused_by.clone(),
            ..self.base.clone()
        };
        let mut left = settled;
        for e in &self.entries {
            let done = e.groups <= left;
            if done {
                left -= e.groups;
            }
            if done || e.groups == 0 {
                cursor.settled.push(e.key.clone());
                if let Some(w) = &e.worker {
                    *cursor.decoded.entry(w.clone()).or_default() += e.samples;
                }
            } else if cursor.partial.is_none() && e.skipped + left > 0 {
                cursor.partial = Some((e.key.clone(), e.skipped + left));
                left = 0;
            } else {
                left = 0;
            }
        }
        // The object in progress at the start, not taken up again yet, stays in progress.
        if let Some((key, n)) = &self.base.partial
            && !self.entries.iter().any(|e| &e.key == key)
        {
            cursor.partial = Some((key.clone(), *n));
        }
        cursor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Objects a (4 groups), b (refused), c (4 groups), d (undecodable), e (4 groups).
    fn ledger() -> Ledger {
        let mut l = Ledger::resume(None);
        l.handed("a".into(), "w".into(), 4, 0, 40);
        l.refused("b".into(), "v".into(), "logprob", 2, 20, 20);
        l.handed("c".into(), "w".into(), 4, 0, 40);
        l.undecodable("d".into());
        l.handed("e".into(), "v".into(), 4, 0, 40);
        l
    }

    #[test]
    fn the_cursor_settles_whole_objects_and_remembers_the_partial_one() {
        let c = ledger().cursor(6);
        assert_eq!(c.settled, ["a", "b", "d"]);
        assert_eq!(c.partial, Some(("c".into(), 2)));
        assert_eq!(
            c.decoded,
            BTreeMap::from([("w".into(), 40), ("v".into(), 20)])
        );
        assert_eq!(
            (c.refused_samples, c.refused_groups, c.consumed_groups),
            (20, 2, 6)
        );
        let c = ledger().cursor(8);
        assert_eq!(c.settled, ["a", "b", "c", "d"]);
        assert_eq!(c.partial, None);
    }

    #[test]
    fn a_refused_object_in_progress_at_a_resume_refuses_only_its_unsettled_groups() {
        // c's first 2 groups (20 samples) trained before the checkpoint; the resumed attempt
        // refuses c (its versions are no longer held): the other 2 groups are refused.
        let mut l = Ledger::resume(Some(ledger().cursor(6)));
        l.refused("c".into(), "w".into(), "unknown_version", 2, 40, 20);
        let c = l.cursor(0);
        assert_eq!(
            (c.refused_samples, c.refused_groups, c.consumed_groups),
            (40, 4, 6)
        );
        assert_eq!(c.refused_by["w"]["unknown_version"], 20);
        assert_eq!(c.decoded["w"], 80);
        assert_eq!(c.partial, None);
    }

    #[test]
    fn a_resumed_ledger_skips_the_settled_groups_and_counts_on() {
        let mut l = Ledger::resume(Some(ledger().cursor(6)));
        assert_eq!(l.not_to_list().collect::<Vec<_>>(), ["a", "b", "d", "c"]);
        assert_eq!(l.in_progress(), Some("c".into()));
        // Before the resumed attempt takes c up again, c stays in progress.
        assert_eq!(l.cursor(0).partial, Some(("c".into(), 2)));
        assert_eq!((l.skip("c"), l.skip("e")), (2, 0));
        // The resumed attempt reads c again (2 groups left after the skip), then e.
        l.handed("c".into(), "w".into(), 2, 2, 40);
        l.handed("e".into(), "v".into(), 4, 0, 40);
        let c = l.cursor(1);
        assert_eq!(c.partial, Some(("c".into(), 3)));
        assert_eq!(c.consumed_groups, 7);
        let c = l.cursor(6);
        assert_eq!(c.settled, ["a", "b", "d", "c", "e"]);
        assert_eq!(
            c.decoded,
            BTreeMap::from([("w".into(), 80), ("v".into(), 60)])
        );
        assert_eq!(c.consumed_groups, 12);
    }
}
