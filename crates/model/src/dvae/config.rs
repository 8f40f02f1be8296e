//! Hyperparameters of the dVAE. The defaults are those of OpenAI's released
//! model (256×256 RGB, n_hid 256, 2 blocks per group, 8192 codes, n_init 128).

use crate::{ModelError, Result};
use serde::{Deserialize, Serialize};

/// Number of resolution groups; fixed by the architecture.
pub const GROUP_COUNT: i64 = 4;
/// The largest down-sampling factor: a 2×2 pooling after every group but
/// the last, as in OpenAI's model.
pub const MAX_DOWNSAMPLE: i64 = 1 << (GROUP_COUNT - 1);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DvaeConfig {
    /// Side of the square input images, in pixels; a multiple of
    /// `downsample`.
    pub image_size: i64,
    /// How many pixels of the image's side one token covers: 8 (OpenAI's),
    /// 4, 2 or 1. Below 8 the first groups pool and the last ones keep the
    /// token grid's resolution (the decoder mirrors it), so the parameters
    /// are the same and only the grid is finer. A small image wants a finer
    /// grid: 8×8 tokens of a 64 px image leave a small shape one or two
    /// tokens and lose its outline (QUALITY.md).
    pub downsample: i64,
    /// Image channels (3 for RGB).
    pub channels: i64,
    /// Base width of the residual groups (widths are 1, 2, 4, 8 × n_hid).
    pub n_hid: i64,
    /// Residual blocks per group.
    pub n_blk_per_group: i64,
    /// Number of codebook entries (image vocabulary of stage 2).
    pub vocab_size: i64,
    /// Width of the decoder's first 1×1 conv, the codebook embedding size.
    pub n_init: i64,
    /// Scale of every residual path. Unset: OpenAI's 1 / n_layers² (n_layers
    /// = blocks in the whole network), which starts a deep stack close to
    /// the identity; a short run with few blocks learns faster at 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub post_gain: Option<f64>,
}

impl Default for DvaeConfig {
    fn default() -> Self {
        Self {
            image_size: 256,
            downsample: MAX_DOWNSAMPLE,
            channels: 3,
            n_hid: 256,
            n_blk_per_group: 2,
            vocab_size: 8192,
            n_init: 128,
            post_gain: None,
        }
    }
}

impl DvaeConfig {
    /// Side of the token grid an image encodes to.
    pub fn grid_size(&self) -> i64 {
        self.image_size / self.downsample
    }

    /// How many of the encoder's groups a 2×2 pooling follows.
    fn poolings(&self) -> i64 {
        self.downsample.max(1).ilog2() as i64
    }

    /// Side, in pixels, of the feature maps encoder group `g` (from 0)
    /// works on: the image's side, halved after each of the first
    /// [`poolings`](Self::poolings) groups.
    pub fn encoder_side(&self, g: i64) -> i64 {
        self.image_size >> g.min(self.poolings())
    }

    /// Side of the feature maps decoder group `g` (from 0) works on: the
    /// encoder's, in reverse order.
    pub fn decoder_side(&self, g: i64) -> i64 {
        self.encoder_side(GROUP_COUNT - 1 - g)
    }

    /// Whether a 2×2 max-pool follows encoder group `g`.
    pub fn encoder_pools_after(&self, g: i64) -> bool {
        g + 1 < GROUP_COUNT && self.encoder_side(g + 1) < self.encoder_side(g)
    }

    /// Whether nearest ×2 upsampling follows decoder group `g`.
    pub fn decoder_upsamples_after(&self, g: i64) -> bool {
        g + 1 < GROUP_COUNT && self.decoder_side(g + 1) > self.decoder_side(g)
    }

    /// The scale of every residual path (see [`DvaeConfig::post_gain`]).
    pub fn residual_gain(&self) -> f64 {
        let n_layers = GROUP_COUNT * self.n_blk_per_group;
        self.post_gain.unwrap_or(1.0 / (n_layers * n_layers) as f64)
    }

    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("image_size", self.image_size),
            ("channels", self.channels),
            ("n_hid", self.n_hid),
            ("n_blk_per_group", self.n_blk_per_group),
            ("vocab_size", self.vocab_size),
            ("n_init", self.n_init),
        ];
        if let Some((key, v)) = positive.iter().find(|(_, v)| *v <= 0) {
            return Err(ModelError::Config(format!(
                "dvae.{key} must be positive, got {v}"
            )));
        }
        if let Some(gain) = self.post_gain.filter(|g| !(g.is_finite() && *g > 0.0)) {
            return Err(ModelError::Config(format!(
                "dvae.post_gain must be positive, got {gain}"
            )));
        }
        let factors = (0..GROUP_COUNT).map(|p| 1i64 << p);
        if !factors.clone().any(|f| f == self.downsample) {
            let allowed: Vec<String> = factors.map(|f| f.to_string()).collect();
            return Err(ModelError::Config(format!(
                "dvae.downsample must be one of {}, got {}",
                allowed.join(", "),
                self.downsample
            )));
        }
        if self.image_size % self.downsample != 0 {
            return Err(ModelError::Config(format!(
                "dvae.image_size must be a multiple of dvae.downsample ({}), got {}",
                self.downsample, self.image_size
            )));
        }
        if self.n_hid % 4 != 0 {
            // Residual paths are n_out / 4 wide.
            return Err(ModelError::Config(format!(
                "dvae.n_hid must be a multiple of 4, got {}",
                self.n_hid
            )));
        }
        Ok(())
    }
}
