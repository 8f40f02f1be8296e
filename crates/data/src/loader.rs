//! A background loader of training batches.
//!
//! A thread reads row groups in a seeded, per-epoch random order, shuffles
//! the samples of a window of row groups together, decodes them on a thread
//! pool and queues ready batches (bounded, so memory stays flat). Bad
//! samples are skipped, counted per reason and logged with their file, row
//! group and key; past `max_bad_fraction` the loader stops with an error.
//! Epochs run back to back; a batch may straddle an epoch boundary.

use crate::columns::ColumnConfig;
use crate::image_ops::Preprocess;
use crate::parquet_source::{self, RawSample, Unit};
use crate::{DataError, Result};
use crossbeam_channel::{Receiver, Sender, bounded};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub seed: u64,
    /// Row groups whose samples are shuffled together.
    pub shuffle_window: usize,
    /// Decoded batches queued ahead of the training loop.
    pub prefetch_batches: usize,
    pub decode_threads: usize,
    /// Share of bad samples (0..1) above which loading stops.
    pub max_bad_fraction: f64,
    pub preprocess: Preprocess,
    pub columns: ColumnConfig,
}

/// A batch of decoded images, `(N, 3, size, size)` row-major in `pixels`.
#[derive(Clone, Debug)]
pub struct Batch {
    pub epoch: u64,
    pub keys: Vec<String>,
    pub captions: Vec<String>,
    pub pixels: Vec<f32>,
    pub size: u32,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Samples seen and skipped, by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoaderStats {
    pub seen: u64,
    pub null_image: u64,
    pub empty_caption: u64,
    pub undecodable: u64,
}

impl LoaderStats {
    pub fn skipped(&self) -> u64 {
        self.null_image + self.empty_caption + self.undecodable
    }
}

/// Below this many samples the bad-sample share is too noisy to act on.
const MIN_SAMPLES_FOR_BAD_SHARE: u64 = 64;

pub struct ImageLoader {
    batches: Receiver<Result<Batch>>,
    stats: Arc<Mutex<LoaderStats>>,
    units: usize,
}

impl ImageLoader {
    /// Plans the dataset at `location` (a Parquet file or a directory of
    /// them) and starts loading. Errors in the plan (no files, a file that
    /// is not Parquet, missing columns) are reported here, before training.
    pub fn start(location: &std::path::Path, config: LoaderConfig) -> Result<Self> {
        if config.batch_size == 0 {
            return Err(DataError::Config("batch_size must be positive".into()));
        }
        let files: Vec<PathBuf> = parquet_source::list_files(location)?;
        let units = parquet_source::plan_units(&files, &config.columns)?;
        if units.iter().all(|u| u.rows == 0) {
            return Err(DataError::EmptyDataset(location.to_path_buf()));
        }
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
            units,
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
        })
    }

    pub fn stats(&self) -> LoaderStats {
        self.stats.lock().expect("stats lock").clone()
    }

    /// Row groups in the dataset.
    pub fn units(&self) -> usize {
        self.units
    }
}

impl Iterator for ImageLoader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.batches.recv().ok()
    }
}

struct Worker {
    config: LoaderConfig,
    units: Vec<Unit>,
    stats: Arc<Mutex<LoaderStats>>,
    pool: rayon::ThreadPool,
    tx: Sender<Result<Batch>>,
}

/// A sample that survived decoding.
struct Decoded {
    key: String,
    caption: String,
    pixels: Vec<f32>,
}

impl Worker {
    fn run(self) {
        if let Err(e) = self.produce() {
            let _ = self.tx.send(Err(e));
        }
    }

    /// Fills the queue until the receiver goes away.
    fn produce(&self) -> Result<()> {
        let mut pending: Vec<Decoded> = Vec::new();
        let mut batch_epoch = 0;
        for epoch in 0u64.. {
            let mut rng = ChaCha8Rng::seed_from_u64(
                self.config.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            let mut order: Vec<&Unit> = self.units.iter().collect();
            order.shuffle(&mut rng);
            for window in order.chunks(self.config.shuffle_window.max(1)) {
                let mut raw = Vec::new();
                for unit in window {
                    raw.extend(
                        parquet_source::read_unit(unit, &self.config.columns)?
                            .into_iter()
                            .map(|s| (s, (*unit).clone())),
                    );
                }
                raw.shuffle(&mut rng);
                let crop_seeds: Vec<u64> =
                    raw.iter().map(|_| rand::Rng::random(&mut rng)).collect();
                let decoded: Vec<Option<Decoded>> = self.pool.install(|| {
                    raw.into_par_iter()
                        .zip(crop_seeds)
                        .map(|((sample, unit), seed)| self.decode(sample, &unit, seed))
                        .collect()
                });
                self.check_bad_share()?;
                for sample in decoded.into_iter().flatten() {
                    if pending.is_empty() {
                        batch_epoch = epoch;
                    }
                    pending.push(sample);
                    if pending.len() == self.config.batch_size {
                        let batch = self.assemble(batch_epoch, std::mem::take(&mut pending));
                        if self.tx.send(Ok(batch)).is_err() {
                            return Ok(()); // the training loop is done
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn decode(&self, sample: RawSample, unit: &Unit, crop_seed: u64) -> Option<Decoded> {
        let skip = |reason: &str, detail: &dyn std::fmt::Display| {
            tracing::warn!(
                file = %unit.file.display(),
                row_group = unit.row_group,
                key = %sample.key,
                "skipping sample: {reason}: {detail}"
            );
        };
        let count = |f: fn(&mut LoaderStats)| f(&mut self.stats.lock().expect("stats lock"));
        count(|s| s.seen += 1);
        let Some(image) = sample.image.as_deref() else {
            skip("null image", &"");
            count(|s| s.null_image += 1);
            return None;
        };
        let caption = match sample.caption.as_deref().map(str::trim) {
            Some(c) if !c.is_empty() => c.to_string(),
            _ => {
                skip("empty or null caption", &"");
                count(|s| s.empty_caption += 1);
                return None;
            }
        };
        let mut pixels = Vec::new();
        if let Err(e) = self
            .config
            .preprocess
            .apply(image, &sample.key, crop_seed, &mut pixels)
        {
            skip("undecodable image", &e);
            count(|s| s.undecodable += 1);
            return None;
        }
        Some(Decoded {
            key: sample.key,
            caption,
            pixels,
        })
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

    fn assemble(&self, epoch: u64, samples: Vec<Decoded>) -> Batch {
        let mut batch = Batch {
            epoch,
            keys: Vec::with_capacity(samples.len()),
            captions: Vec::with_capacity(samples.len()),
            pixels: Vec::with_capacity(samples.iter().map(|s| s.pixels.len()).sum()),
            size: self.config.preprocess.size,
        };
        for s in samples {
            batch.keys.push(s.key);
            batch.captions.push(s.caption);
            batch.pixels.extend_from_slice(&s.pixels);
        }
        batch
    }
}
