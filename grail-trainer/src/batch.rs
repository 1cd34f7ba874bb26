//! Training sequences and their micro-batches, shared by the GRPO step and the supervised warm-up.
//!
//! A step's sequences (prompt + completion tokens) are checked against the model, split into
//! micro-batches within the token budget, and each micro-batch is laid out for the model: one
//! packed row (or, in the padded comparison mode, a grid padded to its longest sequence), with the
//! positions whose hidden states predict the completion tokens.

use burn::tensor::{Device, Int, Tensor, TensorData};
use grail_core::model::{CausalLm, LayerInputs, Layout};

use crate::config::TrainerConfig;
use crate::error::{Result, TrainerError};
use crate::packing::pack;

/// One training sequence: prompt tokens, then the completion tokens the loss is taken over.
#[derive(Debug, Clone)]
pub(crate) struct Sequence {
    pub(crate) tokens: Vec<u32>,
    pub(crate) prompt_len: usize,
}

impl Sequence {
    /// `prompt` followed by `completion`, neither empty and every token inside a vocabulary of
    /// `vocab`; `name` says which sequence an error is about ("group 2 sample 1").
    pub(crate) fn new(
        prompt: &[u32],
        completion: &[u32],
        vocab: usize,
        name: impl Fn() -> String,
    ) -> Result<Self> {
        for (part, tokens) in [("prompt", prompt), ("completion", completion)] {
            if tokens.is_empty() {
                return Err(TrainerError::Input(format!(
                    "{} has an empty {part}",
                    name()
                )));
            }
        }
        let tokens: Vec<u32> = prompt.iter().chain(completion).copied().collect();
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(TrainerError::Input(format!(
                "{}: token {bad} outside the vocabulary ({vocab})",
                name()
            )));
        }
        Ok(Self {
            tokens,
            prompt_len: prompt.len(),
        })
    }

    pub(crate) fn completion_len(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// A step's sequences, split into micro-batches of at most `max_tokens_per_microbatch` tokens.
pub(crate) struct Batch {
    pub(crate) sequences: Vec<Sequence>,
    /// Indices into `sequences`, one list per micro-batch, in execution order.
    pub(crate) micro_batches: Vec<Vec<usize>>,
    packing: bool,
}

impl Batch {
    /// Splits `sequences` as `config` asks: packed rows (the default) or padded grids.
    pub(crate) fn new(sequences: Vec<Sequence>, config: &TrainerConfig) -> Result<Self> {
        if sequences.is_empty() {
            return Err(TrainerError::Input("no sequences to train on".into()));
        }
        let budget = config.max_tokens_per_microbatch;
        let lengths: Vec<usize> = sequences.iter().map(|s| s.tokens.len()).collect();
        let micro_batches = if config.packing {
            pack(&lengths, budget)?
                .micro_batches
                .into_iter()
                .map(|m| m.sequences)
                .collect()
        } else {
            split_padded(&lengths, budget)?
        };
        Ok(Self {
            sequences,
            micro_batches,
            packing: config.packing,
        })
    }

    /// Completion tokens over every sequence.
    pub(crate) fn completion_tokens(&self) -> usize {
        self.sequences.iter().map(Sequence::completion_len).sum()
    }

    /// The micro-batches laid out on `device` (the policy's), one at a time, in order.
    pub(crate) fn assemble<'a>(
        &'a self,
        device: &'a Device,
    ) -> impl Iterator<Item = MicroBatch> + 'a {
        self.micro_batches
            .iter()
            .map(move |members| self.lay_out(members, device))
    }

    /// Lays out one micro-batch as a packed row (or a padded grid in comparison mode).
    fn lay_out(&self, members: &[usize], device: &Device) -> MicroBatch {
        let seqs = &self.sequences;
        let lens: Vec<usize> = members.iter().map(|&i| seqs[i].tokens.len()).collect();
        let (rows, cols, layout) = if self.packing {
            let total = lens.iter().sum();
            (1, total, Layout::packed_single_row(lens.clone()))
        } else {
            let longest = *lens.iter().max().expect("non-empty micro-batch");
            (
                members.len(),
                longest,
                Layout::Padded {
                    lengths: lens.clone(),
                },
            )
        };
        let width = members
            .iter()
            .map(|&i| seqs[i].completion_len())
            .max()
            .unwrap_or(0);
        let mut ids = vec![0i64; rows * cols];
        let (mut pred, mut targets, mut cells) = (Vec::new(), Vec::new(), Vec::new());
        let mut offset = 0;
        for (k, &i) in members.iter().enumerate() {
            let s = &seqs[i];
            let start = if self.packing { offset } else { k * cols };
            for (j, &t) in s.tokens.iter().enumerate() {
                ids[start + j] = t as i64;
            }
            // The hidden state at position p predicts token p + 1.
            for t in 0..s.completion_len() {
                pred.push((start + s.prompt_len - 1 + t) as i64);
                targets.push(s.tokens[s.prompt_len + t] as i64);
                cells.push(k * width + t);
            }
            offset += s.tokens.len();
        }
        let n = pred.len();
        MicroBatch {
            members: members.to_vec(),
            completion_lens: members.iter().map(|&i| seqs[i].completion_len()).collect(),
            ids: Tensor::from_data(TensorData::new(ids, [rows, cols]), device),
            layout,
            prediction_rows: Tensor::from_data(TensorData::new(pred, [n]), device),
            targets: Tensor::from_data(TensorData::new(targets, [n]), device),
            cells,
            width,
            allocated: rows * cols,
        }
    }
}

