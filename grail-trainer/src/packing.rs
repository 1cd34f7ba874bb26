//! Sequence packing and token-budget micro-batching.
//!
//! An optimizer step's sequences are split into micro-batches of at most
//! `max_tokens_per_microbatch` tokens each; every micro-batch is one packed row (sequences back to
//! back, positions restarting, attention per sequence), so no padding token is ever computed.
//! The number of micro-batches is the smallest for which a longest-processing-time assignment
//! fits the budget, and that assignment balances the tokens across them.

use crate::error::{Result, TrainerError};

/// One micro-batch: indices of the sequences it holds, in row order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MicroBatch {
    /// Sequence indices (into the step's sequence list).
    pub sequences: Vec<usize>,
    /// Total tokens.
    pub tokens: usize,
}

/// The packing of one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Packing {
    /// Micro-batches in execution order.
    pub micro_batches: Vec<MicroBatch>,
    /// Real tokens / (micro-batches × budget): how full the token budget runs.
    pub budget_utilisation: f64,
}

/// Packs sequences of `lengths` into micro-batches of at most `budget` tokens.
///
/// Errors if a sequence is longer than the budget (naming it) or there is nothing to pack.
pub fn pack(lengths: &[usize], budget: usize) -> Result<Packing> {
    if budget == 0 {
        return Err(TrainerError::config(
            "max_tokens_per_microbatch",
            0,
            "must be positive",
        ));
    }
    if lengths.is_empty() {
        return Err(TrainerError::Input("no sequences to pack".into()));
    }
    if let Some((i, &len)) = lengths.iter().enumerate().find(|(_, l)| **l > budget) {
        return Err(TrainerError::Input(format!(
            "sequence {i} has {len} tokens, more than max_tokens_per_microbatch = {budget}"
        )));
    }
    let total: usize = lengths.iter().sum();
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    // Longest first; ties by index so the packing is deterministic.
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut bins = total.div_ceil(budget).max(1);
    loop {
        if let Some(batches) = lpt(lengths, &order, bins, budget) {
            return Ok(Packing {
                budget_utilisation: total as f64 / (batches.len() * budget) as f64,
                micro_batches: batches,
            });
        }
        bins += 1;
    }
}

/// Longest-processing-time assignment into `bins` bins of capacity `budget`: each sequence goes to
/// the least-loaded bin. `None` if some sequence does not fit there.
fn lpt(lengths: &[usize], order: &[usize], bins: usize, budget: usize) -> Option<Vec<MicroBatch>> {
    let mut batches = vec![
        MicroBatch {
            sequences: Vec::new(),
            tokens: 0
        };
        bins
    ];
    for &i in order {
        let target = batches
            .iter_mut()
            .min_by_key(|b| b.tokens)
            .expect("at least one bin");
        if target.tokens + lengths[i] > budget {
            return None;
        }
        target.tokens += lengths[i];
        target.sequences.push(i);
    }
    batches.retain(|b| !b.sequences.is_empty());
    Some(batches)
}
