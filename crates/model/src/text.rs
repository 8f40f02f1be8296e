//! The caption tokenizer of stage 2: byte-level BPE trained on the
//! dataset's captions, with the paper's per-position padding.

use serde::{Deserialize, Serialize};

/// How captions become text tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TextConfig {
    /// BPE vocabulary size, special tokens included (paper: 16384).
    pub vocab_size: usize,
    /// Text positions per caption (paper: 256).
    pub text_len: usize,
    /// A pair must occur this often to become a merge.
    pub min_frequency: u64,
    /// BPE dropout while encoding training captions (0 turns it off).
    pub bpe_dropout: f32,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 16384,
            text_len: 256,
            min_frequency: 2,
            bpe_dropout: 0.0,
        }
    }
}
