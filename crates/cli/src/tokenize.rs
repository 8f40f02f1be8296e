//! `dalle data tokenize`: a dataset's images → dVAE tokens, written as
//! Parquet of (key, caption, tokens) beside the same file names, for stage 2.
//!
//! Works file by file over the dataset's row groups (the same units the
//! loader plans), so the files can later be split across workers by the
//! shard plan. Bad samples are skipped, logged and counted, as in training.
//! Samples the validation split holds out are encoded too: the split keeps
//! them out of training only, and stage 2 evaluates on their tokens.

use crate::progress;
use anyhow::{Context, Result, bail};
use dalle_data::columns::Payload;
use dalle_data::image_ops::{Crop, Preprocess};
use dalle_data::loader::{Decoded, decode_sample};
use dalle_data::parquet_source::{self, RawSample, Unit};
use dalle_data::tokens::{self, TokenRow};
use dalle_model::dvae::Dvae;
use dalle_model::images::from_bytes;
use dalle_store::Location;
use dalle_train::config::JobConfig;
use rayon::prelude::*;
use std::sync::Arc;
use tch::Device;

/// Rows per row group of the token files.
const ROWS_PER_GROUP: usize = 1024;

pub struct TokenizeArgs<'a> {
    pub model: &'a Dvae,
    pub input: Location,
    pub output: Location,
    pub batch_size: usize,
    /// This worker's share: files `i` with `i % world == rank` (of the
    /// dataset's files in key order, the loader's plan), `(0, 1)` for all.
    pub shard: (usize, usize),
}

pub fn run(job: &JobConfig, args: TokenizeArgs) -> Result<()> {
    let TokenizeArgs {
        model,
        input,
        output,
        batch_size,
        shard: (rank, world),
    } = args;
    if model.config().vocab_size > i64::from(u16::MAX) + 1 {
        bail!(
            "dvae vocab_size {} does not fit u16 tokens",
            model.config().vocab_size
        );
    }
    let preprocess = Preprocess {
        size: model.config().image_size as u32,
        max_pixels: job.data.max_pixels,
        crop: Crop::Center,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let units = runtime.block_on(parquet_source::plan_units(&input, &job.data.columns))?;
    if let Some(unit) = units.first()
        && let payload @ Payload::Tokens { .. } = unit.file.payload()
    {
        bail!(
            "{} holds {payload} already; tokenizing needs images",
            unit.file.url
        );
    }
    let mine: Vec<&[Unit]> = units
        .chunk_by(|a, b| Arc::ptr_eq(&a.file, &b.file))
        .enumerate()
        .filter(|(i, _)| i % world.max(1) == rank)
        .map(|(_, file_units)| file_units)
        .collect();
    let total: usize = mine.iter().flat_map(|f| f.iter()).map(|u| u.rows).sum();
    let bar = progress::bar(total as u64, "tokenizing");
    let (mut written, mut skipped, mut files) = (0usize, 0usize, 0usize);
    for file_units in mine {
        let mut rows = Vec::new();
        for unit in file_units {
            let samples = runtime.block_on(parquet_source::read_unit(unit))?;
            bar.inc(samples.len() as u64);
            let decoded = decode(&samples, unit, &preprocess);
            skipped += samples.len() - decoded.len();
            rows.extend(encode(model, decoded, batch_size, preprocess.size)?);
        }
        let url = &file_units[0].file.url;
        let name = url.rsplit('/').next().unwrap_or(url);
        runtime
            .block_on(tokens::write(&output, name, &rows, ROWS_PER_GROUP))
            .with_context(|| format!("writing tokens of {url}"))?;
        written += rows.len();
        files += 1;
    }
    bar.finish_and_clear();
    println!(
        "tokenized {written} samples into {files} files at {} ({skipped} skipped; see the log)",
        output.url
    );
    Ok(())
}

/// Decodes a row group's samples in parallel, with the loader's rules;
/// bad ones are logged and left out.
fn decode(samples: &[RawSample], unit: &Unit, preprocess: &Preprocess) -> Vec<Decoded> {
    samples
        .par_iter()
        .filter_map(|s| decode_sample(s, unit, preprocess, 0).ok())
        .collect()
}

/// Encodes decoded samples in batches: argmax tokens, row-major, as u16.
fn encode(model: &Dvae, samples: Vec<Decoded>, batch: usize, size: u32) -> Result<Vec<TokenRow>> {
    let s = i64::from(size);
    let mut rows = Vec::with_capacity(samples.len());
    for chunk in samples.chunks(batch.max(1)) {
        let pixels: Vec<u8> = chunk
            .iter()
            .flat_map(|d| d.pixels.iter().copied())
            .collect();
        let x = from_bytes(&pixels, [chunk.len() as i64, 3, s, s], model.device());
        let tokens = model.encode(&x)?.to_device(Device::Cpu).flatten(1, -1);
        let n = tokens.size()[1] as usize;
        let flat = Vec::<i64>::try_from(tokens.flatten(0, -1))?;
        for (d, grid) in chunk.iter().zip(flat.chunks(n)) {
            rows.push(TokenRow {
                key: d.key.clone(),
                caption: d.caption.clone(),
                tokens: grid.iter().map(|&t| t as u16).collect(),
            });
        }
    }
    Ok(rows)
}
