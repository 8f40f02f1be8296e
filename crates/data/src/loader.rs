//! A background loader of training batches in the order of [`crate::order`],
//! for both kinds of dataset: encoded images (stage 1, the dVAE) and
//! pre-tokenized token grids (stage 2, the transformer; see
//! [`crate::tokens`]). [`ImageLoader::payload`] says which one a dataset
//! holds, so a trainer can refuse the wrong kind before its first step.
//!
//! A thread walks the global order from a [`Cursor`], takes this rank's
//! slice of each global batch, reads the row groups those samples live in
//! (keeping the current window's row groups cached), decodes the samples on
//! a thread pool (token grids pass through as stored) and queues ready
//! batches (bounded, so memory stays flat). Each batch carries the cursor
//! after it: saving that cursor with the model and starting a loader from it
//! resumes exactly, on any world size. The order, cursor and resume rules
//! are the same for both kinds.
//!
//! Bad samples (a null payload, an empty caption, an undecodable image) are
//! skipped, counted per reason and logged with their file, row group and
//! key; the batch is then smaller by that many samples (the same on every
//! run, so ledgers stay reproducible). Past `max_bad_fraction` the loader
//! stops with an error.
//!
//! Samples the validation split holds out ([`crate::split`]) keep their
//! place in the order but are never decoded nor yielded: a batch is
//! smaller by them too. They are not bad samples: they are counted
//! apart (`held_out`) and do not count toward `max_bad_fraction`.

use crate::columns::{ColumnConfig, Payload};
use crate::image_ops::Preprocess;
use crate::order::{Cursor, EpochOrder, Sharding};
use crate::parquet_source::{self, RawSample, SampleData, Unit};
use crate::split::Holdout;
use crate::{DataError, Result};
use crossbeam_channel::{Receiver, Sender, bounded};
use dalle_store::Location;
use futures::{StreamExt, TryStreamExt};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug)]
pub struct LoaderConfig {
    /// Global batch and this process's share of it.
    pub sharding: Sharding,
    /// Row groups whose samples are shuffled together.
    pub shuffle_window: usize,
    /// Decoded batches queued ahead of the training loop.
    pub prefetch_batches: usize,
    pub decode_threads: usize,
    /// Bytes of row groups read at once from storage (bounded read-ahead).
    pub read_ahead_bytes: u64,
    /// Share of bad samples (0..1) above which loading stops.
    pub max_bad_fraction: f64,
    /// How images are decoded (unused for token datasets).
    pub preprocess: Preprocess,
    pub columns: ColumnConfig,
    /// Samples held out of training for validation (never yielded).
    pub holdout: Holdout,
}

/// A batch of samples: decoded images in `pixels` for an image dataset,
/// token grids in `tokens` for a pre-tokenized one (the other is empty).
#[derive(Clone, Debug)]
pub struct Batch {
    pub epoch: u64,
    /// Where the loader stands after this batch.
    pub cursor: Cursor,
    pub keys: Vec<String>,
    pub captions: Vec<String>,
    /// Images, `(N, 3, size, size)` row-major bytes (0..=255; scaled to
    /// [0, 1] on the device); empty for tokens.
    pub pixels: Vec<u8>,
    /// Side of the images in `pixels`; 0 for token batches.
    pub size: u32,
    /// Token grids, `(N, token_len)` row-major; empty for images.
    pub tokens: Vec<u16>,
    /// Tokens per sample; 0 for image batches.
    pub token_len: usize,
    /// This batch's share of the samples read and skipped.
    pub skipped: LoaderStats,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// What the batch holds: images (decoded into `pixels`) or token grids.
    pub fn payload(&self) -> Payload {
        match self.token_len {
            0 => Payload::EncodedImage,
            len => Payload::Tokens { len },
        }
    }

    /// The token grid of sample `i` (empty for an image batch).
    pub fn sample_tokens(&self, i: usize) -> &[u16] {
        &self.tokens[i * self.token_len..(i + 1) * self.token_len]
    }
}

