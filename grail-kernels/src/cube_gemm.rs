//! The matrix products of the CubeCL fused ops (linear forward/backward, the log-prob tiles).
//!
//! On hardware adapters they run on burn's CubeCL matmul, autotuned per device (tensor cores
//! where there are some). On CPU adapters (Mesa's lavapipe) that matmul cannot run: any kernel
//! with shared memory, as CubeCL's SPIR-V declares it (explicit workgroup layout), crashes the
//! driver's shader compiler (seen with Mesa 22.3 and 25.0). There the products run on
//! [`gemm_kernel`], a plain GEMM kernel without shared memory, so the whole fused linear and
//! log-prob paths execute on lavapipe too (CI checks them there). `GRAIL_CUBE_GEMM=own|burn`
//! forces one of the two anywhere, e.g. to check the kernel on a GPU.

use std::sync::OnceLock;

use burn::backend::TensorMetadata;
use burn::backend::ops::FloatTensorOps;
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::device::{Device, WgpuDeviceKind};
use cubecl::prelude::*;

use crate::cube_launch::{empty_like, f32_contiguous};

type B = CubeBackend;

/// Side of the square output tile one cube computes.
const TILE: usize = 16;
/// Vulkan guarantees 65,535 cubes per grid axis; row tiles beyond that go to the z axis.
const MAX_GRID: usize = 65_535;

/// `c = op(a) · op(b)` for `op(a)` `[m, k]`, `op(b)` `[k, n]`, `c` `[m, n]` row-major.
/// `a_t`: `a` is stored `[k, m]`; `b_t`: `b` is stored `[n, k]`. One cube per `TILE × TILE`
/// output tile, one unit per output element, the dot product read straight from global memory.
/// No shared-memory staging on purpose: this kernel exists for the CPU adapters, and shared
/// memory as CubeCL's SPIR-V declares it (explicit workgroup layout) crashes lavapipe's compiler
/// just as burn's matmul does.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn gemm_kernel(
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    m: u32,
    n: u32,
    k: u32,
    #[comptime] a_t: bool,
    #[comptime] b_t: bool,
) {
    let m = m as usize;
    let n = n as usize;
    let k = k as usize;
    let i = (CUBE_POS_Z as usize * CUBE_COUNT_Y as usize + CUBE_POS_Y as usize) * TILE
        + UNIT_POS_Y as usize;
    let j = CUBE_POS_X as usize * TILE + UNIT_POS_X as usize;
    if i >= m || j >= n {
        terminate!();
    }
    // Element p of row i of op(a) and of column j of op(b), and the step between neighbours.
    let mut a_at = i * k;
    let mut a_step = 1;
    if a_t {
        a_at = i;
        a_step = m;
    }
    let mut b_at = j;
    let mut b_step = n;
    if b_t {
        b_at = j * k;
        b_step = 1;
    }
    let mut acc = f32::new(0.0);
    for _ in 0..k {
        acc += a[a_at] * b[b_at];
        a_at += a_step;
        b_at += b_step;
    }
    c[i * n + j] = acc;
}

/// Which implementation runs the products on this device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gemm {
    /// burn's autotuned CubeCL matmul.
    Burn,
    /// [`gemm_kernel`].
    Own,
}

/// `GRAIL_CUBE_GEMM` (`own` or `burn`), read once; anything else is ignored with a warning.
fn forced() -> Option<Gemm> {
    static FORCED: OnceLock<Option<Gemm>> = OnceLock::new();
    *FORCED.get_or_init(|| match std::env::var("GRAIL_CUBE_GEMM").as_deref() {
        Ok("own") => Some(Gemm::Own),
        Ok("burn") => Some(Gemm::Burn),
        Ok(other) => {
            tracing::warn!("GRAIL_CUBE_GEMM={other:?} is neither \"own\" nor \"burn\"; ignored");
            None
        }
        Err(_) => None,
    })
}

