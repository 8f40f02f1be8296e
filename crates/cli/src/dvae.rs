//! `dalle dvae …`: train, encode, decode, reconstruct, import OpenAI weights.

use crate::inputs::{self, InputImage};
use crate::progress;
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use dalle_data::image_ops::{Crop, Preprocess};
use dalle_model::device::parse_device;
use dalle_model::dvae::Dvae;
use dalle_model::images::{from_bytes, grid, to_rgb_images};
use dalle_train::config::JobConfig;
use dalle_train::ddp::DataParallel;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

#[derive(Subcommand)]
pub enum DvaeCommand {
    /// Train a dVAE on the job's dataset (config sections [dvae], [data]).
    Train,
    /// Images (files, or Parquet files/directories) → token grids as JSON lines.
    Encode {
        /// Weights; defaults to the job's `<run.dir>/dvae.safetensors`.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Output file (JSON lines: key, grid, tokens).
        #[arg(long)]
        out: PathBuf,
        /// Encode at most this many images.
        #[arg(long)]
        limit: Option<usize>,
        /// Image files, or datasets (Parquet file, directory, prefix or glob; path or URL).
        #[arg(required = true)]
        inputs: Vec<String>,
    },
    /// Token grids (JSON lines from `encode`) → a PNG grid of images.
    Decode {
        #[arg(long)]
        weights: Option<PathBuf>,
        #[arg(long)]
        tokens: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Originals next to their reconstructions as a PNG, with PSNR.
    Reconstruct {
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Image files or datasets (paths or URLs); defaults to the job's dataset.
        inputs: Vec<String>,
        /// Number of images.
        #[arg(long, default_value_t = 16)]
        count: usize,
        /// Output PNG; defaults to `<run.dir>/reconstructions.png`.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Convert OpenAI's released encoder and decoder (as safetensors with
    /// their original names) into one dalle-rs weights file.
    ImportOpenai {
        #[arg(long)]
        encoder: PathBuf,
        #[arg(long)]
        decoder: PathBuf,
        #[arg(long, default_value_t = 256)]
        image_size: i64,
        #[arg(long)]
        out: PathBuf,
    },
}

/// One line of `encode`'s output.
#[derive(Serialize, Deserialize)]
struct TokenGrid {
    key: String,
    grid: [i64; 2],
    tokens: Vec<i64>,
}

pub fn run(cmd: DvaeCommand, job: &JobConfig) -> Result<()> {
    let device = || -> Result<Device> { Ok(parse_device(&job.run.device)?) };
    let load = |weights: Option<PathBuf>| -> Result<Dvae> {
        let path = weights.unwrap_or_else(|| job.dvae_weights_path());
        Dvae::load(&path, device()?)
            .with_context(|| format!("loading dVAE weights {}", path.display()))
    };
    match cmd {
        DvaeCommand::Train => train(job),
        DvaeCommand::Encode {
            weights,
            out,
            limit,
            inputs,
        } => encode(&load(weights)?, job, &inputs, limit, &out),
        DvaeCommand::Decode {
            weights,
            tokens,
            out,
        } => decode(&load(weights)?, &tokens, &out),
        DvaeCommand::Reconstruct {
            weights,
            inputs,
            count,
            out,
        } => {
            let out = out.unwrap_or_else(|| job.run.dir.join("reconstructions.png"));
            reconstruct(&load(weights)?, job, &inputs, count, &out)
        }
        DvaeCommand::ImportOpenai {
            encoder,
            decoder,
            image_size,
            out,
        } => {
            let model = Dvae::load_openai(&encoder, &decoder, image_size, Device::Cpu)?;
            model.save(&out)?;
            println!("wrote {} ({:?})", out.display(), model.config());
            Ok(())
        }
    }
}

fn train(job: &JobConfig) -> Result<()> {
    let report = dalle_train::dvae::train(job, &mut DataParallel::solo(), |_| {})?;
    let Some(last) = report.logs.last() else {
        println!(
            "nothing to train: the run's checkpoint is at dvae.train.steps = {} already \
             (set checkpoint.resume = false and checkpoint.overwrite = true to start over); \
             weights in {}",
            job.dvae.train.steps,
            report.weights.display()
        );
        return Ok(());
    };
    println!(
        "trained {} steps: loss {:.4}, psnr {:.2} dB, {} codes used; weights in {}",
        last.step,
        last.loss,
        last.psnr,
        last.codes_used,
        report.weights.display()
    );
    Ok(())
}

fn preprocess(model: &Dvae, job: &JobConfig) -> Preprocess {
    Preprocess {
        size: model.config().image_size as u32,
        max_pixels: job.data.max_pixels,
        crop: Crop::Center,
    }
}

pub(crate) fn read_inputs(
    model: &Dvae,
    job: &JobConfig,
    inputs: &[String],
    limit: Option<usize>,
) -> Result<Vec<InputImage>> {
    let images = inputs::read_images(
        inputs,
        &preprocess(model, job),
        &job.data.columns,
        &job.store,
        limit,
    )?;
    if images.is_empty() {
        bail!("no decodable images in {inputs:?}");
    }
    Ok(images)
}

/// Inputs in batches, as `(N, 3, S, S)` tensors.
fn batches<'a>(
    model: &Dvae,
    images: &'a [InputImage],
    batch: usize,
) -> impl Iterator<Item = (&'a [InputImage], Tensor)> {
    let s = model.config().image_size;
    images.chunks(batch).map(move |chunk| {
        let pixels: Vec<u8> = chunk
            .iter()
            .flat_map(|i| i.pixels.iter().copied())
            .collect();
        let shape = [chunk.len() as i64, 3, s, s];
        (chunk, from_bytes(&pixels, shape, model.device()))
    })
}

fn encode(
    model: &Dvae,
    job: &JobConfig,
    inputs: &[String],
    limit: Option<usize>,
    out: &Path,
) -> Result<()> {
    let images = read_inputs(model, job, inputs, limit)?;
    let bar = progress::bar(images.len() as u64, "encoding");
    let mut lines = Vec::new();
    for (chunk, x) in batches(model, &images, 64) {
        let tokens = model.encode(&x)?.to_device(Device::Cpu);
        let (h, w) = (tokens.size()[1], tokens.size()[2]);
        for (img, t) in chunk.iter().zip(tokens.split(1, 0)) {
            let tokens = Vec::<i64>::try_from(t.flatten(0, -1))?;
            lines.push(serde_json::to_string(&TokenGrid {
                key: img.key.clone(),
                grid: [h, w],
                tokens,
            })?);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    write_atomically(out, (lines.join("\n") + "\n").as_bytes())?;
    println!("encoded {} images to {}", lines.len(), out.display());
    Ok(())
}

fn decode(model: &Dvae, tokens: &Path, out: &Path) -> Result<()> {
    let file =
        std::fs::File::open(tokens).with_context(|| format!("opening {}", tokens.display()))?;
    let mut grids = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", tokens.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let grid: TokenGrid = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not a token grid", tokens.display(), n + 1))?;
        let [h, w] = grid.grid;
        if grid.tokens.len() as i64 != h * w {
            bail!(
                "{}:{}: {} tokens for a {h}×{w} grid",
                tokens.display(),
                n + 1,
                grid.tokens.len()
            );
        }
        let t = Tensor::from_slice(&grid.tokens).view([1, h, w]);
        let image = model
            .decode(&t)
            .with_context(|| format!("{}:{}", tokens.display(), n + 1))?;
        grids.push(to_rgb_images(&image)?.remove(0));
    }
    if grids.is_empty() {
        bail!("{} holds no token grids", tokens.display());
    }
    let rows: Vec<_> = grids.chunks(8).map(<[_]>::to_vec).collect();
    save_png(&grid(&rows, 2), out)?;
    println!("decoded {} images to {}", grids.len(), out.display());
    Ok(())
}