/// Samples seen and skipped, by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoaderStats {
    /// Samples read for training (bad ones included, held-out ones not).
    pub seen: u64,
    /// Null payloads (image or token grid).
    pub null_image: u64,
    pub empty_caption: u64,
    pub undecodable: u64,
    /// Samples the validation split holds out, passed over undecoded.
    pub held_out: u64,
}

impl LoaderStats {
    /// Bad samples skipped (held-out ones are not bad).
    pub fn skipped(&self) -> u64 {
        self.null_image + self.empty_caption + self.undecodable
    }

    pub fn add(&mut self, other: &Self) {
        self.seen += other.seen;
        self.null_image += other.null_image;
        self.empty_caption += other.empty_caption;
        self.undecodable += other.undecodable;
        self.held_out += other.held_out;
    }

    /// Counts one bad sample skipped for `reason`.
    pub fn count(&mut self, reason: Skip) {
        match reason {
            Skip::NullImage => self.null_image += 1,
            Skip::EmptyCaption => self.empty_caption += 1,
            Skip::Undecodable => self.undecodable += 1,
        }
    }
}

/// Why a sample was skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// A null payload (image or token grid).
    NullImage,
    EmptyCaption,
    Undecodable,
}

/// Below this many samples the bad-sample share is too noisy to act on.
const MIN_SAMPLES_FOR_BAD_SHARE: u64 = 64;

/// The batch loader of image and token datasets alike.
pub struct ImageLoader {
    batches: Receiver<Result<Batch>>,
    stats: Arc<Mutex<LoaderStats>>,
    units: usize,
    payload: Payload,
}

impl ImageLoader {
    /// Plans the dataset at `location` (a Parquet file, or every Parquet
    /// file under a prefix or matching a glob) and starts loading. Errors in
    /// the plan (nothing there, unreachable store, a file that is not
    /// Parquet, missing columns, files holding different payloads) are
    /// reported here, before training.
    /// Loading begins at `cursor` (use [`Cursor::start`] for a new run).
    pub fn start(location: &Location, config: LoaderConfig, cursor: Cursor) -> Result<Self> {
        config.sharding.validate().map_err(DataError::Config)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(DataError::io("loader runtime"))?;
        let units = runtime.block_on(parquet_source::plan_units(location, &config.columns))?;
        let samples: usize = units.iter().map(|u| u.rows).sum();
        if samples == 0 {
            return Err(DataError::EmptyDataset(location.url.clone()));
        }
        if samples < config.sharding.global_batch {
            return Err(DataError::Config(format!(
                "{} holds {samples} samples, fewer than one global batch of {}",
                location.url, config.sharding.global_batch
            )));
        }
        let payload = units[0].file.payload();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.decode_threads.max(1))
            .thread_name(|i| format!("decode-{i}"))
            .build()
            .map_err(|e| DataError::Config(format!("decode thread pool: {e}")))?;
        let (tx, rx) = bounded(config.prefetch_batches.max(1));
        let stats = Arc::new(Mutex::new(LoaderStats::default()));
        let n_units = units.len();
        let worker = Worker {
            config,
            cursor,
            runtime,
            units,
            payload,
            stats: stats.clone(),
            pool,
            tx,
        };
        std::thread::Builder::new()
            .name("loader".into())
            .spawn(move || worker.run())
            .map_err(DataError::io("loader thread"))?;
        Ok(Self {
            batches: rx,
            stats,
            units: n_units,
            payload,
        })
    }

    pub fn stats(&self) -> LoaderStats {
        self.stats.lock().expect("stats lock").clone()
    }

    /// Row groups in the dataset.
    pub fn units(&self) -> usize {
        self.units
    }

    /// What the dataset's samples hold (the same in every file): encoded
    /// images, which batches carry decoded in `pixels`, or token grids,
    /// which they carry in `tokens`.
    pub fn payload(&self) -> Payload {
        self.payload
    }
}

impl Iterator for ImageLoader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.batches.recv().ok()
    }
}

