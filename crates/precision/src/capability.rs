//! Which CUDA devices have the tensor cores bf16 and TF32 need.

use crate::ffi;
use tch::Device;

/// `(major, minor)` compute capability of a CUDA device; `None` for other
/// devices, or when CUDA cannot say (logged).
pub fn compute_capability(device: Device) -> Option<(i32, i32)> {
    let Device::Cuda(ordinal) = device else {
        return None;
    };
    if !tch::Cuda::is_available() {
        return None;
    }
    match ffi::cuda_compute_capability(ordinal) {
        Ok(capability) => Some(capability),
        Err(why) => {
            tracing::warn!(?device, "cannot read the GPU's compute capability: {why}");
            None
        }
    }
}

/// Whether `device` is a GPU of compute capability 8.0 or newer (Ampere
/// on): bf16 and TF32 tensor cores.
pub fn has_ampere_tensor_cores(device: Device) -> bool {
    compute_capability(device).is_some_and(|(major, _)| major >= 8)
}