fn reconstruct(
    model: &Dvae,
    job: &JobConfig,
    inputs: &[String],
    count: usize,
    out: &Path,
) -> Result<()> {
    let inputs = if inputs.is_empty() {
        vec![job.data_url()]
    } else {
        inputs.to_vec()
    };
    let images = read_inputs(model, job, &inputs, Some(count))?;
    let as_batches = batches(model, &images, 64).map(|(_, x)| Ok(x));
    let report = dalle_train::eval::reconstruct(model, as_batches, count)?;
    save_png(
        &reconstruction_grid(&report.originals, &report.reconstructions)?,
        out,
    )?;
    println!(
        "reconstructed {} images: PSNR {:.2} dB (baselines: mean colour {:.2} dB, mean image {:.2} dB); grid in {}",
        report.images,
        report.psnr,
        report.baseline_psnr,
        report.blind_psnr,
        out.display()
    );
    Ok(())
}

/// `(N, 3, S, S)` originals and their reconstructions as one picture:
/// rows alternate, 8 originals, then their 8 reconstructions.
pub(crate) fn reconstruction_grid(
    originals: &Tensor,
    reconstructions: &Tensor,
) -> Result<image::RgbImage> {
    let originals = to_rgb_images(originals)?;
    let recons = to_rgb_images(reconstructions)?;
    let rows: Vec<_> = originals
        .chunks(8)
        .zip(recons.chunks(8))
        .flat_map(|(o, r)| [o.to_vec(), r.to_vec()])
        .collect();
    Ok(grid(&rows, 2))
}

pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("partial");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

pub(crate) fn save_png(image: &image::RgbImage, path: &Path) -> Result<()> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    image.write_to(&mut bytes, image::ImageFormat::Png)?;
    write_atomically(path, bytes.get_ref())
}
