//! The validation set: `[data.validation]` in the job config, and the reader
//! of the samples a stage evaluates on.
//!
//! The set is either the first `max_samples` samples that the
//! [`Holdout`](crate::split::Holdout) split holds out of the training data,
//! or the first `max_samples` samples of a dataset of its own (`url`), in
//! the dataset's file order (files by key, row groups and rows in order),
//! never shuffled: the same samples on every run, whatever the seed or the
//! world size. Finding them reads only the key and caption columns of as
//! many row groups as it takes; the payloads are then read for this rank's
//! slice alone.
//!
//! Rank r of W takes samples `[n·r/W, n·(r+1)/W)` of the n in the set; a
//! trainer averages its figures over ranks by sample count, so they do not
//! depend on W. Bad samples (null payload, empty caption, undecodable
//! image) are skipped with the loader's rules and logged; the set is then
//! smaller by that many, on any W.

use crate::columns::{ColumnConfig, Payload};
use crate::image_ops::Preprocess;
use crate::loader::{Batch, Decoded, LoaderStats, Skip, decode_sample};
use crate::order::Cursor;
use crate::parquet_source::{self, RawSample, Unit};
use crate::split::Holdout;
use crate::{DataError, Result};
use dalle_store::Location;
use futures::{StreamExt, TryStreamExt};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Row groups whose keys are read at once while looking for the set.
const KEY_READ_CONCURRENCY: usize = 4;

/// `[data.validation]`: what the stages evaluate on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationConfig {
    /// Share of samples held out of training by the hash of their key,
    /// within `[0, 1)`; 0 holds out none.
    pub fraction: f64,
    /// A dataset of its own to evaluate on (image or pre-tokenized
    /// Parquet, any store URL); then nothing is held out of training.
    pub url: Option<String>,
    /// Samples in the validation set (the first ones, in file order).
    pub max_samples: usize,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            fraction: 0.0,
            url: None,
            max_samples: 512,
        }
    }
}

impl ValidationConfig {
    /// Checks the section; messages name the key at fault.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(0.0..1.0).contains(&self.fraction) {
            return Err(format!(
                "data.validation.fraction must be within [0, 1), got {}",
                self.fraction
            ));
        }
        match &self.url {
            Some(url) if url.trim().is_empty() => {
                return Err("data.validation.url is empty: name a dataset or leave it out".into());
            }
            Some(url) if self.fraction > 0.0 => {
                return Err(format!(
                    "data.validation: set either fraction ({}) or url ({url}), not both",
                    self.fraction
                ));
            }
            _ => {}
        }
        if self.is_configured() && self.max_samples == 0 {
            return Err("data.validation.max_samples must be positive".into());
        }
        Ok(())
    }

    /// Whether the stages have a validation set to evaluate on.
    pub fn is_configured(&self) -> bool {
        self.fraction > 0.0 || self.url.is_some()
    }

    /// What training loaders leave out.
    pub fn holdout(&self) -> Holdout {
        match &self.url {
            Some(_) => Holdout::none(),
            None => Holdout::fraction(self.fraction).unwrap_or_default(),
        }
    }
}

/// Which samples of a dataset make up a validation set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    /// Those `Holdout` holds out of training.
    HeldOut(Holdout),
    /// Every sample (a validation dataset of its own).
    All,
}

impl Selection {
    fn takes(&self, key: &str) -> bool {
        match self {
            Selection::HeldOut(split) => split.holds_out(key),
            Selection::All => true,
        }
    }
}

/// How to read a validation set.
#[derive(Clone, Debug)]
pub struct ValidationRead {
    pub selection: Selection,
    pub max_samples: usize,
    /// This process's slice: `(rank, world)`.
    pub slice: (usize, usize),
    /// How images are decoded (a centre crop keeps the set fixed).
    pub preprocess: Preprocess,
    pub columns: ColumnConfig,
    pub decode_threads: usize,
}

/// This rank's slice of a validation set, decoded once and kept in memory:
/// images as bytes (a quarter of the loader's floats), token grids as
/// stored.
#[derive(Clone, Debug)]
pub struct ValidationSet {
    /// Samples in the whole set (every rank's slice), bad ones included.
    pub total: usize,
    /// The set's first sample that is in this slice.
    pub first: usize,
    pub payload: Payload,
    pub keys: Vec<String>,
    pub captions: Vec<String>,
    /// Images, `(N, 3, size, size)` row-major, 0..=255; empty for tokens.
    pub pixels: Vec<u8>,
    /// Side of the images; 0 for token grids.
    pub size: u32,
    /// Token grids, `(N, token_len)` row-major; empty for images.
    pub tokens: Vec<u16>,
    pub token_len: usize,
    /// This slice's bad samples, by reason (none are held out here).
    pub skipped: LoaderStats,
}

impl ValidationSet {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Samples `range` of this slice as a loader batch, so trainers feed
    /// them as they feed training batches.
    /// Its epoch and cursor mean nothing.
    pub fn batch(&self, range: std::ops::Range<usize>) -> Batch {
        let image = 3 * (self.size as usize).pow(2);
        Batch {
            epoch: 0,
            cursor: Cursor::start(0),
            keys: self.keys[range.clone()].to_vec(),
            captions: self.captions[range.clone()].to_vec(),
            pixels: self.pixels[range.start * image..range.end * image].to_vec(),
            size: self.size,
            tokens: self.tokens[range.start * self.token_len..range.end * self.token_len].to_vec(),
            token_len: self.token_len,
            skipped: LoaderStats::default(),
        }
    }
}

