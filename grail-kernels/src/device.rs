//! Choosing the compute device by name. grail never calls `Device::default()`: with a GPU
//! backend compiled in it would pick that backend and fail on machines without a GPU.

use burn::tensor::Device;

/// A device name that cannot be used: the name and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device = {name:?}: {reason}")]
pub struct DeviceError {
    /// The name as given.
    pub name: String,
    /// Why it cannot be used.
    pub reason: String,
}

impl DeviceError {
    fn new(name: &str, reason: impl Into<String>) -> Self {
        Self {
            name: name.to_string(),
            reason: reason.into(),
        }
    }
}

type Result<T> = std::result::Result<T, DeviceError>;

/// Parses a device name: `"cpu"` (the Flex backend), and with the matching cargo features
/// `"vulkan"`/`"vulkan:N"` (N-th discrete GPU), `"vulkan:cpu"` (Mesa's lavapipe CPU driver) or
/// `"cuda"`/`"cuda:N"`. A Vulkan device is brought up here, so a machine without the adapter
/// gets an error naming the adapters it has, not a panic inside the first tensor operation.
pub fn parse_device(name: &str) -> Result<Device> {
    // The CPU's Vulkan driver (Mesa lavapipe): slow, but it runs the CubeCL kernels anywhere.
    #[cfg(feature = "vulkan")]
    if name == "vulkan:cpu" {
        return vulkan_device(name, burn::tensor::DeviceKind::Cpu);
    }
    let (kind, index) = match name.split_once(':') {
        Some((k, i)) => {
            let idx = i
                .parse::<usize>()
                .map_err(|_| DeviceError::new(name, "the index after ':' must be a number"))?;
            (k, idx)
        }
        None => (name, 0),
    };
    match kind {
        "cpu" | "flex" => Ok(Device::flex()),
        #[cfg(feature = "vulkan")]
        "vulkan" => vulkan_device(name, burn::tensor::DeviceKind::DiscreteGpu(index)),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Device::cuda(index)),
        // Reached only for a backend this build lacks (the arms above take the others).
        #[allow(unreachable_patterns)]
        "vulkan" | "cuda" => {
            let _ = index;
            Err(DeviceError::new(
                name,
                format!(
                    "grail was built without the `{kind}` feature (rebuild with --features {kind})"
                ),
            ))
        }
        _ => Err(DeviceError::new(
            name,
            "unknown device (expected \"cpu\", \"vulkan[:N]\" or \"cuda[:N]\")",
        )),
    }
}

/// Brings up the Vulkan runtime for `kind` once per process (later calls reuse it).
#[cfg(feature = "vulkan")]
fn vulkan_device(name: &str, kind: burn::tensor::DeviceKind) -> Result<Device> {
    use burn::tensor::wgpu::{WgpuBackend, WgpuInitError};
    use std::sync::Mutex;
    static READY: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut ready = READY.lock().unwrap_or_else(|e| e.into_inner());
    if ready.iter().any(|n| n == name) {
        return Ok(Device::vulkan(kind));
    }
    match Device::wgpu_options()
        .device_kind(kind.clone())
        .graphics_api(WgpuBackend::Vulkan)
        .init()
    {
        Ok(device) => {
            ready.push(name.to_string());
            Ok(device)
        }
        // Someone (a tensor operation) initialised this runtime before us: it is usable.
        Err(WgpuInitError::Registration { .. }) => {
            ready.push(name.to_string());
            Ok(Device::vulkan(kind))
        }
        Err(e) => Err(DeviceError::new(
            name,
            format!("no usable Vulkan adapter: {e}"),
        )),
    }
}