/// The random crop of a sample depends on where it is read, never on the
/// world size or on what was read before.
fn crop_seed(cursor: Cursor, unit: usize, row: usize) -> u64 {
    let mix = |h: u64, v: u64| (h ^ v).wrapping_mul(0x100_0000_01B3).rotate_left(29);
    [cursor.epoch, unit as u64, row as u64]
        .into_iter()
        .fold(cursor.seed ^ 0xCBF2_9CE4_8422_2325, mix)
}

struct Worker {
    config: LoaderConfig,
    cursor: Cursor,
    /// Drives the object-store reads of this thread.
    runtime: tokio::runtime::Runtime,
    units: Vec<Unit>,
    payload: Payload,
    stats: Arc<Mutex<LoaderStats>>,
    pool: rayon::ThreadPool,
    tx: Sender<Result<Batch>>,
}

/// A sample that survived decoding: an image as CHW bytes in `pixels`, or
/// a token grid in `tokens` (the other is empty).
pub struct Decoded {
    pub key: String,
    pub caption: String,
    pub pixels: Vec<u8>,
    pub tokens: Vec<u16>,
}

/// Decodes one sample, or says why it is skipped (and logs it with its
/// file, row group and key). Shared by training and pre-tokenization, so
/// both skip exactly the same samples. Token grids pass through unchanged
/// (`preprocess` and `crop_seed` apply to images only), under the same
/// null and empty-caption rules.
pub fn decode_sample(
    sample: &RawSample,
    unit: &Unit,
    preprocess: &Preprocess,
    crop_seed: u64,
) -> Result<Decoded, Skip> {
    let skip = |reason: Skip, detail: &dyn std::fmt::Display| {
        tracing::warn!(
            file = %unit.file.url,
            row_group = unit.row_group,
            key = %sample.key,
            "skipping sample: {reason:?}{detail}"
        );
        reason
    };
    let Some(data) = &sample.data else {
        return Err(skip(Skip::NullImage, &""));
    };
    let caption = match sample.caption.as_deref().map(str::trim) {
        Some(c) if !c.is_empty() => c.to_string(),
        _ => return Err(skip(Skip::EmptyCaption, &"")),
    };
    let (mut pixels, mut tokens) = (Vec::new(), Vec::new());
    match data {
        SampleData::Encoded(image) => {
            if let Err(e) = preprocess.apply(image, &sample.key, crop_seed, &mut pixels) {
                return Err(skip(Skip::Undecodable, &format_args!(": {e}")));
            }
        }
        SampleData::Tokens(grid) => tokens.clone_from(grid),
    }
    Ok(Decoded {
        key: sample.key.clone(),
        caption,
        pixels,
        tokens,
    })
}

impl Worker {
    fn run(self) {
        if let Err(e) = self.produce() {
            let _ = self.tx.send(Err(e));
        }
    }