/// Reads this rank's slice of the validation set of the dataset at
/// `location`. Errors name the dataset; a selection that finds no sample
/// at all is an error (a split too small for the dataset).
pub fn read(location: &Location, request: &ValidationRead) -> Result<ValidationSet> {
    let (rank, world) = request.slice;
    if world == 0 || rank >= world {
        return Err(DataError::Config(format!(
            "rank {rank} is not within a world of {world}"
        )));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DataError::io("validation reader runtime"))?;
    let units = runtime.block_on(parquet_source::plan_units(location, &request.columns))?;
    let payload = units[0].file.payload();
    let addresses = runtime.block_on(find(&units, request))?;
    let total = addresses.len();
    if total == 0 {
        let what = match request.selection {
            Selection::HeldOut(_) => "no sample is held out (raise data.validation.fraction)",
            Selection::All => "no sample",
        };
        return Err(DataError::Config(format!(
            "validation set of {}: {what}",
            location.url
        )));
    }
    let first = total * rank / world;
    let mine = &addresses[first..total * (rank + 1) / world];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(request.decode_threads.max(1))
        .thread_name(|i| format!("validation-decode-{i}"))
        .build()
        .map_err(|e| DataError::Config(format!("decode thread pool: {e}")))?;
    let samples = runtime.block_on(read_rows(&units, mine))?;
    let decoded: Vec<std::result::Result<Decoded, Skip>> = pool.install(|| {
        samples
            .par_iter()
            .map(|(unit, sample)| decode_sample(sample, &units[*unit], &request.preprocess, 0))
            .collect()
    });
    let (size, token_len) = match payload {
        Payload::EncodedImage => (request.preprocess.size, 0),
        Payload::Tokens { len } => (0, len),
    };
    let mut set = ValidationSet {
        total,
        first,
        payload,
        keys: Vec::with_capacity(decoded.len()),
        captions: Vec::with_capacity(decoded.len()),
        pixels: Vec::new(),
        size,
        tokens: Vec::new(),
        token_len,
        skipped: LoaderStats::default(),
    };
    for d in decoded {
        set.skipped.seen += 1;
        match d {
            Ok(sample) => {
                set.keys.push(sample.key);
                set.captions.push(sample.caption);
                set.pixels.extend_from_slice(&sample.pixels);
                set.tokens.extend_from_slice(&sample.tokens);
            }
            Err(reason) => set.skipped.count(reason),
        }
    }
    Ok(set)
}

/// Addresses `(unit, row)` of the set's samples, in file order: the keys of
/// row groups are read, a few at a time, until `max_samples` are found.
async fn find(units: &[Unit], request: &ValidationRead) -> Result<Vec<(usize, usize)>> {
    let mut keys = futures::stream::iter(units.iter().enumerate())
        .map(|(i, unit)| async move {
            Ok::<_, DataError>((i, parquet_source::read_captions(unit).await?))
        })
        .buffered(KEY_READ_CONCURRENCY);
    let mut found = Vec::with_capacity(request.max_samples);
    while let Some((unit, rows)) = keys.try_next().await? {
        for (row, (key, _)) in rows.iter().enumerate() {
            if request.selection.takes(key) {
                found.push((unit, row));
                if found.len() == request.max_samples {
                    return Ok(found);
                }
            }
        }
    }
    Ok(found)
}

/// The samples at `addresses`, in their order, with their unit's index:
/// each row group read once, only for the rows wanted.
async fn read_rows(
    units: &[Unit],
    addresses: &[(usize, usize)],
) -> Result<Vec<(usize, RawSample)>> {
    let mut wanted: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &(unit, row) in addresses {
        wanted.entry(unit).or_default().push(row);
    }
    let read: Vec<(usize, Vec<RawSample>)> = futures::stream::iter(wanted.keys().copied())
        .map(
            |u| async move { Ok::<_, DataError>((u, parquet_source::read_unit(&units[u]).await?)) },
        )
        .buffered(KEY_READ_CONCURRENCY)
        .try_collect()
        .await?;
    let read: BTreeMap<usize, Vec<RawSample>> = read.into_iter().collect();
    addresses
        .iter()
        .map(|&(unit, row)| {
            let sample = read[&unit]
                .get(row)
                .cloned()
                .ok_or_else(|| DataError::Parquet {
                    file: units[unit].file.url.clone(),
                    reason: format!(
                        "row group {} has fewer rows than its keys",
                        units[unit].row_group
                    ),
                })?;
            Ok((unit, sample))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_is_checked_naming_its_keys() {
        let ok = ValidationConfig::default();
        assert!(ok.validate().is_ok() && !ok.is_configured());
        assert!(!ok.holdout().is_active());
        let held = ValidationConfig {
            fraction: 0.1,
            ..ok.clone()
        };
        assert!(held.validate().is_ok() && held.is_configured() && held.holdout().is_active());
        let own = ValidationConfig {
            url: Some("s3://b/val".into()),
            ..ok.clone()
        };
        assert!(own.validate().is_ok() && own.is_configured() && !own.holdout().is_active());
        for (bad, names) in [
            (
                ValidationConfig {
                    fraction: 1.0,
                    ..ok.clone()
                },
                "data.validation.fraction",
            ),
            (
                ValidationConfig {
                    fraction: -0.5,
                    ..ok.clone()
                },
                "data.validation.fraction",
            ),
            (
                ValidationConfig {
                    fraction: 0.1,
                    ..own.clone()
                },
                "not both",
            ),
            (
                ValidationConfig {
                    max_samples: 0,
                    ..held.clone()
                },
                "data.validation.max_samples",
            ),
            (
                ValidationConfig {
                    url: Some(" ".into()),
                    ..ok.clone()
                },
                "data.validation.url",
            ),
        ] {
            let err = bad.validate().unwrap_err();
            assert!(err.contains(names), "{bad:?}: {err}");
        }
    }
}
