//! RMSNorm on the CubeCL backends: one thread per row; the weight gradient in two stages
//! (per-block partial column sums, then their sum).

// Kernel code indexes buffers explicitly: iterators do not exist inside `#[cube]` functions.
#![allow(clippy::needless_range_loop)]

use burn::backend::TensorMetadata;
use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::RmsNormOps;
use crate::cube_launch::{arg, empty_like, f32_contiguous, grid};

/// Rows per thread in the first stage of the RMSNorm weight gradient.
const ROW_BLOCK: usize = 256;

/// One thread per row: `y = x · w / rms(x)`, `r = 1 / rms(x)`.
#[cube(launch)]
fn rms_norm_forward_kernel(
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    r: &mut [f32],
    cols: u32,
    eps: f32,
) {
    let row = ABSOLUTE_POS;
    if row >= r.len() {
        terminate!();
    }
    let cols = cols as usize;
    let base = row * cols;
    let mut ss = f32::new(0.0);
    for c in 0..cols {
        let v = x[base + c];
        ss += v * v;
    }
    let inv = f32::new(1.0) / (ss / f32::cast_from(cols) + eps).sqrt();
    r[row] = inv;
    for c in 0..cols {
        y[base + c] = x[base + c] * inv * w[c];
    }
}

/// One thread per row: `dx = r·w·dy − x·r³·Σ(w·dy·x)/C`.
#[cube(launch)]
fn rms_norm_dx_kernel(x: &[f32], w: &[f32], r: &[f32], dy: &[f32], dx: &mut [f32], cols: u32) {
    let row = ABSOLUTE_POS;
    if row >= r.len() {
        terminate!();
    }
    let cols = cols as usize;
    let base = row * cols;
    let inv = r[row];
    let mut dot = f32::new(0.0);
    for c in 0..cols {
        dot += w[c] * dy[base + c] * x[base + c];
    }
    let k = inv * inv * inv * dot / f32::cast_from(cols);
    for c in 0..cols {
        dx[base + c] = inv * w[c] * dy[base + c] - x[base + c] * k;
    }
}

/// One thread per (block of `block` rows, column): that block's share of `dw = Σ_rows dy · x · r`,
/// written at `partial[block_index · cols + col]`. Splitting the rows keeps thousands of threads
/// busy where one per column would leave a GPU almost idle (a few hundred columns, many rows).
#[cube(launch)]
fn rms_norm_dw_partial_kernel(
    x: &[f32],
    r: &[f32],
    dy: &[f32],
    partial: &mut [f32],
    rows: u32,
    cols: u32,
    block: u32,
) {
    let i = ABSOLUTE_POS;
    if i >= partial.len() {
        terminate!();
    }
    let cols = cols as usize;
    let col = i % cols;
    let first = (i / cols) * block as usize;
    let mut last = first + block as usize;
    if last > rows as usize {
        last = rows as usize;
    }
    let mut acc = f32::new(0.0);
    for row in first..last {
        acc += dy[row * cols + col] * x[row * cols + col] * r[row];
    }
    partial[i] = acc;
}

/// One thread per column of a `[blocks, cols]` buffer: `out[col] = Σ_blocks partial[·, col]`.
#[cube(launch)]
fn column_sum_kernel(partial: &[f32], out: &mut [f32], blocks: u32) {
    let col = ABSOLUTE_POS;
    if col >= out.len() {
        terminate!();
    }
    let cols = out.len();
    let mut acc = f32::new(0.0);
    for b in 0..blocks as usize {
        acc += partial[b * cols + col];
    }
    out[col] = acc;
}

impl RmsNormOps for CubeBackend {
    fn fused_rms_norm_forward(x: CubeTensor, w: CubeTensor, eps: f32) -> (CubeTensor, CubeTensor) {
        let (x, w) = (f32_contiguous(x), f32_contiguous(w));
        let shape = x.shape();
        let cols = shape[shape.num_dims() - 1];
        let rows = shape.num_elements() / cols.max(1);
        let y = empty_like(&x, shape.clone());
        let r = empty_like(&x, [rows]);
        let (count, dim) = grid(&x, rows);
        rms_norm_forward_kernel::launch(
            &x.client,
            count,
            dim,
            arg(&x),
            arg(&w),
            arg(&y),
            arg(&r),
            cols as u32,
            eps,
        );
        (y, r)
    }

    fn fused_rms_norm_backward(
        x: CubeTensor,
        w: CubeTensor,
        r: CubeTensor,
        dy: CubeTensor,
    ) -> (CubeTensor, CubeTensor) {
        let (x, w, r, dy) = (
            f32_contiguous(x),
            f32_contiguous(w),
            f32_contiguous(r),
            f32_contiguous(dy),
        );
        let shape = x.shape();
        let cols = shape[shape.num_dims() - 1];
        let rows = shape.num_elements() / cols.max(1);
        let dx = empty_like(&x, shape.clone());
        let dw = empty_like(&x, w.shape());
        let (count, dim) = grid(&x, rows);
        rms_norm_dx_kernel::launch(
            &x.client,
            count,
            dim,
            arg(&x),
            arg(&w),
            arg(&r),
            arg(&dy),
            arg(&dx),
            cols as u32,
        );
        let blocks = rows.div_ceil(ROW_BLOCK).max(1);
        let partial = empty_like(&x, [blocks, cols]);
        let (count, dim) = grid(&x, blocks * cols);
        rms_norm_dw_partial_kernel::launch(
            &x.client,
            count,
            dim,
            arg(&x),
            arg(&r),
            arg(&dy),
            arg(&partial),
            rows as u32,
            cols as u32,
            ROW_BLOCK as u32,
        );
        let (count, dim) = grid(&x, cols);
        column_sum_kernel::launch(
            &x.client,
            count,
            dim,
            arg(&partial),
            arg(&dw),
            blocks as u32,
        );
        (dx, dw)
    }
}
