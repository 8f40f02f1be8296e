//! Hyperparameters of the stage-2 transformer.
//!
//! [`GptArch`] is what a user chooses (width, depth, heads, dropout,
//! attention layout); [`GptConfig`] adds what the data fixes (text and
//! image vocabularies, text length, image grid) and is what a weights file
//! carries. The defaults are the paper's 12-billion-parameter model.

use crate::{ModelError, Result};
use serde::{Deserialize, Serialize};

/// Which attention each layer uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionLayout {
    /// Full causal attention in every layer.
    #[default]
    Dense,
    /// The paper's sparse layout: row attention, column attention every
    /// fourth layer, convolutional attention in the last layer.
    Sparse,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GptArch {
    /// Model width.
    pub dim: i64,
    pub depth: i64,
    pub heads: i64,
    /// Hidden width of the MLP as a multiple of `dim`.
    pub mlp_ratio: i64,
    /// Dropout on embeddings and residual branches.
    pub dropout: f64,
    /// Dropout on attention weights.
    pub attn_dropout: f64,
    pub attention: AttentionLayout,
    /// Side of the neighbourhood of convolutional attention.
    pub conv_kernel: i64,
}

impl Default for GptArch {
    fn default() -> Self {
        Self {
            dim: 3968,
            depth: 64,
            heads: 62,
            mlp_ratio: 4,
            dropout: 0.0,
            attn_dropout: 0.0,
            attention: AttentionLayout::Sparse,
            conv_kernel: 11,
        }
    }
}

/// Everything that shapes a transformer: its architecture and the
/// vocabularies and lengths of its two kinds of tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    pub arch: GptArch,
    /// BPE vocabulary of the caption tokenizer (ids `0..text_vocab`).
    pub text_vocab: i64,
    /// Text positions per caption.
    pub text_len: i64,
    /// Codebook size of the dVAE.
    pub image_vocab: i64,
    /// Side of the dVAE's token grid.
    pub image_grid: i64,
}

impl GptConfig {
    /// Image tokens per image.
    pub fn image_len(&self) -> i64 {
        self.image_grid * self.image_grid
    }

    /// Positions the model reads: BOS and the caption, then every image
    /// token but the last (the last is only ever a target).
    pub fn seq_len(&self) -> i64 {
        self.text_len + self.image_len()
    }

    /// Targets of text positions: BPE ids, then one pad per position.
    pub fn text_targets(&self) -> i64 {
        self.text_vocab + self.text_len
    }

    /// The all-pad caption of classifier-free guidance and caption dropout.
    pub fn null_caption(&self) -> Vec<i64> {
        crate::text::null_caption(self.text_vocab as usize, self.text_len as usize)
    }

    /// The start-of-sequence token, after the per-position pads.
    pub fn bos(&self) -> i64 {
        self.text_targets()
    }

    pub fn validate(&self) -> Result<()> {
        let a = &self.arch;
        let positive = [
            ("gpt.model.dim", a.dim),
            ("gpt.model.depth", a.depth),
            ("gpt.model.heads", a.heads),
            ("gpt.model.mlp_ratio", a.mlp_ratio),
            ("gpt.model.conv_kernel", a.conv_kernel),
            ("text vocabulary", self.text_vocab),
            ("text.text_len", self.text_len),
            ("image vocabulary", self.image_vocab),
            ("image grid", self.image_grid),
        ];
        if let Some((key, v)) = positive.iter().find(|(_, v)| *v <= 0) {
            return Err(ModelError::Config(format!(
                "{key} must be positive, got {v}"
            )));
        }
        if a.dim % a.heads != 0 {
            return Err(ModelError::Config(format!(
                "gpt.model.dim ({}) must be a multiple of gpt.model.heads ({})",
                a.dim, a.heads
            )));
        }
        if a.conv_kernel % 2 == 0 {
            return Err(ModelError::Config(format!(
                "gpt.model.conv_kernel must be odd, got {}",
                a.conv_kernel
            )));
        }
        for (key, p) in [
            ("gpt.model.dropout", a.dropout),
            ("gpt.model.attn_dropout", a.attn_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(ModelError::Config(format!(
                    "{key} must be in [0, 1), got {p}"
                )));
            }
        }
        if self.image_vocab > i64::from(u16::MAX) + 1 {
            return Err(ModelError::Config(format!(
                "image vocabulary {} does not fit 16-bit tokens",
                self.image_vocab
            )));
        }
        Ok(())
    }
}
