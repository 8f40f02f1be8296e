//! The validation split: which samples are held out of training, decided
//! by a hash of the sample's key alone.
//!
//! A sample is held out iff `key_hash(key) < ⌊fraction · 2^64⌋`, i.e. iff
//! its hash read as a fraction of 2^64 is below `fraction`. The decision
//! depends on nothing but the key: not on the seed, the epoch, the world
//! size, the rank, or how the samples are laid out in files and row groups
//! (as long as the dataset has a key column; without one, samples are keyed
//! by file, row group and row, and the split then follows that layout).
//! A pre-tokenized dataset carries the image dataset's keys, so both stages
//! hold out the same samples.
//!
//! The hash is written out here rather than taken from std, whose
//! `DefaultHasher` may change between Rust releases: a dataset's split must
//! stay the same across builds, or a later run would train on what an
//! earlier one held out.

/// FNV-1a, 64 bits: offset basis 0xcbf29ce484222325, prime 0x100000001b3,
/// xor then multiply per byte.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// MurmurHash3's 64-bit finalizer (`fmix64`). FNV-1a alone leaves its top
/// bits nearly the same for keys that differ only in their last bytes
/// (sequential ids such as `000000123`), so thresholding it would hold out
/// runs of neighbouring keys and miss the fraction badly; this mix makes
/// every output bit depend on every input bit.
pub fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The split's hash of a key: `fmix64(fnv1a64(UTF-8 bytes of key))`.
pub fn key_hash(key: &str) -> u64 {
    fmix64(fnv1a64(key.as_bytes()))
}

/// Holds out a fraction of samples by key hash (none by default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Holdout {
    /// Hashes below this are held out; 0 holds out nothing.
    threshold: u64,
}

impl Holdout {
    /// Nothing held out.
    pub fn none() -> Self {
        Self::default()
    }

    /// Holds out the share `fraction` (within `[0, 1)`) of keys.
    pub fn fraction(fraction: f64) -> Result<Self, String> {
        if !(0.0..1.0).contains(&fraction) {
            return Err(format!(
                "the held-out fraction {fraction} is not within [0, 1)"
            ));
        }
        // f64 → u64 saturates; below 1 the product stays below 2^64.
        let threshold = (fraction * 18_446_744_073_709_551_616.0) as u64;
        Ok(Self { threshold })
    }

    /// Whether any sample is held out.
    pub fn is_active(&self) -> bool {
        self.threshold > 0
    }

    /// Whether the sample keyed `key` is held out of training.
    pub fn holds_out(&self, key: &str) -> bool {
        key_hash(key) < self.threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_the_documented_one() {
        // FNV-1a's published test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        // Pinned: a change here changes every dataset's split.
        assert_eq!(key_hash("foobar"), 0x2c22_1949_22d1_672b);
        assert_eq!(key_hash("000000042"), 0xd95c_d74b_a0de_01dd);
    }

    #[test]
    fn the_share_held_out_is_close_to_the_fraction_on_sequential_keys() {
        let keys: Vec<String> = (0..20_000).map(|i| format!("{i:09}")).collect();
        for fraction in [0.01, 0.1, 0.3] {
            let split = Holdout::fraction(fraction).unwrap();
            let share =
                keys.iter().filter(|k| split.holds_out(k)).count() as f64 / keys.len() as f64;
            // Five binomial standard deviations.
            let tolerance = 5.0 * (fraction * (1.0 - fraction) / keys.len() as f64).sqrt();
            assert!(
                (share - fraction).abs() < tolerance,
                "held out {share} of sequential keys for a fraction of {fraction}"
            );
            // Not in runs: every stretch of 1000 neighbours gets its share.
            for chunk in keys.chunks(1000) {
                let local = chunk.iter().filter(|k| split.holds_out(k)).count() as f64 / 1000.0;
                let tolerance = 6.0 * (fraction * (1.0 - fraction) / 1000.0).sqrt();
                assert!(
                    (local - fraction).abs() < tolerance,
                    "{local} of keys {}..{} held out for {fraction}",
                    chunk[0],
                    chunk[999]
                );
            }
        }
    }

    #[test]
    fn larger_fractions_hold_out_supersets_and_bad_ones_are_refused() {
        let small = Holdout::fraction(0.05).unwrap();
        let large = Holdout::fraction(0.2).unwrap();
        let keys = (0..5000).map(|i| format!("k{i}"));
        assert!(
            keys.filter(|k| small.holds_out(k))
                .all(|k| large.holds_out(&k))
        );
        assert!(!Holdout::none().is_active() && !Holdout::fraction(0.0).unwrap().is_active());
        assert!(!Holdout::none().holds_out("anything"));
        for bad in [1.0, -0.1, f64::NAN, 2.0] {
            assert!(Holdout::fraction(bad).is_err(), "{bad}");
        }
    }
}
