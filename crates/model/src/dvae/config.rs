//! Hyperparameters of the dVAE. The defaults are those of OpenAI's released
//! model (256×256 RGB, n_hid 256, 2 blocks per group, 8192 codes, n_init 128).

use crate::{ModelError, Result};
use serde::{Deserialize, Serialize};

/// Number of resolution groups; fixed by the architecture (downsampling ×8).
pub const GROUP_COUNT: i64 = 4;
/// Total down-sampling factor of the encoder (three 2×2 poolings).
pub const DOWNSAMPLE: i64 = 8;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DvaeConfig {
    /// Side of the square input images, in pixels; a multiple of 8.
    pub image_size: i64,
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
        self.image_size / DOWNSAMPLE
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
        if self.image_size % DOWNSAMPLE != 0 {
            return Err(ModelError::Config(format!(
                "dvae.image_size must be a multiple of {DOWNSAMPLE}, got {}",
                self.image_size
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
