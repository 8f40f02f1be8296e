//! The sample order of a dataset, as a pure function of (seed, epoch).
//!
//! The unit of work is a row group of a file. An epoch permutes the units,
//! groups them into windows of `window` units, and permutes the samples
//! inside each window (a bounded shuffle buffer: memory stays at one
//! window). Global step s of an epoch takes samples `[s·B, (s+1)·B)` of that
//! order for a global batch B; rank r of W takes the r-th of W equal
//! slices. So which samples make up a global step never depends on W, and
//! a [`Cursor`] (seed, epoch, offset) is the loader's whole state: resuming
//! from it continues the same sequence, on any number of workers.
//!
//! Last partial batch: an epoch has ⌊N/B⌋ steps; its last N mod B samples
//! in that epoch's order are not used in that epoch (other epochs order the
//! samples differently, so no sample is left out for good).

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Where a loader stands: the next global sample of `epoch` is `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Cursor {
    pub seed: u64,
    pub epoch: u64,
    pub offset: u64,
}

impl Cursor {
    pub fn start(seed: u64) -> Self {
        Self {
            seed,
            epoch: 0,
            offset: 0,
        }
    }
}

/// This process's share of each global batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sharding {
    pub global_batch: usize,
    pub rank: usize,
    pub world: usize,
}

impl Sharding {
    pub fn single(global_batch: usize) -> Self {
        Self {
            global_batch,
            rank: 0,
            world: 1,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.world == 0 || self.rank >= self.world {
            return Err(format!(
                "rank {} is not within a world of {}",
                self.rank, self.world
            ));
        }
        if self.global_batch == 0 || !self.global_batch.is_multiple_of(self.world) {
            return Err(format!(
                "the global batch {} must be a positive multiple of the world size {}",
                self.global_batch, self.world
            ));
        }
        Ok(())
    }

    pub fn local_batch(&self) -> usize {
        self.global_batch / self.world
    }

    /// Global sample offsets this rank takes at the step starting at `offset`.
    pub fn local_range(&self, offset: u64) -> std::ops::Range<u64> {
        let b = self.local_batch() as u64;
        let start = offset + self.rank as u64 * b;
        start..start + b
    }
}

/// A sample's address: the unit (index into the dataset's plan) and its
/// row within the unit.
pub type Address = (usize, usize);

struct Window {
    /// Units of the window, in the epoch's order.
    units: Vec<usize>,
    /// Global offset of the window's first sample.
    start: u64,
    len: u64,
}

/// The order of one epoch.
pub struct EpochOrder {
    seed: u64,
    epoch: u64,
    rows: Vec<usize>,
    windows: Vec<Window>,
}

fn rng(seed: u64, epoch: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    rng.set_stream(stream);
    rng
}

impl EpochOrder {
    /// `rows[u]` is the number of samples in unit `u`.
    pub fn new(rows: &[usize], seed: u64, epoch: u64, window: usize) -> Self {
        let mut units: Vec<usize> = (0..rows.len()).collect();
        units.shuffle(&mut rng(seed, epoch, 0));
        let mut start = 0;
        let windows = units
            .chunks(window.max(1))
            .map(|chunk| {
                let len = chunk.iter().map(|&u| rows[u] as u64).sum();
                let w = Window {
                    units: chunk.to_vec(),
                    start,
                    len,
                };
                start += len;
                w
            })
            .collect();
        Self {
            seed,
            epoch,
            rows: rows.to_vec(),
            windows,
        }
    }

    /// Samples in the epoch.
    pub fn len(&self) -> u64 {
        self.windows.last().map_or(0, |w| w.start + w.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Full global batches in the epoch.
    pub fn steps(&self, global_batch: usize) -> u64 {
        self.len() / global_batch as u64
    }

    /// The window holding global offset `offset`, and its index.
    fn window_of(&self, offset: u64) -> (usize, &Window) {
        let i = self.windows.partition_point(|w| w.start + w.len <= offset);
        (i, &self.windows[i])
    }

    /// The samples of window `i` in shuffled order.
    fn window_order(&self, i: usize) -> Vec<Address> {
        let w = &self.windows[i];
        let mut addresses: Vec<Address> = w
            .units
            .iter()
            .flat_map(|&u| (0..self.rows[u]).map(move |row| (u, row)))
            .collect();
        // Stream 0 ordered the units; window i shuffles with stream i + 1.
        addresses.shuffle(&mut rng(self.seed, self.epoch, i as u64 + 1));
        addresses
    }

    /// Addresses of global samples `range` (within the epoch), in order.
    pub fn addresses(&self, range: std::ops::Range<u64>) -> Vec<Address> {
        let mut out = Vec::with_capacity((range.end - range.start) as usize);
        let mut offset = range.start;
        while offset < range.end.min(self.len()) {
            let (i, w) = self.window_of(offset);
            let order = self.window_order(i);
            let from = (offset - w.start) as usize;
            let to = ((range.end - w.start) as usize).min(order.len());
            out.extend_from_slice(&order[from..to]);
            offset = w.start + to as u64;
        }
        out
    }

    /// Units of every window that samples `range` fall in: what is worth
    /// keeping in memory while reading them.
    pub fn window_units(&self, range: std::ops::Range<u64>) -> Vec<usize> {
        if range.start >= range.end.min(self.len()) {
            return Vec::new();
        }
        let (first, _) = self.window_of(range.start);
        let (last, _) = self.window_of(range.end.min(self.len()) - 1);
        self.windows[first..=last]
            .iter()
            .flat_map(|w| w.units.iter().copied())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const ROWS: &[usize] = &[5, 7, 3, 8, 1, 6, 4];

    #[test]
    fn an_epoch_is_a_permutation_of_all_samples() {
        let order = EpochOrder::new(ROWS, 3, 0, 2);
        assert_eq!(order.len(), 34);
        let all = order.addresses(0..order.len());
        let distinct: HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), 34);
        assert!(all.iter().all(|&(u, r)| r < ROWS[u]));
    }

    #[test]
    fn order_depends_on_seed_and_epoch_only() {
        let a = EpochOrder::new(ROWS, 3, 1, 2).addresses(0..34);
        assert_eq!(a, EpochOrder::new(ROWS, 3, 1, 2).addresses(0..34));
        assert_ne!(a, EpochOrder::new(ROWS, 3, 2, 2).addresses(0..34));
        assert_ne!(a, EpochOrder::new(ROWS, 4, 1, 2).addresses(0..34));
    }

    #[test]
    fn any_range_is_the_slice_of_the_whole_order() {
        let order = EpochOrder::new(ROWS, 9, 0, 3);
        let all = order.addresses(0..34);
        for (a, b) in [(0, 5), (4, 19), (12, 13), (30, 34), (33, 40)] {
            assert_eq!(
                order.addresses(a..b),
                all[a as usize..(b as usize).min(34)],
                "{a}..{b}"
            );
        }
    }

    #[test]
    fn shuffle_is_bounded_to_a_window() {
        // With windows of 2 units, the first 2 units of the epoch's unit
        // order supply exactly the first samples.
        let order = EpochOrder::new(ROWS, 5, 0, 2);
        let first = &order.windows[0];
        let n = first.len as usize;
        let units: HashSet<usize> = order.addresses(0..n as u64).iter().map(|a| a.0).collect();
        assert_eq!(units, first.units.iter().copied().collect());
    }

    #[test]
    fn rank_slices_tile_the_global_batch_at_any_world_size() {
        let order = EpochOrder::new(ROWS, 1, 0, 2);
        for world in [1, 2, 3, 6] {
            let steps: Vec<Vec<Address>> = (0..order.steps(6))
                .map(|s| {
                    (0..world)
                        .flat_map(|rank| {
                            let sh = Sharding {
                                global_batch: 6,
                                rank,
                                world,
                            };
                            order.addresses(sh.local_range(s * 6))
                        })
                        .collect()
                })
                .collect();
            assert_eq!(steps.concat(), order.addresses(0..30), "world {world}");
        }
        assert!(
            Sharding {
                global_batch: 6,
                rank: 0,
                world: 4
            }
            .validate()
            .is_err()
        );
        assert!(
            Sharding {
                global_batch: 6,
                rank: 3,
                world: 3
            }
            .validate()
            .is_err()
        );
    }
}
