//! How the token ids of one forward call are laid out, and the per-sequence segments derived
//! from that layout.

use crate::error::{GrailError, Result};

/// The arrangement of the `[rows, cols]` token-id tensor given to the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One sequence per row, right-padded: row `b` holds `lengths[b]` real tokens, then padding.
    /// Outputs at padded positions are meaningless (and must be ignored).
    Padded {
        /// Real length of each row.
        lengths: Vec<usize>,
    },
    /// Several sequences per row, back to back from column 0: row `r` holds sequences of lengths
    /// `rows[r]`, and any columns after them are padding. Positions restart at 0 for every
    /// sequence and attention never crosses a sequence boundary; its cost is Σ lenᵢ².
    Packed {
        /// Sequence lengths of each row, in order.
        rows: Vec<Vec<usize>>,
    },
}

/// One sequence inside the token grid: `len` tokens of row `row` starting at column `start`,
/// whose first token sits at position `pos0` (non-zero when continuing from a KV cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Row of the token grid.
    pub row: usize,
    /// First column of the sequence in its row.
    pub start: usize,
    /// Number of tokens.
    pub len: usize,
    /// Position id of the first token.
    pub pos0: usize,
}

impl Layout {
    /// A packed layout with every sequence in one row.
    pub fn packed_single_row(lengths: Vec<usize>) -> Self {
        Layout::Packed {
            rows: vec![lengths],
        }
    }

    /// Checks the layout against a `[rows, cols]` grid.
    pub fn validate(&self, rows: usize, cols: usize) -> Result<()> {
        let (name, per_row): (&str, Vec<usize>) = match self {
            Layout::Padded { lengths } => ("Padded.lengths", lengths.clone()),
            Layout::Packed { rows } => {
                ("Packed.rows", rows.iter().map(|r| r.iter().sum()).collect())
            }
        };
        if per_row.len() != rows {
            return Err(GrailError::Input(format!(
                "{name} describes {} rows but the ids have {rows}",
                per_row.len()
            )));
        }
        if let Some((r, used)) = per_row.iter().enumerate().find(|(_, u)| **u > cols) {
            return Err(GrailError::Input(format!(
                "{name}: row {r} needs {used} tokens but the ids have {cols} columns"
            )));
        }
        let empty = match self {
            Layout::Padded { lengths } => lengths.contains(&0),
            Layout::Packed { rows } => rows.iter().flatten().any(|&l| l == 0),
        };
        if empty {
            return Err(GrailError::Input(format!(
                "{name}: a sequence has length 0"
            )));
        }
        Ok(())
    }

    /// The position id of every cell of the `[rows, cols]` grid, row-major. Padding cells get
    /// position 0 (their outputs are ignored).
    pub fn positions(&self, rows: usize, cols: usize) -> Vec<usize> {
        let mut pos = vec![0; rows * cols];
        for seg in self.segments() {
            let first = seg.row * cols + seg.start;
            for (i, p) in pos[first..first + seg.len].iter_mut().enumerate() {
                *p = seg.pos0 + i;
            }
        }
        pos
    }

    /// What a forward over a `[rows, cols]` grid needs, checked: each slot's position and, for
    /// packed rows, the segments attention runs over (a padded batch is one causal attention).
    pub(crate) fn plan(
        &self,
        rows: usize,
        cols: usize,
    ) -> Result<(Vec<usize>, Option<Vec<Segment>>)> {
        self.validate(rows, cols)?;
        let segments = match self {
            Layout::Padded { .. } => None,
            Layout::Packed { .. } => Some(self.segments()),
        };
        Ok((self.positions(rows, cols), segments))
    }

    /// Every sequence of the layout as a segment (in row order).
    pub fn segments(&self) -> Vec<Segment> {
        match self {
            Layout::Padded { lengths } => lengths
                .iter()
                .enumerate()
                .map(|(row, &len)| Segment {
                    row,
                    start: 0,
                    len,
                    pos0: 0,
                })
                .collect(),
            Layout::Packed { rows } => {
                let mut out = Vec::new();
                for (row, lens) in rows.iter().enumerate() {
                    let mut start = 0;
                    for &len in lens {
                        out.push(Segment {
                            row,
                            start,
                            len,
                            pos0: 0,
                        });
                        start += len;
                    }
                }
                out
            }
        }
    }

    /// Real tokens over allocated cells for a `cols`-wide grid.
    pub fn efficiency(&self, cols: usize) -> f64 {
        let segs = self.segments();
        let rows = match self {
            Layout::Padded { lengths } => lengths.len(),
            Layout::Packed { rows } => rows.len(),
        };
        let real: usize = segs.iter().map(|s| s.len).sum();
        real as f64 / (rows * cols).max(1) as f64
    }
}