fn gemm_for(device: &Device) -> Gemm {
    forced().unwrap_or(match device {
        Device::Wgpu(d) if d.kind == WgpuDeviceKind::Cpu => Gemm::Own,
        _ => Gemm::Burn,
    })
}

/// `op(a) · op(b)`, contiguous f32 `[m, n]`: `a` is `[m, k]` (stored `[k, m]` if `a_t`), `b` is
/// `[k, n]` (stored `[n, k]` if `b_t`). Both must be 2-D.
pub(crate) fn product(a: CubeTensor, a_t: bool, b: CubeTensor, b_t: bool) -> CubeTensor {
    let (a_rows, a_cols) = (a.shape()[0], a.shape()[1]);
    let (b_rows, b_cols) = (b.shape()[0], b.shape()[1]);
    let (m, k) = if a_t {
        (a_cols, a_rows)
    } else {
        (a_rows, a_cols)
    };
    let (k_b, n) = if b_t {
        (b_cols, b_rows)
    } else {
        (b_rows, b_cols)
    };
    assert_eq!(k, k_b, "product: inner dimensions differ ({k} vs {k_b})");
    match gemm_for(&a.device) {
        Gemm::Burn => {
            let a = if a_t { B::float_transpose(a) } else { a };
            let b = if b_t { B::float_transpose(b) } else { b };
            into_contiguous(B::float_matmul(a, b))
        }
        Gemm::Own => own_product(f32_contiguous(a), f32_contiguous(b), [m, k, n], [a_t, b_t]),
    }
}

fn own_product(
    a: CubeTensor,
    b: CubeTensor,
    [m, k, n]: [usize; 3],
    [a_t, b_t]: [bool; 2],
) -> CubeTensor {
    let c = empty_like(&a, [m, n]);
    if m == 0 || n == 0 {
        return c;
    }
    let row_tiles = m.div_ceil(TILE);
    let (y, z) = if row_tiles <= MAX_GRID {
        (row_tiles, 1)
    } else {
        (MAX_GRID, row_tiles.div_ceil(MAX_GRID))
    };
    let count = CubeCount::Static(n.div_ceil(TILE) as u32, y as u32, z as u32);
    gemm_kernel::launch(
        &a.client,
        count,
        CubeDim::new_2d(TILE as u32, TILE as u32),
        a.clone().into_buffer_arg(),
        b.clone().into_buffer_arg(),
        c.clone().into_buffer_arg(),
        m as u32,
        n as u32,
        k as u32,
        a_t,
        b_t,
    );
    c
}

#[cfg(test)]
mod tests {
    //! The GEMM kernel against a host product, in every layout, on sizes that are not multiples
    //! of the tile (CI runs this on lavapipe).
    use super::*;
    use crate::cube_launch::tests::{read, upload};

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104_729) % 211) as f32 / 50.0 - 2.1)
            .collect()
    }

    #[test]
    fn the_gemm_kernel_equals_a_host_product_in_every_layout() {
        for &(m, k, n) in &[(37, 19, 23), (1, 5, 1), (16, 16, 16), (40, 33, 3)] {
            let (a, b) = (values(m * k, 1), values(k * n, 2));
            let mut want = vec![0.0f64; m * n];
            for i in 0..m {
                for j in 0..n {
                    want[i * n + j] = (0..k)
                        .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                        .sum();
                }
            }
            let at: Vec<f32> = (0..k * m).map(|x| a[(x % m) * k + x / m]).collect();
            let bt: Vec<f32> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect();
            for (a_t, b_t) in [(false, false), (false, true), (true, false), (true, true)] {
                let ta = if a_t {
                    upload(at.clone(), [k, m])
                } else {
                    upload(a.clone(), [m, k])
                };
                let tb = if b_t {
                    upload(bt.clone(), [n, k])
                } else {
                    upload(b.clone(), [k, n])
                };
                let got = read(own_product(ta, tb, [m, k, n], [a_t, b_t]));
                for (x, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{m}x{k}x{n} a_t={a_t} b_t={b_t} at {x}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
