//! The dVAE encoder: mapped pixels → logits over the codebook on an
//! (H/d)×(W/d) grid, d = `downsample`. Parameter names follow OpenAI's `dall_e/encoder.py`:
//! `blocks.input`, `blocks.group_{1..4}.block_{i}`, `blocks.output.conv`.

use super::block::{ENCODER_KERNELS, ResBlock};
use super::config::{DvaeConfig, GROUP_COUNT};
use super::conv::Conv2d;
use tch::{Tensor, nn};

#[derive(Debug)]
pub struct Encoder {
    input: Conv2d,
    /// Blocks of each group.
    groups: Vec<Vec<ResBlock>>,
    /// Whether a 2×2 max-pool follows each group: the first log2(d).
    pooled: Vec<bool>,
    output: Conv2d,
}

impl Encoder {
    pub fn new(p: nn::Path, cfg: &DvaeConfig) -> Self {
        let blocks = &p / "blocks";
        let post_gain = cfg.residual_gain();
        let input = Conv2d::new(&blocks / "input", cfg.channels, cfg.n_hid, 7);
        let mut width = cfg.n_hid;
        let groups = (1..=GROUP_COUNT)
            .map(|g| {
                let group = &blocks / format!("group_{g}");
                let n_out = cfg.n_hid << (g - 1);
                let group_blocks = (1..=cfg.n_blk_per_group)
                    .map(|i| {
                        let n_in = if i == 1 { width } else { n_out };
                        let path = &group / format!("block_{i}");
                        ResBlock::new(path, n_in, n_out, post_gain, ENCODER_KERNELS)
                    })
                    .collect();
                width = n_out;
                group_blocks
            })
            .collect();
        let output = Conv2d::new(&blocks / "output" / "conv", width, cfg.vocab_size, 1);
        let pooled = (0..GROUP_COUNT)
            .map(|g| cfg.encoder_pools_after(g))
            .collect();
        Self {
            input,
            groups,
            pooled,
            output,
        }
    }

    /// # Shapes
    /// `(N, C, H, W)` mapped pixels → `(N, vocab, H/d, W/d)` logits
    pub fn forward(&self, x: &Tensor) -> Tensor {
        (0..self.groups.len()).fold(x.shallow_clone(), |h, g| self.segment(g, &h))
    }

    /// Group `g` as one checkpointing segment: the input conv before the
    /// first group, the 2×2 max-pool after each pooling group, the ReLU and
    /// output conv after the last. [`Encoder::forward`] is these
    /// segments in turn.
    pub fn segment(&self, g: usize, x: &Tensor) -> Tensor {
        let h = if g == 0 {
            self.input.forward(x)
        } else {
            x.shallow_clone()
        };
        let h = self.groups[g].iter().fold(h, |h, b| b.forward(&h));
        if g + 1 == self.groups.len() {
            self.output.forward(&h.relu())
        } else if self.pooled[g] {
            h.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)
        } else {
            h
        }
    }

    pub fn group_count(&self) -> usize {
        self.groups.len()
    }
}
