//! Attention patterns. Every pattern is causal; text queries always see the
//! whole caption before them, and image queries always see the whole
//! caption. The sparse patterns restrict which earlier *image* tokens an
//! image query sees (sequence position `text_len + 1 + j` holds image token
//! `j`, at grid row `j / g`, column `j % g`):
//!
//! - row: the previous `g` image tokens, i.e. one row's worth (a sliding
//!   window, so information still crosses row ends);
//! - column: image tokens in the same column;
//! - convolutional: image tokens within a `k × k` neighbourhood.

use super::config::{AttentionLayout, GptConfig};
use tch::{Device, Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pattern {
    Causal,
    Row,
    Column,
    Conv,
}

/// The pattern of each layer.
pub fn layer_patterns(config: &GptConfig) -> Vec<Pattern> {
    let depth = config.arch.depth as usize;
    (0..depth)
        .map(|i| match config.arch.attention {
            AttentionLayout::Dense => Pattern::Causal,
            AttentionLayout::Sparse if i + 1 == depth => Pattern::Conv,
            AttentionLayout::Sparse if i % 4 == 2 => Pattern::Column,
            AttentionLayout::Sparse => Pattern::Row,
        })
        .collect()
}

/// Whether the query at sequence position `q` may attend to the key at `k`.
pub fn allowed(pattern: Pattern, config: &GptConfig, q: i64, k: i64) -> bool {
    if k > q {
        return false;
    }
    // Positions 0..=text_len hold BOS and the caption.
    let first_image = config.text_len + 1;
    if q < first_image || k < first_image {
        return true;
    }
    let g = config.image_grid;
    let (jq, jk) = (q - first_image, k - first_image);
    let (rq, cq, rk, ck) = (jq / g, jq % g, jk / g, jk % g);
    let half = config.arch.conv_kernel / 2;
    match pattern {
        Pattern::Causal => true,
        Pattern::Row => jq - jk < g,
        Pattern::Column => cq == ck,
        Pattern::Conv => (rq - rk).abs() <= half && (cq - ck).abs() <= half,
    }
}

/// The `(seq_len, seq_len)` boolean mask of a pattern (true: attend).
pub fn mask(pattern: Pattern, config: &GptConfig, device: Device) -> Tensor {
    let n = config.seq_len();
    let values: Vec<bool> = (0..n * n)
        .map(|i| allowed(pattern, config, i / n, i % n))
        .collect();
    Tensor::from_slice(&values)
        .view([n, n])
        .to_kind(Kind::Bool)
        .to_device(device)
}
