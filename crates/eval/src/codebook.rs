//! How much of its codebook a dVAE uses on a set of images. A collapsed
//! codebook (a handful of codes carrying every image) shows here before it
//! shows anywhere else: over the whole set, and per batch of the training
//! batch size, which is what the training log lines count.

use crate::{EvalError, Result};
use dalle_model::dvae::loss::codebook_usage;
use serde::Serialize;
use tch::Tensor;

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct CodebookUsage {
    pub codebook_size: i64,
    /// Distinct codes over the whole set.
    pub distinct: i64,
    /// Perplexity (`exp` of the entropy) of the whole set's code histogram.
    pub perplexity: f64,
    /// Images per batch for the per-batch figures.
    pub batch_size: usize,
    /// Whole batches counted (a last, partial one is left out, as it would
    /// count fewer codes; a set smaller than one batch is one batch).
    pub batches: usize,
    /// Mean over batches of the distinct codes in each.
    pub mean_distinct_per_batch: f64,
}

impl CodebookUsage {
    /// Usage of `(N, h, w)` tokens of a codebook of `codebook_size` codes.
    pub fn of(tokens: &Tensor, codebook_size: i64, batch_size: usize) -> Result<Self> {
        let n = match tokens.size()[..] {
            [n, _, _] if n > 0 => n as usize,
            _ => {
                return Err(EvalError::Input {
                    what: "image tokens",
                    expected: "a non-empty (N, h, w) grid of tokens".into(),
                    found: format!("{:?}", tokens.size()),
                });
            }
        };
        let (low, high) = (tokens.min().int64_value(&[]), tokens.max().int64_value(&[]));
        if low < 0 || high >= codebook_size {
            return Err(EvalError::Input {
                what: "image tokens",
                expected: format!("codes within 0..{codebook_size}"),
                found: format!("codes from {low} to {high}"),
            });
        }
        let (distinct, perplexity) = codebook_usage(tokens, codebook_size);
        let batch_size = batch_size.max(1);
        let batches = (n / batch_size).max(1);
        let per_batch = batch_size.min(n) as i64;
        let total: i64 = (0..batches as i64)
            .map(|b| codebook_usage(&tokens.narrow(0, b * per_batch, per_batch), codebook_size).0)
            .sum();
        Ok(Self {
            codebook_size,
            distinct,
            perplexity,
            batch_size,
            batches,
            mean_distinct_per_batch: total as f64 / batches as f64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(codes: &[i64], images: i64) -> Tensor {
        Tensor::from_slice(codes).view([images, 1, -1])
    }

    #[test]
    fn usage_counts_the_set_and_its_batches() {
        // Four images of two positions: codes {0,1}, {2,3}, {0,0}, {4,4}.
        let tokens = grid(&[0, 1, 2, 3, 0, 0, 4, 4], 4);
        let usage = CodebookUsage::of(&tokens, 8, 2).unwrap();
        assert_eq!((usage.distinct, usage.codebook_size), (5, 8));
        // Histogram 3, 1, 1, 1, 2 of 8.
        let p = [3.0, 1.0, 1.0, 1.0, 2.0].map(|c: f64| c / 8.0);
        let entropy: f64 = p.iter().map(|p| -p * p.ln()).sum();
        assert!((usage.perplexity - entropy.exp()).abs() < 1e-9);
        // Batches {0,1,2,3} and {0,4}: 4 and 2 codes.
        assert_eq!(usage.batches, 2);
        assert!((usage.mean_distinct_per_batch - 3.0).abs() < 1e-12);
        // A partial last batch is left out; a set under one batch is one.
        let odd = CodebookUsage::of(&tokens.narrow(0, 0, 3), 8, 2).unwrap();
        assert_eq!(odd.batches, 1);
        assert!((odd.mean_distinct_per_batch - 4.0).abs() < 1e-12);
        let small = CodebookUsage::of(&tokens, 8, 16).unwrap();
        assert_eq!(small.batches, 1);
        assert!((small.mean_distinct_per_batch - 5.0).abs() < 1e-12);
    }

    #[test]
    fn tokens_outside_the_codebook_are_refused() {
        let e = CodebookUsage::of(&grid(&[0, 9], 1), 8, 1).unwrap_err();
        assert!(
            e.to_string().contains("0..8") && e.to_string().contains("9"),
            "{e}"
        );
        let flat = Tensor::from_slice(&[0i64, 1]);
        assert!(CodebookUsage::of(&flat, 8, 1).is_err());
    }
}
