//! Gumbel-softmax relaxation of the categorical posterior over codes.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Relaxation {
    /// The paper's relaxation: the decoder sees softmax((logits + g) / τ).
    Soft,
    /// One-hot of the sampled code forward, soft sample's gradient backward.
    StraightThrough,
}

/// Samples relaxed codes over dim 1 of `logits`.
///
/// # Shapes
/// `(N, K, h, w)` logits → `(N, K, h, w)` relaxed codes
pub fn gumbel_softmax(logits: &Tensor, tau: f64, mode: Relaxation) -> Tensor {
    // Clamp keeps log(-log u) finite for u = 0 and u → 1.
    let u = logits.rand_like().clamp(1e-10, 1.0 - 1e-7);
    let gumbel = -(-u.log()).log();
    let soft = ((logits + gumbel) / tau).softmax(1, Kind::Float);
    match mode {
        Relaxation::Soft => soft,
        Relaxation::StraightThrough => {
            // soft - soft.detach() is exactly zero forward, so the sum is
            // exactly one-hot, while its gradient is the soft sample's.
            one_hot_codes(&soft.argmax(1, false), logits.size()[1]) + (&soft - soft.detach())
        }
    }
}

/// # Shapes
/// `(N, h, w)` token ids → `(N, K, h, w)` float one-hot codes
pub fn one_hot_codes(tokens: &Tensor, vocab_size: i64) -> Tensor {
    tokens
        .one_hot(vocab_size)
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
}