/// Padded comparison mode: consecutive sequences while rows × longest fits the budget.
fn split_padded(lengths: &[usize], budget: usize) -> Result<Vec<Vec<usize>>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut longest = 0;
    for (i, &len) in lengths.iter().enumerate() {
        if len > budget {
            return Err(TrainerError::Input(format!(
                "sequence {i} has {len} tokens, more than max_tokens_per_microbatch = {budget}"
            )));
        }
        if !current.is_empty() && (current.len() + 1) * longest.max(len) > budget {
            out.push(std::mem::take(&mut current));
            longest = 0;
        }
        current.push(i);
        longest = longest.max(len);
    }
    out.push(current);
    Ok(out)
}

/// A micro-batch laid out for the model: ids, layout, and where each completion token's
/// prediction row sits in the flattened `[rows × cols]` output. Completion tokens are numbered
/// sequence by sequence, in `members` order.
pub(crate) struct MicroBatch {
    /// The sequences it holds (indices into the batch).
    pub(crate) members: Vec<usize>,
    completion_lens: Vec<usize>,
    ids: Tensor<2, Int>,
    layout: Layout,
    prediction_rows: Tensor<1, Int>,
    /// The completion tokens.
    pub(crate) targets: Tensor<1, Int>,
    /// Each completion token's cell on the `[members × width]` grid of the loss.
    pub(crate) cells: Vec<usize>,
    /// The longest completion here.
    pub(crate) width: usize,
    /// Token slots the layout takes (padding included).
    pub(crate) allocated: usize,
}

impl MicroBatch {
    /// `model`'s final hidden states `[completion tokens, hidden]` that predict each completion
    /// token.
    pub(crate) fn prediction_hidden(&self, model: &CausalLm) -> Result<Tensor<2>> {
        let ids = on_device(&self.ids, &model.device());
        Ok(self.predicting(model.forward_hidden(ids, &self.layout)?))
    }

    /// [`prediction_hidden`](Self::prediction_hidden) with gradient checkpointing: also what the
    /// backward needs to recompute the decoder layers ([`LayerInputs::backward`]).
    pub(crate) fn prediction_hidden_checkpointed(
        &self,
        model: &CausalLm,
    ) -> Result<(Tensor<2>, LayerInputs)> {
        let ids = on_device(&self.ids, &model.device());
        let (hidden, kept) = model.forward_hidden_checkpointed(ids, &self.layout)?;
        Ok((self.predicting(hidden), kept))
    }

    /// The rows of `hidden` `[rows, cols, hidden]` that predict a completion token.
    fn predicting(&self, hidden: Tensor<3>) -> Tensor<2> {
        let [rows, cols, h] = hidden.dims();
        let rows_idx = on_device(&self.prediction_rows, &hidden.device());
        hidden.reshape([rows * cols, h]).select(0, rows_idx)
    }

    /// The completion tokens on `device`.
    pub(crate) fn targets_on(&self, device: &Device) -> Tensor<1, Int> {
        on_device(&self.targets, device)
    }

    /// Per-token values of this micro-batch's completion tokens, taken from per-sequence values
    /// of the whole batch.
    pub(crate) fn gather(&self, per_sequence: &[Vec<f32>]) -> Vec<f32> {
        self.members
            .iter()
            .flat_map(|&i| per_sequence[i].iter().copied())
            .collect()
    }

    /// Hands per-token values of this micro-batch's completion tokens back to their sequences in
    /// `per_sequence` (the inverse of [`gather`](Self::gather)).
    pub(crate) fn scatter(&self, per_token: &[f32], per_sequence: &mut [Vec<f32>]) {
        let mut at = 0;
        for (&i, &c) in self.members.iter().zip(&self.completion_lens) {
            per_sequence[i] = per_token[at..at + c].to_vec();
            at += c;
        }
    }
}

/// `t` on `device`, carrying autodiff exactly when `device` does. The micro-batch tensors live on
/// the policy's autodiff device and `to_device` alone keeps that flag: an autodiff input would put
/// a no-grad model's forward (π_prox, the reference) on the autodiff graph, and its log-probs on
/// the tensor-op path instead of the fused kernel.
fn on_device<const D: usize>(t: &Tensor<D, Int>, device: &Device) -> Tensor<D, Int> {
    if device.is_autodiff() {
        t.clone().to_device(device)
    } else {
        t.clone().without_autodiff().to_device(device)
    }
}
