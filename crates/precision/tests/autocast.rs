//! The autocast guard on the CPU (libtorch runs bf16 there): what it turns
//! on, what it restores, and that weights changed between regions are seen.

use dalle_precision::{Autocast, Precision, autocast_kind, full_precision, is_autocast_enabled};
use tch::{Device, Kind, Tensor};

const CPU: Device = Device::Cpu;

/// A leaf that is not a view, as parameters are: autocast caches only those.
fn weight() -> Tensor {
    Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0])
        .view([2, 2])
        .copy()
        .set_requires_grad(true)
}

#[test]
fn bf16_regions_compute_matmuls_in_bf16_and_restore_the_state() {
    assert!(!is_autocast_enabled(CPU));
    let (x, w) = (Tensor::ones([3, 2], (Kind::Float, CPU)), weight());
    {
        let _bf16 = Autocast::enter(CPU, Precision::Bf16);
        assert_eq!(autocast_kind(CPU), Some(Kind::BFloat16));
        assert_eq!(x.matmul(&w).kind(), Kind::BFloat16);
        // An fp32 island inside turns it off, and back on after.
        full_precision(CPU, || assert_eq!(x.matmul(&w).kind(), Kind::Float));
        assert!(is_autocast_enabled(CPU));
        {
            let _fp32 = Autocast::enter(CPU, Precision::Fp32);
            assert_eq!(autocast_kind(CPU), None);
        }
        assert!(is_autocast_enabled(CPU));
    }
    assert!(!is_autocast_enabled(CPU));
    assert_eq!(x.matmul(&w).kind(), Kind::Float);
    // TF32 on a CPU is plain fp32.
    let _tf32 = Autocast::enter(CPU, Precision::Tf32);
    assert_eq!(x.matmul(&w).kind(), Kind::Float);
}

/// The weight-cast cache is dropped with the region: a weight updated in
/// place between two regions gives the new result, as the optimizer's
/// steps between training steps must.
#[test]
fn a_weight_changed_between_regions_is_cast_afresh() {
    let (x, w) = (Tensor::ones([1, 2], (Kind::Float, CPU)), weight());
    let add_ten = || {
        tch::no_grad(|| {
            let _ = w.shallow_clone().g_add_scalar_(10.0);
        })
    };
    let before = {
        let _bf16 = Autocast::enter(CPU, Precision::Bf16);
        let first = x.matmul(&w).to_kind(Kind::Float);
        // Why the guard clears: inside one region the cached cast of the
        // old weight is what the next forward gets.
        add_ten();
        let stale = x.matmul(&w).to_kind(Kind::Float);
        assert!(stale.equal(&first), "{stale} against {first}");
        first
    };
    add_ten();
    let after = {
        let _bf16 = Autocast::enter(CPU, Precision::Bf16);
        x.matmul(&w).to_kind(Kind::Float)
    };
    let expected = Tensor::from_slice(&[44.0f32, 46.0]).view([1, 2]);
    assert!(after.equal(&expected), "{after} after {before}");
}

/// A forward without autograd inside a region (an evaluation, the first
/// pass of checkpointed blocks) must not leave casts without gradient
/// history in the cache for the training forward after it.
#[test]
fn a_no_grad_forward_does_not_break_the_gradients_of_the_next() {
    let (x, w) = (Tensor::ones([1, 2], (Kind::Float, CPU)), weight());
    let _bf16 = Autocast::enter(CPU, Precision::Bf16);
    let _ = tch::no_grad(|| x.matmul(&w));
    x.matmul(&w).sum(Kind::Float).backward();
    let grad = w.grad();
    assert!(grad.defined(), "no gradient reached the weight");
    assert_eq!(
        grad.kind(),
        Kind::Float,
        "gradients of fp32 weights are fp32"
    );
    assert!(
        grad.equal(&Tensor::ones([2, 2], (Kind::Float, CPU))),
        "{grad}"
    );
}
