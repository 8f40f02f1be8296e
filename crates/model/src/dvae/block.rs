//! Residual block shared by encoder and decoder:
//! `id_path(x) + post_gain · res_path(x)`, with OpenAI's `post_gain = 1 /
//! n_layers²` (n_layers = blocks in the whole network) unless the config
//! sets it, so that a deep stack of blocks starts close to the identity. `id_path` is a 1×1 conv only where the
//! width changes. The residual path is four ReLU→conv pairs through a
//! bottleneck of n_out / 4 channels; only the kernel sizes differ between
//! encoder (3,3,3,1) and decoder (1,3,3,3).

use super::conv::Conv2d;
use tch::{Tensor, nn};

pub const ENCODER_KERNELS: [i64; 4] = [3, 3, 3, 1];
pub const DECODER_KERNELS: [i64; 4] = [1, 3, 3, 3];

#[derive(Debug)]
pub struct ResBlock {
    id_path: Option<Conv2d>,
    res_path: Vec<Conv2d>,
    post_gain: f64,
}

impl ResBlock {
    pub fn new(p: nn::Path, n_in: i64, n_out: i64, post_gain: f64, kernels: [i64; 4]) -> Self {
        let n_hid = n_out / 4;
        let id_path = (n_in != n_out).then(|| Conv2d::new(&p / "id_path", n_in, n_out, 1));
        let widths = [n_in, n_hid, n_hid, n_hid, n_out];
        let res = &p / "res_path";
        let res_path = kernels
            .iter()
            .enumerate()
            .map(|(i, &k)| {
                Conv2d::new(
                    &res / format!("conv_{}", i + 1),
                    widths[i],
                    widths[i + 1],
                    k,
                )
            })
            .collect();
        Self {
            id_path,
            res_path,
            post_gain,
        }
    }

    /// # Shapes
    /// `(N, n_in, H, W)` → `(N, n_out, H, W)`
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let id = match &self.id_path {
            Some(conv) => conv.forward(x),
            None => x.shallow_clone(),
        };
        let res = self
            .res_path
            .iter()
            .fold(x.shallow_clone(), |h, conv| conv.forward(&h.relu()));
        id + res * self.post_gain
    }
}