    /// Fills the queue until the receiver goes away.
    fn produce(&self) -> Result<()> {
        let rows: Vec<usize> = self.units.iter().map(|u| u.rows).collect();
        let sharding = self.config.sharding;
        let global = sharding.global_batch as u64;
        let mut cursor = self.cursor;
        let mut order =
            EpochOrder::new(&rows, cursor.seed, cursor.epoch, self.config.shuffle_window);
        // Row groups read so far in this window, by unit index.
        let mut cache: HashMap<usize, Arc<Vec<RawSample>>> = HashMap::new();
        loop {
            if cursor.offset + global > order.len() {
                // Drop-last: the epoch's remaining partial batch is not used.
                cursor.epoch += 1;
                cursor.offset = 0;
                order =
                    EpochOrder::new(&rows, cursor.seed, cursor.epoch, self.config.shuffle_window);
                cache.clear();
            }
            let range = sharding.local_range(cursor.offset);
            let addresses = order.addresses(range.clone());
            let mut needed: Vec<usize> = addresses.iter().map(|&(unit, _)| unit).collect();
            needed.sort_unstable();
            needed.dedup();
            let keep = order.window_units(range);
            cache.retain(|unit, _| keep.contains(unit));
            let missing: Vec<usize> = needed
                .into_iter()
                .filter(|u| !cache.contains_key(u))
                .collect();
            for (unit, samples) in missing.iter().zip(self.read_units(&missing)?) {
                cache.insert(*unit, Arc::new(samples));
            }
            let mut counts = LoaderStats::default();
            let mut picked: Vec<(RawSample, &Unit, u64)> = addresses
                .iter()
                .map(|&(unit, row)| {
                    let sample =
                        cache[&unit]
                            .get(row)
                            .cloned()
                            .ok_or_else(|| DataError::Parquet {
                                file: self.units[unit].file.url.clone(),
                                reason: format!(
                                    "row group {} has fewer rows than its metadata says",
                                    self.units[unit].row_group
                                ),
                            })?;
                    Ok((sample, &self.units[unit], crop_seed(cursor, unit, row)))
                })
                .collect::<Result<_>>()?;
            let holdout = self.config.holdout;
            picked.retain(|(sample, _, _)| !holdout.holds_out(&sample.key));
            counts.held_out = addresses.len() as u64 - picked.len() as u64;
            let decoded: Vec<Result<Decoded, Skip>> = self.pool.install(|| {
                picked
                    .into_par_iter()
                    .map(|(sample, unit, seed)| {
                        decode_sample(&sample, unit, &self.config.preprocess, seed)
                    })
                    .collect()
            });
            let mut good = Vec::with_capacity(decoded.len());
            for d in decoded {
                counts.seen += 1;
                match d {
                    Ok(sample) => good.push(sample),
                    Err(reason) => counts.count(reason),
                }
            }
            self.stats.lock().expect("stats lock").add(&counts);
            self.check_bad_share()?;
            let epoch = cursor.epoch;
            cursor.offset += global;
            let mut batch = self.assemble(epoch, cursor, good);
            batch.skipped = counts;
            if self.tx.send(Ok(batch)).is_err() {
                return Ok(()); // the training loop is done
            }
        }
    }

    /// Reads row groups concurrently, as many at a time as fit in the
    /// read-ahead budget (at least one).
    fn read_units(&self, units: &[usize]) -> Result<Vec<Vec<RawSample>>> {
        let largest = units
            .iter()
            .map(|&u| self.units[u].bytes)
            .max()
            .unwrap_or(1)
            .max(1);
        let concurrency = (self.config.read_ahead_bytes / largest).clamp(1, 64) as usize;
        self.runtime.block_on(
            futures::stream::iter(
                units
                    .iter()
                    .map(|&u| parquet_source::read_unit(&self.units[u])),
            )
            .buffered(concurrency)
            .try_collect(),
        )
    }

    fn check_bad_share(&self) -> Result<()> {
        let stats = self.stats.lock().expect("stats lock").clone();
        let share = stats.skipped() as f64 / stats.seen.max(1) as f64;
        if stats.seen >= MIN_SAMPLES_FOR_BAD_SHARE && share > self.config.max_bad_fraction {
            return Err(DataError::TooManyBadSamples {
                bad: stats.skipped(),
                seen: stats.seen,
                share: 100.0 * share,
                limit: 100.0 * self.config.max_bad_fraction,
            });
        }
        Ok(())
    }

    fn assemble(&self, epoch: u64, cursor: Cursor, samples: Vec<Decoded>) -> Batch {
        let (size, token_len) = match self.payload {
            Payload::EncodedImage => (self.config.preprocess.size, 0),
            Payload::Tokens { len } => (0, len),
        };
        let mut batch = Batch {
            epoch,
            cursor,
            keys: Vec::with_capacity(samples.len()),
            captions: Vec::with_capacity(samples.len()),
            pixels: Vec::with_capacity(samples.iter().map(|s| s.pixels.len()).sum()),
            size,
            tokens: Vec::with_capacity(samples.len() * token_len),
            token_len,
            skipped: LoaderStats::default(),
        };
        for s in samples {
            batch.keys.push(s.key);
            batch.captions.push(s.caption);
            batch.pixels.extend_from_slice(&s.pixels);
            batch.tokens.extend_from_slice(&s.tokens);
        }
        batch
    }
}
