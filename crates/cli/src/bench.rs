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

pub fn run(cmd: BenchCommand, job: &JobConfig) -> Result<()> {
    match cmd {
        BenchCommand::Dvae { warmup, steps } => {
            let device = dalle_train::dvae::runtime_device(job)?;
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
