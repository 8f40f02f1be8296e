//! The C entry points of `shim.cpp`, and the codes they speak: libtorch's
//! `c10::DeviceType` and `c10::ScalarType` numbers.

use std::ffi::CStr;
use std::os::raw::c_char;
use tch::{Device, Kind};

unsafe extern "C" {
    fn dalle_precision_last_error() -> *const c_char;
    fn dalle_autocast_state(device: i32, enabled: *mut bool, dtype: *mut i32) -> i32;
    fn dalle_autocast_set(device: i32, enabled: bool, dtype: i32) -> i32;
    fn dalle_autocast_increment_nesting(depth: *mut i32) -> i32;
    fn dalle_autocast_decrement_nesting(depth: *mut i32) -> i32;
    fn dalle_autocast_clear_cache() -> i32;
    fn dalle_tf32_state(cublas: *mut bool, cudnn: *mut bool) -> i32;
    fn dalle_tf32_set(cublas: bool, cudnn: bool) -> i32;
    fn dalle_cuda_compute_capability(ordinal: i32, major: *mut i32, minor: *mut i32) -> i32;
}

/// `c10::DeviceType` of a device.
pub(crate) fn device_type(device: Device) -> i32 {
    match device {
        Device::Cpu => 0,
        Device::Cuda(_) => 1,
        Device::Vulkan => 10,
        Device::Mps => 13,
    }
}

/// `c10::ScalarType` of the kinds autocast computes in.
pub(crate) fn scalar_type(kind: Kind) -> i32 {
    match kind {
        Kind::Half => 5,
        Kind::Float => 6,
        Kind::BFloat16 => 15,
        other => panic!("autocast does not compute in {other:?}"),
    }
}

fn kind_of(scalar_type: i32) -> Option<Kind> {
    match scalar_type {
        5 => Some(Kind::Half),
        6 => Some(Kind::Float),
        15 => Some(Kind::BFloat16),
        _ => None,
    }
}

/// Panics with the shim's message on failure: the calls below fail only
/// when the libtorch at run time is not the one the shim was built for.
fn check(status: i32, what: &str) {
    if status != 0 {
        // SAFETY: the shim returns a pointer to its thread-local message,
        // valid until its next failing call on this thread.
        let message = unsafe { CStr::from_ptr(dalle_precision_last_error()) };
        panic!("libtorch {what}: {}", message.to_string_lossy());
    }
}

/// Autocast's state for one device type: on or off, and its dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AutocastState {
    pub enabled: bool,
    /// The raw `c10::ScalarType`: restored as it was found, whatever it is.
    pub dtype: i32,
}

impl AutocastState {
    pub fn kind(self) -> Option<Kind> {
        kind_of(self.dtype)
    }
}

pub(crate) fn autocast_state(device_type: i32) -> AutocastState {
    let (mut enabled, mut dtype) = (false, 0);
    // SAFETY: both pointers are to live locals.
    check(
        unsafe { dalle_autocast_state(device_type, &mut enabled, &mut dtype) },
        "autocast state",
    );
    AutocastState { enabled, dtype }
}

pub(crate) fn set_autocast_state(device_type: i32, state: AutocastState) {
    // SAFETY: plain values in, a status out.
    check(
        unsafe { dalle_autocast_set(device_type, state.enabled, state.dtype) },
        "set autocast",
    );
}

/// Enters one more autocast region on this thread; returns the new depth.
pub(crate) fn increment_nesting() -> i32 {
    let mut depth = 0;
    // SAFETY: the pointer is to a live local.
    check(
        unsafe { dalle_autocast_increment_nesting(&mut depth) },
        "autocast nesting",
    );
    depth
}

/// Leaves an autocast region; returns the depth left.
pub(crate) fn decrement_nesting() -> i32 {
    let mut depth = 0;
    // SAFETY: the pointer is to a live local.
    check(
        unsafe { dalle_autocast_decrement_nesting(&mut depth) },
        "autocast nesting",
    );
    depth
}

/// Drops autocast's cached low-precision copies of the weights.
pub(crate) fn clear_cache() {
    // SAFETY: no arguments.
    check(unsafe { dalle_autocast_clear_cache() }, "autocast cache");
}

/// Whether cuBLAS matmuls and cuDNN convolutions may use TF32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tf32State {
    pub cublas: bool,
    pub cudnn: bool,
}

pub(crate) fn tf32_state() -> Tf32State {
    let (mut cublas, mut cudnn) = (false, false);
    // SAFETY: both pointers are to live locals.
    check(
        unsafe { dalle_tf32_state(&mut cublas, &mut cudnn) },
        "TF32 flags",
    );
    Tf32State { cublas, cudnn }
}

pub(crate) fn set_tf32(state: Tf32State) {
    // SAFETY: plain values in, a status out.
    check(
        unsafe { dalle_tf32_set(state.cublas, state.cudnn) },
        "set TF32 flags",
    );
}

/// `(major, minor)` compute capability of CUDA device `ordinal`, or why not.
pub(crate) fn cuda_compute_capability(ordinal: usize) -> Result<(i32, i32), String> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: both pointers are to live locals.
    let status = unsafe { dalle_cuda_compute_capability(ordinal as i32, &mut major, &mut minor) };
    if status == 0 {
        Ok((major, minor))
    } else {
        // SAFETY: as in `check`.
        let message = unsafe { CStr::from_ptr(dalle_precision_last_error()) };
        Err(message.to_string_lossy().into_owned())
    }
}
