//! The dVAE objective: reconstruction (logit-Laplace or MSE) plus β·KL of the
//! posterior to the uniform prior, and the metrics that watch it.
//!
//! Both terms are normalised per image dimension (C·H·W), as the evidence
//! lower bound is in bits-per-dim, so β keeps the paper's meaning at any
//! image size: loss = nll_per_dim + β · KL_per_image / (C·H·W).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Pixels are squeezed into [ε, 1−ε] so the logit-Laplace density stays finite.
pub const LOGIT_LAPLACE_EPS: f64 = 0.1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReconLoss {
    /// The paper's logit-Laplace likelihood on mapped pixels.
    LogitLaplace,
    /// Mean squared error of the decoded mean against the pixels.
    Mse,
}

/// [0, 1] pixels → [ε, 1−ε].
pub fn map_pixels(x: &Tensor) -> Tensor {
    x * (1.0 - 2.0 * LOGIT_LAPLACE_EPS) + LOGIT_LAPLACE_EPS
}

/// [ε, 1−ε] → [0, 1] pixels (clamped).
pub fn unmap_pixels(x: &Tensor) -> Tensor {
    ((x - LOGIT_LAPLACE_EPS) / (1.0 - 2.0 * LOGIT_LAPLACE_EPS)).clamp(0.0, 1.0)
}

/// Decoder statistics `(N, 2C, H, W)` → (μ, ln b), each `(N, C, H, W)`.
pub fn split_stats(stats: &Tensor) -> (Tensor, Tensor) {
    let c = stats.size()[1] / 2;
    (stats.narrow(1, 0, c), stats.narrow(1, c, c))
}

/// Pixels `[0, 1]` the decoder's statistics stand for: φ⁻¹(sigmoid μ).
pub fn stats_to_pixels(stats: &Tensor) -> Tensor {
    unmap_pixels(&split_stats(stats).0.sigmoid())
}

/// Mean negative log-likelihood per dimension of mapped pixels `x` under
/// logit-Laplace(μ, b): ln(2b) + ln(x(1−x)) + |logit x − μ| / b.
pub fn logit_laplace_nll(stats: &Tensor, x_mapped: &Tensor) -> Tensor {
    let (mu, ln_b) = split_stats(stats);
    let log_x_1mx = (x_mapped - x_mapped.square()).log(); // ln x(1−x)
    let dist = (x_mapped.logit(None::<f64>) - mu).abs();
    (&ln_b + std::f64::consts::LN_2 + log_x_1mx + dist * (-&ln_b).exp()).mean(Kind::Float)
}

/// KL(q(z|x) ‖ uniform) in nats, summed over the code grid, averaged over
/// the batch.
///
/// # Shapes
/// `(N, K, h, w)` logits → scalar
pub fn kl_to_uniform(logits: &Tensor) -> Tensor {
    let k = logits.size()[1] as f64;
    let log_q = logits.log_softmax(1, Kind::Float);
    let per_position = (log_q.exp() * (&log_q + k.ln())).sum_dim_intlist(1, false, Kind::Float);
    per_position.sum(Kind::Float) / logits.size()[0] as f64
}

/// Peak signal-to-noise ratio in dB of a mean squared error on [0, 1] pixels.
pub fn psnr(mse: f64) -> f64 {
    -10.0 * mse.max(1e-12).log10()
}

/// Codebook usage of a batch of tokens: distinct codes used and the
/// perplexity of their histogram (`exp` of its entropy). A collapsing
/// codebook shows as both falling.
pub fn codebook_usage(tokens: &Tensor, vocab_size: i64) -> (i64, f64) {
    let counts = tokens
        .flatten(0, -1)
        .bincount(None::<Tensor>, vocab_size)
        .to_kind(Kind::Double);
    let distinct = counts.gt(0.0).sum(Kind::Int64).int64_value(&[]);
    let p = &counts / counts.sum(Kind::Double);
    let entropy = -(&p * p.clamp_min(1e-30).log())
        .sum(Kind::Double)
        .double_value(&[]);
    (distinct, entropy.exp())
}
