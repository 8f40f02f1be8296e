//! The convolution of OpenAI's dVAE: parameters `w` and `b`, weights drawn
//! from N(0, 1/sqrt(n_in·k²)), zero biases, 'same' padding.
//!
//! It computes in channels-last layout (each pixel's channels adjacent in
//! memory), which oneDNN on the CPU and cuDNN's tensor-core kernels run
//! faster than NCHW: about 1.2× for the whole dVAE step on the CPU
//! (BENCHMARKS.md). Tensors keep their NCHW shape; only strides change.
//! The weights stay NCHW in the parameters (so the optimizer's flat
//! buffers and checkpoints do not change) and are laid out afresh for each
//! forward, a copy far smaller than the activations; activations stay
//! channels-last from one convolution to the next, since ReLU, pooling,
//! upsampling and sums keep their input's layout.

use tch::{Tensor, nn};

#[derive(Debug)]
pub struct Conv2d {
    w: Tensor,
    b: Tensor,
    padding: i64,
}

impl Conv2d {
    pub fn new(p: nn::Path, n_in: i64, n_out: i64, kernel: i64) -> Self {
        let stdev = 1.0 / ((n_in * kernel * kernel) as f64).sqrt();
        let w = p.var(
            "w",
            &[n_out, n_in, kernel, kernel],
            nn::Init::Randn { mean: 0.0, stdev },
        );
        let b = p.var("b", &[n_out], nn::Init::Const(0.0));
        Self {
            w,
            b,
            padding: (kernel - 1) / 2,
        }
    }

    /// # Shapes
    /// `(N, n_in, H, W)` → `(N, n_out, H, W)`
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let p = self.padding;
        channels_last(x).conv2d(
            &channels_last(&self.w),
            Some(&self.b),
            [1, 1],
            [p, p],
            [1, 1],
            1,
        )
    }
}

/// `x` `(N, C, H, W)` with channels-last strides: the same values, stored
/// N, H, W, C. No copy for a tensor that already is.
pub fn channels_last(x: &Tensor) -> Tensor {
    x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}
