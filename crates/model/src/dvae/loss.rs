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
    /// A Gaussian likelihood of the decoded mean with a fixed scale
    /// [`PIXEL_SIGMA`] on [0, 1] pixels: MSE / (2σ²) + ln(σ√(2π)) nats per
    /// dimension. In nats, like the logit-Laplace term, so β weighs the
    /// KL against it on the same scale; a raw MSE (~0.01) would let any
    /// β > 0 drive the posterior to the uniform prior.
    Mse,
}

/// Scale of the Gaussian likelihood of [`ReconLoss::Mse`]: a pixel off by a
/// tenth of the range costs half a nat more than an exact one.
pub const PIXEL_SIGMA: f64 = 0.1;

/// Negative log-likelihood per dimension of [`ReconLoss::Mse`] for a mean
/// squared error on [0, 1] pixels.
pub fn gaussian_nll(mse: &Tensor) -> Tensor {
    let log_norm = (PIXEL_SIGMA * (2.0 * std::f64::consts::PI).sqrt()).ln();
    mse / (2.0 * PIXEL_SIGMA * PIXEL_SIGMA) + log_norm
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
    posterior_terms(logits).0
}

/// [`kl_to_uniform`] and [`mean_posterior`] of the same logits, from one
/// softmax.
pub fn posterior_terms(logits: &Tensor) -> (Tensor, Tensor) {
    let k = logits.size()[1] as f64;
    let log_q = logits.log_softmax(1, Kind::Float);
    let q = log_q.exp();
    let per_position = (&q * (&log_q + k.ln())).sum_dim_intlist(1, false, Kind::Float);
    let kl = per_position.sum(Kind::Float) / logits.size()[0] as f64;
    let mean = q.mean_dim([0i64, 2, 3].as_slice(), false, Kind::Float);
    (kl, mean)
}

/// Mean posterior over codes of a batch, `q̄(k)`: the soft code histogram
/// that the codebook-usage term spreads out.
///
/// # Shapes
/// `(N, K, h, w)` logits → `(K,)`
pub fn mean_posterior(logits: &Tensor) -> Tensor {
    logits
        .softmax(1, Kind::Float)
        .mean_dim([0i64, 2, 3].as_slice(), false, Kind::Float)
}

/// KL(q̄ ‖ uniform) in nats of a mean posterior `(K,)`: 0 when the batch
/// spreads its codes evenly over the codebook, ln K when it uses one code.
pub fn usage_kl(mean_posterior: &Tensor) -> Tensor {
    let k = mean_posterior.size()[0] as f64;
    (mean_posterior * (mean_posterior.clamp_min(1e-30).log() + k.ln())).sum(Kind::Float)
}

/// A loss whose gradient with respect to this rank's logits is that of
/// KL(q̄_global ‖ uniform), where `global` is the mean posterior over every
/// rank's batch (a constant here) and `local` this rank's, carrying the
/// graph. Averaged over ranks by sample count, as data-parallel gradients
/// are, it gives exactly the gradient of the usage term of the whole global
/// batch, so the objective does not depend on how the batch is split.
///
/// d KL / d q̄(k) = ln q̄(k) + ln K + 1; the constant 1 drops out because
/// q̄ always sums to one.
pub fn usage_surrogate(local: &Tensor, global: &Tensor) -> Tensor {
    let k = global.size()[0] as f64;
    let slope = (global.detach().clamp_min(1e-30).log() + k.ln()).to_device(local.device());
    (local * slope).sum(Kind::Float)
}

/// Peak signal-to-noise ratio in dB of a mean squared error on [0, 1] pixels.
pub fn psnr(mse: f64) -> f64 {
    -10.0 * mse.max(1e-12).log10()
}

/// Codebook usage of a batch of tokens: distinct codes used and the
/// perplexity of their histogram (`exp` of its entropy). A collapsing
/// codebook shows as both falling.
pub fn codebook_usage(tokens: &Tensor, vocab_size: i64) -> (i64, f64) {
    histogram_usage(&tokens.flatten(0, -1).bincount(None::<Tensor>, vocab_size))
}

/// [`codebook_usage`] of a code histogram `(K,)` (e.g. one summed over
/// ranks); an empty histogram uses no codes, perplexity 0.
pub fn histogram_usage(counts: &Tensor) -> (i64, f64) {
    let counts = counts.to_kind(Kind::Double);
    if counts.sum(Kind::Double).double_value(&[]) == 0.0 {
        return (0, 0.0);
    }
    let distinct = counts.gt(0.0).sum(Kind::Int64).int64_value(&[]);
    let p = &counts / counts.sum(Kind::Double);
    let entropy = -(&p * p.clamp_min(1e-30).log())
        .sum(Kind::Double)
        .double_value(&[]);
    (distinct, entropy.exp())
}
