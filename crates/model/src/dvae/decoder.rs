//! The dVAE decoder: a (soft or one-hot) code grid → the statistics of a
//! logit-Laplace distribution per pixel (μ then ln b, 2·C channels).
//! Its first 1×1 conv, vocab → n_init, is the codebook. Parameter names
//! follow OpenAI's `dall_e/decoder.py`.

use super::block::{DECODER_KERNELS, ResBlock};
use super::config::{DvaeConfig, GROUP_COUNT};
use super::conv::Conv2d;
use tch::{Tensor, nn};

#[derive(Debug)]
pub struct Decoder {
    input: Conv2d,
    /// Blocks of each group.
    groups: Vec<Vec<ResBlock>>,
    /// Whether nearest ×2 upsampling follows each group: the last log2(d)
    /// before the last group, mirroring the encoder's poolings.
    upsampled: Vec<bool>,
    output: Conv2d,
}

impl Decoder {
    pub fn new(p: nn::Path, cfg: &DvaeConfig) -> Self {
        let blocks = &p / "blocks";
        let post_gain = cfg.residual_gain();
        let input = Conv2d::new(&blocks / "input", cfg.vocab_size, cfg.n_init, 1);
        let mut width = cfg.n_init;
        let groups = (1..=GROUP_COUNT)
            .map(|g| {
                let group = &blocks / format!("group_{g}");
                let n_out = cfg.n_hid << (GROUP_COUNT - g);
                let group_blocks = (1..=cfg.n_blk_per_group)
                    .map(|i| {
                        let n_in = if i == 1 { width } else { n_out };
                        let path = &group / format!("block_{i}");
                        ResBlock::new(path, n_in, n_out, post_gain, DECODER_KERNELS)
                    })
                    .collect();
                width = n_out;
                group_blocks
            })
            .collect();
        let output = Conv2d::new(&blocks / "output" / "conv", width, 2 * cfg.channels, 1);
        let upsampled = (0..GROUP_COUNT)
            .map(|g| cfg.decoder_upsamples_after(g))
            .collect();
        Self {
            input,
            groups,
            upsampled,
            output,
        }
    }

    /// # Shapes
    /// `(N, vocab, h, w)` codes → `(N, 2·C, d·h, d·w)` logit-Laplace statistics
    pub fn forward(&self, z: &Tensor) -> Tensor {
        (0..self.groups.len()).fold(z.shallow_clone(), |h, g| self.segment(g, &h))
    }

    /// Group `g` as one checkpointing segment: the input conv (the
    /// codebook) before the first group, nearest ×2 upsampling after each
    /// upsampling group, the ReLU and output conv after the last.
    /// [`Decoder::forward`] is these segments in turn.
    pub fn segment(&self, g: usize, x: &Tensor) -> Tensor {
        let h = if g == 0 {
            self.input.forward(x)
        } else {
            x.shallow_clone()
        };
        let h = self.groups[g].iter().fold(h, |h, b| b.forward(&h));
        if g + 1 == self.groups.len() {
            self.output.forward(&h.relu())
        } else if self.upsampled[g] {
            let (height, width) = (h.size()[2], h.size()[3]);
            h.upsample_nearest2d([2 * height, 2 * width], None, None)
        } else {
            h
        }
    }

    pub fn group_count(&self) -> usize {
        self.groups.len()
    }
}
