//! CUDA graphs: a step of libtorch ops captured once and replayed with one
//! launch, for loops whose every iteration runs the same kernels on the
//! same buffers (one token of decoding), where launching each kernel from
//! the host costs more than the kernel itself.
//!
//! What a captured step may do: read and write tensors that live as long
//! as the graph (allocated before the capture, or inside it), take every
//! varying input from such tensors (a position as a device scalar, not a
//! Rust integer), and never wait on the host (no `.int64_value`, no copy
//! from host memory). What it computed during the capture is *not* done:
//! capture records kernels without running them.

use crate::KernelError;
use std::ffi::CStr;
use std::os::raw::c_char;

#[repr(C)]
struct RawGraph {
    _private: [u8; 0],
}

unsafe extern "C" {
    fn dalle_graph_last_error() -> *const c_char;
    fn dalle_graph_new(device: i32, out: *mut *mut RawGraph) -> i32;
    fn dalle_graph_capture_begin(graph: *mut RawGraph) -> i32;
    fn dalle_graph_capture_end(graph: *mut RawGraph) -> i32;
    fn dalle_graph_leave_side_stream(graph: *mut RawGraph) -> i32;
    fn dalle_graph_replay(graph: *mut RawGraph) -> i32;
    fn dalle_graph_free(graph: *mut RawGraph);
}

fn status(code: i32) -> Result<(), KernelError> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: the shim returns its thread-local message, valid until its
    // next failing call on this thread.
    let message = unsafe { CStr::from_ptr(dalle_graph_last_error()) };
    Err(KernelError(message.to_string_lossy().into_owned()))
}

/// Whether this build can capture CUDA graphs (its libtorch has CUDA and
/// the shim was compiled with CUDA's headers); a GPU is needed as well.
pub fn cuda_graphs_built() -> bool {
    cfg!(cuda_graphs)
}

/// One captured step, replayed on this thread's current stream. Not
/// `Send`: libtorch's stream state is per thread.
pub struct CudaGraph {
    raw: *mut RawGraph,
}

impl CudaGraph {
    /// Runs `step` once for real on a side stream of CUDA device
    /// `device` (its warm-up: the first call of a step on a new stream
    /// sets up libraries' per-stream state, which must not happen inside a
    /// capture), then captures one more call of it. Each
    /// [`CudaGraph::replay`] then does what that captured call would have.
    ///
    /// `step` always ran once when this returns, whether the capture
    /// succeeded or not (the caller can go on without the graph).
    pub fn warm_up_and_capture(device: usize, mut step: impl FnMut()) -> Result<Self, KernelError> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: `raw` is written only on success.
        if let Err(e) = status(unsafe { dalle_graph_new(device as i32, &mut raw) }) {
            step();
            return Err(e);
        }
        // Owned from here: dropping it ends an open capture and goes back
        // to the ambient stream.
        let graph = Self { raw };
        step();
        // SAFETY: `graph.raw` is live until dropped.
        status(unsafe { dalle_graph_capture_begin(graph.raw) })?;
        // An op libtorch cannot capture fails inside the step, where tch
        // panics. Nothing captured ran, so the caller's state is as the
        // warm-up left it and it can go on without the graph.
        let captured = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut step));
        if let Err(panic) = captured {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            return Err(KernelError(format!("capturing the step: {why}")));
        }
        status(unsafe { dalle_graph_capture_end(graph.raw) })?;
        status(unsafe { dalle_graph_leave_side_stream(graph.raw) })?;
        Ok(graph)
    }

    /// Launches the captured step's kernels.
    pub fn replay(&self) -> Result<(), KernelError> {
        // SAFETY: `self.raw` is live until dropped.
        status(unsafe { dalle_graph_replay(self.raw) })
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: `raw` came from `dalle_graph_new` and is freed once.
        unsafe { dalle_graph_free(self.raw) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a GPU (or a CUDA build) capture fails with the shim's
    /// message, and the step still ran once, so a caller loses no work.
    #[test]
    fn a_failed_capture_still_runs_the_step_once() {
        if tch::Cuda::is_available() {
            return;
        }
        let mut calls = 0;
        let result = CudaGraph::warm_up_and_capture(0, || calls += 1);
        let error = result.err().expect("no CUDA device: capture must fail");
        assert_eq!(calls, 1, "the warm-up step ran exactly once");
        assert!(
            !error.0.is_empty(),
            "the failure carries libtorch's message"
        );
    }
}
