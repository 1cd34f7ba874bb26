//! Launch helpers the CubeCL kernels share: contiguous f32 operands, output buffers, `u32`
//! index buffers and the launch grid.

use burn::backend::TensorMetadata;
use burn::backend::ops::FloatTensorOps;
use burn::tensor::{DType, Shape};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::{CubeDim, calculate_cube_count_elemwise};

type B = CubeBackend;

pub(crate) fn f32_contiguous(t: CubeTensor) -> CubeTensor {
    let t = if t.dtype == DType::F32 {
        t
    } else {
        B::float_cast(t, burn::tensor::FloatDType::F32)
    };
    into_contiguous(t)
}

pub(crate) fn empty_like(like: &CubeTensor, shape: impl Into<Shape>) -> CubeTensor {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        shape.into(),
        DType::F32,
    )
}

pub(crate) fn arg(t: &CubeTensor) -> BufferArg {
    t.clone().into_buffer_arg()
}

/// A `u32` buffer on the tensor's device.
pub(crate) fn u32_buffer(like: &CubeTensor, values: &[u32]) -> (cubecl::server::Handle, usize) {
    (
        like.client.create_from_slice(u32::as_bytes(values)),
        values.len(),
    )
}

pub(crate) fn u32_arg(buffer: &(cubecl::server::Handle, usize)) -> BufferArg {
    unsafe { BufferArg::from_raw_parts(buffer.0.clone(), buffer.1) }
}

/// Launch geometry for `n` independent work items.
pub(crate) fn grid(like: &CubeTensor, n: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(&like.client, n.max(1));
    (
        calculate_cube_count_elemwise(&like.client, n.max(1), dim),
        dim,
    )
}

pub(crate) fn dims3(t: &CubeTensor) -> [usize; 3] {
    let s = t.shape();
    [s[0], s[1], s[2]]
}

#[cfg(test)]
pub(crate) mod tests {
    //! Tensors on the test's CubeCL device (`$GRAIL_TEST_DEVICE`, default lavapipe).
    use super::*;
    use burn::backend::DispatchDevice;
    use burn::tensor::TensorData;

    pub(crate) fn device() -> burn_cubecl::CubeDevice {
        let name = std::env::var("GRAIL_TEST_DEVICE").unwrap_or_else(|_| "vulkan:cpu".into());
        let device = crate::device::parse_device(&name).expect("a Vulkan device");
        match device.inner().as_dispatch().clone() {
            DispatchDevice::Cube(d) => d,
            _ => panic!("{name} is not a CubeCL device"),
        }
    }

    pub(crate) fn upload(values: Vec<f32>, shape: impl Into<Shape>) -> CubeTensor {
        B::float_from_data(TensorData::new(values, shape.into()), &device())
    }

    pub(crate) fn read(t: CubeTensor) -> Vec<f32> {
        cubecl::future::block_on(B::float_into_data(t))
            .expect("readback")
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap()
    }
}
