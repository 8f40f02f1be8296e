//! What tch does not bind of libtorch's autograd, through a small C++ shim
//! (`src/shim.cpp`, compiled against the headers of the libtorch torch-sys
//! links):
//!
//! - [`on_accumulated`]: a callback right after a leaf's gradient has been
//!   accumulated into its `.grad`, on the thread autograd runs that leaf's
//!   accumulation on (the caller of `backward` for CPU tensors, libtorch's
//!   device thread for CUDA ones). Data parallelism uses it to reduce a
//!   bucket of gradients as soon as backward has finished writing it,
//!   while backward goes on with the rest.
//! - [`drop_grad`]: forgets a `.grad`, so a sharded-gradient trainer holds
//!   a full gradient only until it has taken its share.

use std::ffi::CStr;
use std::os::raw::{c_char, c_void};
use tch::Tensor;

unsafe extern "C" {
    fn dalle_autograd_last_error() -> *const c_char;
    fn dalle_autograd_on_accumulated(
        tensor: *mut c_void,
        callback: extern "C" fn(*mut c_void),
        release: extern "C" fn(*mut c_void),
        context: *mut c_void,
    ) -> i32;
    fn dalle_autograd_clear_accumulated(tensor: *mut c_void) -> i32;
    fn dalle_autograd_drop_grad(tensor: *mut c_void) -> i32;
}

/// What runs after each accumulation. It runs inside libtorch's backward,
/// so it must not panic into C++ (a panic is caught and reported on
/// stderr; the hook's owner is expected to record its own failures).
pub type Accumulated = Box<dyn Fn() + Send + Sync>;

/// Why a call into the shim failed: libtorch's own message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutogradError(pub String);

impl std::fmt::Display for AutogradError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "libtorch autograd: {}", self.0)
    }
}

impl std::error::Error for AutogradError {}

fn status(code: i32) -> Result<(), AutogradError> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: the shim returns a pointer to its thread-local message,
    // valid until its next failing call on this thread.
    let message = unsafe { CStr::from_ptr(dalle_autograd_last_error()) };
    Err(AutogradError(message.to_string_lossy().into_owned()))
}

fn raw(tensor: &Tensor) -> *mut c_void {
    tensor.as_ptr() as *mut c_void
}

extern "C" fn call(context: *mut c_void) {
    // SAFETY: `context` is the `Box<Accumulated>` leaked in
    // `on_accumulated`, alive until `release` runs.
    let callback = unsafe { &*(context as *const Accumulated) };
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(callback)).is_err() {
        eprintln!("a gradient hook panicked inside backward");
    }
}

extern "C" fn release(context: *mut c_void) {
    // SAFETY: libtorch drops each hook once, and with it the context.
    drop(unsafe { Box::from_raw(context as *mut Accumulated) });
}

/// Calls `callback` each time backward has accumulated a gradient into
/// `leaf`'s `.grad`. A tensor has one such hook: this replaces any earlier
/// one, which is dropped. `leaf` must be a leaf that requires grad (a
/// parameter).
pub fn on_accumulated(leaf: &Tensor, callback: Accumulated) -> Result<(), AutogradError> {
    let context = Box::into_raw(Box::new(callback)) as *mut c_void;
    // SAFETY: `leaf` is a live tensor; the shim owns `context` from here
    // on and hands it to `release` exactly once.
    status(unsafe { dalle_autograd_on_accumulated(raw(leaf), call, release, context) })
}

/// Removes `leaf`'s post-accumulate hook, if it has one.
pub fn clear_accumulated(leaf: &Tensor) -> Result<(), AutogradError> {
    // SAFETY: `leaf` is a live tensor.
    status(unsafe { dalle_autograd_clear_accumulated(raw(leaf)) })
}

/// Forgets `tensor`'s `.grad`: the next backward writes a new one instead
/// of adding into it.
pub fn drop_grad(tensor: &Tensor) -> Result<(), AutogradError> {
    // SAFETY: `tensor` is a live tensor.
    status(unsafe { dalle_autograd_drop_grad(raw(tensor)) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tch::Kind;

    fn leaf(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).set_requires_grad(true)
    }

    #[test]
    fn the_hook_runs_once_per_backward_after_the_gradient_is_written() {
        let w = leaf(&[1.0, 2.0]);
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        // A tensor is not Sync: the hook reaches it through a mutex.
        let (w_in_hook, record) = (std::sync::Mutex::new(w.shallow_clone()), seen.clone());
        on_accumulated(
            &w,
            Box::new(move || {
                let grad = Vec::<f32>::try_from(w_in_hook.lock().unwrap().grad()).unwrap();
                record.lock().unwrap().push(grad);
            }),
        )
        .unwrap();
        // w used twice in one graph: one accumulation, of the sum.
        ((&w * 3.0).sum(Kind::Float) + (&w * &w).sum(Kind::Float)).backward();
        (&w * 2.0).sum(Kind::Float).backward();
        let seen = seen.lock().unwrap();
        assert_eq!(*seen, vec![vec![5.0, 7.0], vec![7.0, 9.0]]);
    }

    #[test]
    fn a_replaced_or_dead_hook_releases_its_callback() {
        let dropped = Arc::new(AtomicUsize::new(0));
        struct CountDrop(Arc<AtomicUsize>);
        impl Drop for CountDrop {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        // A hook that only holds a guard, which counts its own drop.
        let hook_holding = |guard: CountDrop| -> Accumulated {
            Box::new(move || {
                let _ = &guard;
            })
        };
        let w = leaf(&[1.0]);
        for _ in 0..2 {
            on_accumulated(&w, hook_holding(CountDrop(dropped.clone()))).unwrap();
        }
        assert_eq!(dropped.load(Ordering::SeqCst), 1, "the first was replaced");
        clear_accumulated(&w).unwrap();
        assert_eq!(dropped.load(Ordering::SeqCst), 2, "the second was cleared");
        on_accumulated(&w, hook_holding(CountDrop(dropped.clone()))).unwrap();
        drop(w);
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            3,
            "the tensor took its hook along"
        );
    }

    #[test]
    fn a_non_leaf_is_refused_with_libtorch_s_reason() {
        let w = leaf(&[1.0]);
        let derived = &w * 2.0;
        let err = on_accumulated(&derived, Box::new(|| {})).unwrap_err();
        assert!(err.0.contains("leaf"), "{err}");
    }

    #[test]
    fn a_dropped_grad_is_rewritten_not_added_to() {
        let w = leaf(&[1.0, 1.0]);
        (&w * 2.0).sum(Kind::Float).backward();
        drop_grad(&w).unwrap();
        assert!(!w.grad().defined());
        (&w * 3.0).sum(Kind::Float).backward();
        assert_eq!(Vec::<f32>::try_from(w.grad()).unwrap(), vec![3.0, 3.0]);
    }
}
