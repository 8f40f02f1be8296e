//! libtorch kernels that tch does not bind, through a small C++ shim
//! (`src/shim.cpp`, compiled against the headers of the libtorch torch-sys
//! links):
//!
//! - [`fused_adamw`]: libtorch's fused AdamW update (what
//!   `torch.optim.AdamW(fused=True)` runs), one pass over each tensor
//!   instead of one kernel per operation of the update and a temporary
//!   for most of them;
//! - [`cuda_graph::CudaGraph`]: libtorch's CUDA graphs (`src/cuda_graph.cpp`),
//!   a step captured once and replayed with one launch.

pub mod cuda_graph;

use std::ffi::CStr;
use std::os::raw::{c_char, c_void};
use tch::Tensor;

unsafe extern "C" {
    fn dalle_kernels_last_error() -> *const c_char;
    fn dalle_kernels_fused_adamw(
        params: *const *mut c_void,
        grads: *const *mut c_void,
        exp_avgs: *const *mut c_void,
        exp_avg_sqs: *const *mut c_void,
        steps: *const *mut c_void,
        count: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> i32;
}

/// Why a call into the shim failed: libtorch's own message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelError(pub String);

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "libtorch kernel: {}", self.0)
    }
}

impl std::error::Error for KernelError {}

fn status(code: i32) -> Result<(), KernelError> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: the shim returns a pointer to its thread-local message,
    // valid until its next failing call on this thread.
    let message = unsafe { CStr::from_ptr(dalle_kernels_last_error()) };
    Err(KernelError(message.to_string_lossy().into_owned()))
}

/// The hyperparameters of one AdamW update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWUpdate {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// One tensor the update applies to, with its gradient, its two moments
/// (all four of one shape, dtype and device) and its step count: a scalar
/// f32 tensor on the same device, already counting this update.
pub struct AdamWSlot<'a> {
    pub param: &'a Tensor,
    pub grad: &'a Tensor,
    pub exp_avg: &'a Tensor,
    pub exp_avg_sq: &'a Tensor,
    pub step: &'a Tensor,
}

/// Cutting a buffer into slots at multiples of this many elements from its
/// start changes no bit of the update. The CPU kernel works through a
/// tensor in cache-line units (16 f32) and vectors, and rounds its last
/// partial vector differently (no fused multiply-add): only where a slot
/// ends unaligned do its last elements come out otherwise. 64 leaves room
/// for wider lines and vectors.
pub const SLOT_ALIGN: i64 = 64;

