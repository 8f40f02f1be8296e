//! Schedules of the paper: cosine interpolation from a start to an end
//! value over a number of updates, flat afterwards, with an optional linear
//! warm-up from zero.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cosine {
    pub start: f64,
    pub end: f64,
    /// Updates over which the value moves from `start` to `end`.
    pub steps: u64,
    /// Updates of linear warm-up from 0 to `start` before the cosine.
    #[serde(default)]
    pub warmup: u64,
}

impl Cosine {
    pub const fn new(start: f64, end: f64, steps: u64) -> Self {
        Self {
            start,
            end,
            steps,
            warmup: 0,
        }
    }

    /// The value at update `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.start * (step + 1) as f64 / self.warmup as f64;
        }
        let t = (step - self.warmup).min(self.steps) as f64 / self.steps.max(1) as f64;
        self.end + (self.start - self.end) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_endpoints_midpoint_and_plateau() {
        let s = Cosine::new(1.0, 1.0 / 16.0, 100);
        assert_eq!(s.at(0), 1.0);
        assert!((s.at(50) - (1.0 + 1.0 / 16.0) / 2.0).abs() < 1e-12);
        assert!((s.at(100) - 1.0 / 16.0).abs() < 1e-12);
        assert_eq!(s.at(100), s.at(10_000));
        // Increasing schedules (β: 0 → 6.6) work the same way.
        let beta = Cosine::new(0.0, 6.6, 10);
        assert!(beta.at(3) < beta.at(4) && beta.at(10) == 6.6);
    }

    #[test]
    fn warmup_ramps_linearly_to_start() {
        let s = Cosine {
            warmup: 4,
            ..Cosine::new(1e-3, 0.0, 10)
        };
        assert_eq!(s.at(0), 2.5e-4);
        assert_eq!(s.at(3), 1e-3);
        assert_eq!(s.at(4), 1e-3);
    }
}
