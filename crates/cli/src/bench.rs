//! `dalle bench …`: throughput benchmarks that print one JSON line, so a
//! script can set them beside a reference measured in the same run.

use anyhow::Result;
use clap::Subcommand;
use dalle_model::dvae::{Dvae, Objective};
use dalle_train::config::JobConfig;
use dalle_train::optim::AdamW;
use std::time::Instant;
use tch::{Kind, Tensor};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Image decode + resize (shorter side) + centre crop to CHW floats, on
    /// this thread only: images/s per core, for every `.jpg`/`.png`/`.webp`
    /// file of a directory (read into memory first, so disk is not timed).
    Decode {
        #[arg(long)]
        images: std::path::PathBuf,
        #[arg(long, default_value_t = 256)]
        size: u32,
        /// Passes over the images.
        #[arg(long, default_value_t = 3)]
        passes: usize,
    },
    /// dVAE training steps on a fixed random batch (model compute only,
    /// no data loading): images/s and peak resident memory.
    Dvae {
        #[arg(long, default_value_t = 3)]
        warmup: u64,
        #[arg(long, default_value_t = 20)]
        steps: u64,
    },
}

/// Peak resident set size of this process, in MiB (Linux).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn bench_decode(dir: &std::path::Path, size: u32, passes: usize) -> Result<()> {
    use anyhow::Context;
    use dalle_data::image_ops::{Crop, Preprocess};
    let mut files: Vec<Vec<u8>> = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path
            .extension()
            .is_some_and(|e| e == "jpg" || e == "png" || e == "webp")
        {
            files.push(std::fs::read(&path)?);
        }
    }
    anyhow::ensure!(!files.is_empty(), "no images in {}", dir.display());
    let preprocess = Preprocess {
        size,
        max_pixels: u64::MAX,
        crop: Crop::Center,
    };
    let mut out = Vec::with_capacity((3 * size * size) as usize);
    let started = Instant::now();
    for _ in 0..passes {
        for bytes in &files {
            out.clear();
            preprocess.apply(bytes, "bench", 0, &mut out)?;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let n = files.len() * passes;
    println!(
        "{}",
        serde_json::json!({
            "impl": "dalle-rs",
            "images": n,
            "size": size,
            "seconds": seconds,
            "images_per_s_per_core": n as f64 / seconds,
        })
    );
    Ok(())
}

pub fn run(cmd: BenchCommand, job: &JobConfig) -> Result<()> {
    match cmd {
        BenchCommand::Decode {
            images,
            size,
            passes,
        } => bench_decode(&images, size, passes),
        BenchCommand::Dvae { warmup, steps } => {
            let device = dalle_train::feed::runtime_device(job)?;
            let cfg = &job.dvae.model;
            let train = &job.dvae.train;
            tch::manual_seed(job.run.seed as i64);
            let model = Dvae::new(cfg.clone(), device)?;
            let mut opt = AdamW::new(model.named_parameters(), train.adamw);
            let batch = train.batch_size as i64;
            let x = Tensor::rand(
                [batch, cfg.channels, cfg.image_size, cfg.image_size],
                (Kind::Float, device),
            );
            let objective = Objective {
                tau: 1.0,
                beta: 1.0,
                relaxation: train.relaxation,
                recon: train.recon,
            };
            let mut step = || -> Result<f64> {
                let out = model.train_forward(&x, &objective)?;
                opt.zero_grad();
                out.loss.backward();
                opt.step(1e-4);
                Ok(out.loss.double_value(&[]))
            };
            for _ in 0..warmup {
                step()?;
            }
            let started = Instant::now();
            let mut loss = 0.0;
            for _ in 0..steps {
                loss = step()?;
            }
            let seconds = started.elapsed().as_secs_f64();
            let line = serde_json::json!({
                "impl": "dalle-rs",
                "threads": tch::get_num_threads(),
                "device": format!("{device:?}"),
                "image_size": cfg.image_size,
                "n_hid": cfg.n_hid,
                "n_blk_per_group": cfg.n_blk_per_group,
                "vocab_size": cfg.vocab_size,
                "n_init": cfg.n_init,
                "batch_size": batch,
                "steps": steps,
                "seconds": seconds,
                "images_per_s": (batch as u64 * steps) as f64 / seconds,
                "peak_rss_mib": peak_rss_mib(),
                "final_loss": loss,
            });
            println!("{line}");
            Ok(())
        }
    }
}
