//! The convolution of OpenAI's dVAE: parameters `w` and `b`, weights drawn
//! from N(0, 1/sqrt(n_in·k²)), zero biases, 'same' padding.

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
        x.conv2d(&self.w, Some(&self.b), [1, 1], [p, p], [1, 1], 1)
    }
}
