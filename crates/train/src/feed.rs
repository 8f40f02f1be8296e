//! What both training loops need from the data pipeline: the loader
//! settings of a job, batches as tensors, skipping batches whose samples
//! were all bad, and the per-epoch summary of skipped samples.

use crate::config::JobConfig;
use crate::{Result, TrainError};
use dalle_data::image_ops::Preprocess;
use dalle_data::loader::{Batch, ImageLoader, LoaderConfig, LoaderStats};
use dalle_data::order::Sharding;
use tch::{Device, Tensor};

/// The loader settings of a job, decoding images to `image_size` pixels;
/// `sharding` says which slice of each global batch this rank reads. The
/// validation split's samples are left out (`data.validation`).
pub fn loader_config(job: &JobConfig, image_size: u32, sharding: Sharding) -> LoaderConfig {
    LoaderConfig {
        sharding,
        shuffle_window: job.data.shuffle_window,
        prefetch_batches: job.data.prefetch_batches,
        decode_threads: job.data.decode_threads.resolve(),
        read_ahead_bytes: job.data.read_ahead_bytes,
        max_bad_fraction: job.data.max_bad_fraction,
        preprocess: Preprocess {
            size: image_size,
            max_pixels: job.data.max_pixels,
            crop: job.data.crop,
        },
        columns: job.data.columns.clone(),
        holdout: job.data.validation.holdout(),
    }
}

/// A loader batch as a `(N, 3, S, S)` tensor of [0, 1] floats on `device`
/// (bytes until they get there).
pub fn batch_tensor(batch: &Batch, device: Device) -> Tensor {
    let s = i64::from(batch.size);
    dalle_model::images::from_bytes(&batch.pixels, [batch.len() as i64, 3, s, s], device)
}

/// Samples read and skipped in the current epoch, logged when it ends.
#[derive(Default)]
pub struct EpochSummary {
    epoch: u64,
    counts: LoaderStats,
}

impl EpochSummary {
    pub fn record(&mut self, batch: &Batch) {
        if batch.epoch != self.epoch {
            let c = &self.counts;
            tracing::info!(
                epoch = self.epoch,
                seen = c.seen,
                skipped = c.skipped(),
                null_image = c.null_image,
                empty_caption = c.empty_caption,
                undecodable = c.undecodable,
                held_out = c.held_out,
                "epoch {} done",
                self.epoch
            );
            *self = Self {
                epoch: batch.epoch,
                counts: LoaderStats::default(),
            };
        }
        self.counts.add(&batch.skipped);
    }
}

/// The next batch with at least one sample (a slice of only bad or
/// held-out samples is skipped; the loader has logged each bad one).
pub fn next_nonempty(
    loader: &mut ImageLoader,
    step: u64,
    epoch: &mut EpochSummary,
) -> Result<Batch> {
    loop {
        let batch = loader.next().ok_or(TrainError::DataExhausted(step))??;
        epoch.record(&batch);
        if !batch.is_empty() {
            return Ok(batch);
        }
        tracing::warn!(
            step, cursor = ?batch.cursor,
            "every sample of a batch was bad or held out for validation; taking the next batch"
        );
    }
}

/// Applies the run's thread count and device choice. `run.threads = 0`
/// leaves libtorch's default (every core) to a worker alone on its
/// machine, and gives each of several its share.
pub fn runtime_device(job: &JobConfig) -> Result<Device> {
    if job.run.threads > 0 {
        tch::set_num_threads(job.run.threads as i32);
    } else if crate::threads::local_workers() > 1 {
        tch::set_num_threads(crate::threads::share_of_cores() as i32);
    }
    Ok(dalle_model::device::parse_device(&job.run.device)?)
}

/// The sample ledger (`run.ledger`): every rank appends, per step, the keys
/// of the samples it trained on to `<run.dir>/ledger/STAGE-rank-R.jsonl`,
/// so a run can be audited: which samples each step saw, across restarts
/// and changes of world size (a re-done step appears again, later, with the
/// generation of the group that re-did it: per step, the entries of the
/// highest generation are the ones that count).
pub struct Ledger {
    file: Option<(std::path::PathBuf, std::fs::File)>,
    stage: &'static str,
    rank: usize,
    world: usize,
    generation: u64,
}

impl Ledger {
    /// `generation`: of the group (0 for a process training alone).
    pub fn open(
        job: &JobConfig,
        stage: &'static str,
        rank: usize,
        world: usize,
        generation: u64,
    ) -> Result<Self> {
        if !job.run.ledger {
            return Ok(Self {
                file: None,
                stage,
                rank,
                world,
                generation,
            });
        }
        let dir = job.run.dir.join("ledger");
        let path = dir.join(format!("{stage}-rank-{rank}.jsonl"));
        let io_err = |path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| TrainError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(Self {
            file: Some((path, file)),
            stage,
            rank,
            world,
            generation,
        })
    }

    /// Records the keys of step `step` (1-based: steps finished).
    pub fn record(&mut self, step: u64, keys: &[String]) -> Result<()> {
        use std::io::Write;
        let Some((path, file)) = &mut self.file else {
            return Ok(());
        };
        let line = serde_json::json!({
            "stage": self.stage, "step": step, "rank": self.rank, "world": self.world,
            "generation": self.generation, "keys": keys,
        });
        writeln!(file, "{line}").map_err(|source| TrainError::Io {
            path: path.clone(),
            source,
        })
    }
}
