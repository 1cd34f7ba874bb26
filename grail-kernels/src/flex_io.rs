//! Flex tensors to host slices and back, for the CPU kernels.

use std::borrow::Cow;

use burn::backend::flex::FlexTensor;
use burn::tensor::TensorData;

pub(crate) fn host(t: &FlexTensor) -> Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(
            t.clone()
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32 data"),
        ),
    }
}

pub(crate) fn flex(values: Vec<f32>, shape: impl Into<burn::tensor::Shape>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.into()))
}

pub(crate) fn host_ids(t: &FlexTensor) -> Vec<usize> {
    t.clone()
        .into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .expect("integer ids")
        .into_iter()
        .map(|i| i as usize)
        .collect()
}
