//! The autocast region: libtorch's autocast switched on (or off) for one
//! device type on this thread, and put back as it was when the region ends.
//!
//! libtorch keeps autocast's state per thread, and keeps a cache of the
//! low-precision copies it makes of fp32 weights (leaves that require
//! grad), so a weight used by several micro-batches is cast once. That
//! cache does not notice the weights changing in place: an optimizer step
//! between two forwards would be served the old weights. torch's autocast
//! context clears it when the outermost region exits, and so does
//! [`Autocast`]'s drop: a region per step (or per evaluation, or per
//! sampling call) never outlives the weights it cast.

use crate::Precision;
use crate::ffi::{self, AutocastState};
use std::marker::PhantomData;
use tch::{Device, Kind};

/// An autocast region: while it lives, ops on `device`'s type run in the
/// precision it was entered with. Dropping it restores the previous state
/// and, when it was the outermost region, clears the weight-cast cache.
///
/// Not `Send`: the state it changed is the entering thread's.
#[must_use = "autocast ends when the guard is dropped"]
pub struct Autocast {
    device_type: i32,
    previous: AutocastState,
    /// TF32 switches to put back (they are process-wide, not per thread).
    previous_tf32: Option<ffi::Tf32State>,
    _same_thread: PhantomData<*const ()>,
}

impl Autocast {
    /// Enters a region computing in `precision` on `device`:
    /// - bf16: autocast on, to bf16 (matmuls, convolutions and attention in
    ///   bf16; reductions, norms and losses as autocast's lists say);
    /// - tf32: autocast off, cuBLAS and cuDNN allowed TF32 (CUDA only);
    /// - fp32: autocast off (so also a full-precision island inside a bf16
    ///   region, see [`full_precision`]).
    pub fn enter(device: Device, precision: Precision) -> Self {
        let device_type = ffi::device_type(device);
        let previous = ffi::autocast_state(device_type);
        ffi::increment_nesting();
        let next = match precision {
            Precision::Bf16 => AutocastState {
                enabled: true,
                dtype: ffi::scalar_type(Kind::BFloat16),
            },
            Precision::Fp32 | Precision::Tf32 => AutocastState {
                enabled: false,
                ..previous
            },
        };
        ffi::set_autocast_state(device_type, next);
        let previous_tf32 = (precision == Precision::Tf32 && device.is_cuda()).then(|| {
            let before = ffi::tf32_state();
            ffi::set_tf32(ffi::Tf32State {
                cublas: true,
                cudnn: true,
            });
            before
        });
        Self {
            device_type,
            previous,
            previous_tf32,
            _same_thread: PhantomData,
        }
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        if let Some(tf32) = self.previous_tf32 {
            ffi::set_tf32(tf32);
        }
        ffi::set_autocast_state(self.device_type, self.previous);
        if ffi::decrement_nesting() == 0 {
            ffi::clear_cache();
        }
    }
}

/// Whether autocast is on for `device`'s type on this thread.
pub fn is_autocast_enabled(device: Device) -> bool {
    ffi::autocast_state(ffi::device_type(device)).enabled
}

/// The dtype autocast computes in on `device` on this thread, if it is on:
/// what tensors made to meet autocast's outputs (a KV cache) should hold.
pub fn autocast_kind(device: Device) -> Option<Kind> {
    let state = ffi::autocast_state(ffi::device_type(device));
    if state.enabled { state.kind() } else { None }
}

/// Runs `f` with autocast off on `device`: for the few products whose
/// rounding matters more than their cost (a contrastive loss's similarity
/// logits, scaled by up to 100). Inside a bf16 region the cache survives.
pub fn full_precision<T>(device: Device, f: impl FnOnce() -> T) -> T {
    let _fp32 = Autocast::enter(device, Precision::Fp32);
    f()
}
