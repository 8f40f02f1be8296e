//! The dVAE training loop (one process): batches from the loader, the
//! relaxed ELB objective under the paper's schedules, AdamW, a log line per
//! window (also appended to `dvae-metrics.jsonl`), and weights written
//! atomically during and at the end of training.

use crate::config::JobConfig;
use crate::feed::{EpochSummary, batch_tensor, loader_config, next_nonempty, runtime_device};
use crate::metrics::{DvaeLog, DvaeStepMetrics, Window};
use crate::optim::AdamW;
use crate::{Result, TrainError};
use dalle_data::loader::ImageLoader;
use dalle_data::order::Cursor;
use dalle_model::dvae::{Dvae, Objective, loss};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

pub struct TrainReport {
    pub logs: Vec<DvaeLog>,
    pub weights: PathBuf,
    pub loader: dalle_data::loader::LoaderStats,
}

/// Trains a dVAE as configured by `job`, calling `on_log` for every log line.
pub fn train(job: &JobConfig, mut on_log: impl FnMut(&DvaeLog)) -> Result<TrainReport> {
    let cfg = &job.dvae.train;
    let device = runtime_device(job)?;
    let data = job.data_location()?;
    let mut loader = ImageLoader::start(
        &data,
        loader_config(job, job.dvae.model.image_size as u32, cfg.batch_size),
        Cursor::start(job.run.seed),
    )?;
    tracing::info!(
        data = %data.url, row_groups = loader.units(), ?device,
        "training dVAE for {} steps at batch {}", cfg.steps, cfg.batch_size
    );

    tch::manual_seed(job.run.seed as i64);
    let model = Dvae::new(job.dvae.model.clone(), device)?;
    let mut optimizer = AdamW::new(model.named_parameters(), cfg.adamw);
    let weights = job.dvae_weights_path();
    let metrics_path = job.run.dir.join("dvae-metrics.jsonl");
    std::fs::create_dir_all(&job.run.dir).map_err(|source| TrainError::Io {
        path: job.run.dir.clone(),
        source,
    })?;
    let mut metrics_file =
        std::fs::File::create(&metrics_path).map_err(|source| TrainError::Io {
            path: metrics_path.clone(),
            source,
        })?;
    let grid = job.dvae.model.grid_size();
    let mut window = Window::default();
    let mut epoch = EpochSummary::default();
    let mut logs = Vec::new();

    for step in 0..cfg.steps {
        let started = Instant::now();
        let batch = next_nonempty(&mut loader, step, &mut epoch)?;
        let data_wait = started.elapsed();

        let objective = Objective {
            tau: cfg.tau.at(step),
            beta: cfg.beta.at(step),
            relaxation: cfg.relaxation,
            recon: cfg.recon,
        };
        let lr = cfg.lr.at(step);
        let out = model.train_forward(&batch_tensor(&batch, device), &objective)?;
        optimizer.zero_grad();
        out.loss.backward();
        if let Some(max_norm) = cfg.grad_clip {
            optimizer.clip_grad_norm(max_norm);
        }
        optimizer.step(lr);

        let scalars = Tensor::stack(
            &[
                out.loss.detach(),
                out.recon.detach(),
                out.kl.detach(),
                out.mse,
            ],
            0,
        )
        .to_device(Device::Cpu)
        .to_kind(Kind::Double);
        let [loss_v, recon, kl, mse] =
            <[f64; 4]>::try_from(Vec::<f64>::try_from(scalars)?).expect("four scalars");
        if !loss_v.is_finite() {
            return Err(TrainError::Diverged { step, loss: loss_v });
        }
        window.add(DvaeStepMetrics {
            loss: loss_v,
            recon,
            kl,
            mse,
            images: batch.len(),
            data_wait,
            step_time: started.elapsed(),
        });

        let done = step + 1;
        if done % cfg.log_every == 0 || done == cfg.steps {
            let (codes_used, code_perplexity) =
                loss::codebook_usage(&out.tokens, job.dvae.model.vocab_size);
            let line = window.finish(
                DvaeLog {
                    step: done,
                    tau: objective.tau,
                    beta: objective.beta,
                    lr,
                    codes_used,
                    code_perplexity,
                    ..DvaeLog::default()
                },
                grid * grid,
            );
            tracing::info!("{line}");
            writeln!(
                metrics_file,
                "{}",
                serde_json::to_string(&line).expect("serialisable")
            )
            .map_err(|source| TrainError::Io {
                path: metrics_path.clone(),
                source,
            })?;
            on_log(&line);
            logs.push(line);
        }
        if cfg.save_every > 0 && done % cfg.save_every == 0 && done != cfg.steps {
            model.save(&weights)?;
        }
    }
    model.save(&weights)?;
    let stats = loader.stats();
    tracing::info!(
        weights = %weights.display(),
        seen = stats.seen, skipped = stats.skipped(), null_image = stats.null_image,
        empty_caption = stats.empty_caption, undecodable = stats.undecodable,
        "dVAE training done"
    );
    Ok(TrainReport {
        logs,
        weights,
        loader: stats,
    })
}