/// Updates every slot's parameter and moments in place with AdamW
/// (decoupled weight decay), by libtorch's fused kernel. Every element is
/// updated on its own: cut at multiples of [`SLOT_ALIGN`], a buffer comes
/// out the same bit for bit whatever its slots.
pub fn fused_adamw(slots: &[AdamWSlot], update: AdamWUpdate) -> Result<(), KernelError> {
    if slots.is_empty() {
        return Ok(());
    }
    // libtorch checks devices and dtypes, not lengths: a short gradient or
    // moment would be read or written past its end.
    for (i, slot) in slots.iter().enumerate() {
        let shape = slot.param.size();
        for (what, t) in [
            ("gradient", slot.grad),
            ("exp_avg", slot.exp_avg),
            ("exp_avg_sq", slot.exp_avg_sq),
        ] {
            if t.size() != shape || !t.is_contiguous() {
                return Err(KernelError(format!(
                    "fused AdamW slot {i}: the {what} has shape {:?}{}, the parameter {shape:?}",
                    t.size(),
                    if t.is_contiguous() {
                        ""
                    } else {
                        " (not contiguous)"
                    }
                )));
            }
        }
        if !slot.param.is_contiguous() || slot.step.numel() != 1 {
            return Err(KernelError(format!(
                "fused AdamW slot {i}: the parameter must be contiguous and the step one scalar"
            )));
        }
    }
    let raw = |pick: for<'s> fn(&'s AdamWSlot<'s>) -> &'s Tensor| -> Vec<*mut c_void> {
        slots
            .iter()
            .map(|s| pick(s).as_ptr() as *mut c_void)
            .collect()
    };
    let params = raw(|s| s.param);
    let grads = raw(|s| s.grad);
    let exp_avgs = raw(|s| s.exp_avg);
    let exp_avg_sqs = raw(|s| s.exp_avg_sq);
    let steps = raw(|s| s.step);
    let AdamWUpdate {
        lr,
        beta1,
        beta2,
        weight_decay,
        eps,
    } = update;
    // SAFETY: every pointer is a live `at::Tensor` borrowed from `slots`
    // for the length of the call, and each array holds `slots.len()` of
    // them.
    status(unsafe {
        dalle_kernels_fused_adamw(
            params.as_ptr(),
            grads.as_ptr(),
            exp_avgs.as_ptr(),
            exp_avg_sqs.as_ptr(),
            steps.as_ptr(),
            slots.len(),
            lr,
            beta1,
            beta2,
            weight_decay,
            eps,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    const UPDATE: AdamWUpdate = AdamWUpdate {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.96,
        weight_decay: 0.1,
        eps: 1e-8,
    };

    struct State {
        p: Tensor,
        g: Tensor,
        m: Tensor,
        v: Tensor,
    }

    /// Deterministic values without the global generator, which tests
    /// running in parallel would race for.
    fn state(n: i64) -> State {
        let x = Tensor::arange(n, (Kind::Float, Device::Cpu));
        State {
            p: (&x * 0.37).sin(),
            g: (&x * 1.91).cos(),
            m: (&x * 0.73).sin() * 0.1,
            v: (&x * 0.29).cos().square() * 0.01,
        }
    }

    /// Runs the update over `cuts` of the buffers.
    fn update(s: &State, cuts: &[(i64, i64)], step: f64) {
        let step = Tensor::from(step as f32);
        let views: Vec<[Tensor; 4]> = cuts
            .iter()
            .map(|&(start, len)| [&s.p, &s.g, &s.m, &s.v].map(|t| t.narrow(0, start, len)))
            .collect();
        let slots: Vec<AdamWSlot> = views
            .iter()
            .map(|[p, g, m, v]| AdamWSlot {
                param: p,
                grad: g,
                exp_avg: m,
                exp_avg_sq: v,
                step: &step,
            })
            .collect();
        fused_adamw(&slots, UPDATE).unwrap();
    }

    #[test]
    fn matches_the_adamw_formula() {
        let s = state(1000);
        let (p0, g, m0, v0) = (s.p.copy(), s.g.copy(), s.m.copy(), s.v.copy());
        let step = 3;
        update(&s, &[(0, 1000)], step as f64);
        let u = UPDATE;
        let (lr, beta1, beta2, weight_decay, eps) = (u.lr, u.beta1, u.beta2, u.weight_decay, u.eps);
        let m = &m0 * beta1 + &g * (1.0 - beta1);
        let v = &v0 * beta2 + &g * &g * (1.0 - beta2);
        let m_hat = &m / (1.0 - beta1.powi(step));
        let v_hat = &v / (1.0 - beta2.powi(step));
        let p = &p0 * (1.0 - lr * weight_decay) - m_hat / (v_hat.sqrt() + eps) * lr;
        for (got, want) in [(&s.p, p), (&s.m, m), (&s.v, v)] {
            let err = (got - &want).abs().max().double_value(&[]);
            assert!(err < 1e-6, "fused AdamW is {err} from the formula");
        }
    }

    #[test]
    fn cutting_a_buffer_into_slots_changes_no_bit() {
        let n = 100_003;
        let whole = state(n);
        update(&whole, &[(0, n)], 5.0);
        let cut = state(n);
        update(&cut, &[(0, 64), (64, 4096), (4160, n - 4160)], 5.0);
        for (a, b) in [(&whole.p, &cut.p), (&whole.m, &cut.m), (&whole.v, &cut.v)] {
            assert!(a.equal(b));
        }
    }

    #[test]
    fn a_mismatched_slot_is_an_error_not_a_crash() {
        let s = state(10);
        let short = Tensor::zeros([9], (Kind::Float, Device::Cpu));
        let step = Tensor::from(1f32);
        let slot = AdamWSlot {
            param: &s.p,
            grad: &short,
            exp_avg: &s.m,
            exp_avg_sq: &s.v,
            step: &step,
        };
        let err = fused_adamw(&[slot], UPDATE).unwrap_err();
        assert!(
            err.0.contains("slot 0: the gradient has shape [9]"),
            "{err}"
        );
    }
}
