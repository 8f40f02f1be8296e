//! The dVAE training loop (one process): batches from the loader, the
//! relaxed ELB objective under the paper's schedules, AdamW, a log line per
//! window (also appended to `dvae-metrics.jsonl`), held-out reconstruction
//! every `eval_every` steps (the same file, marked `"kind": "validation"`),
//! and weights written atomically during and at the end of training.

use crate::config::JobConfig;
use crate::ddp::{DataParallel, seeded, step_seed};
use crate::feed::{EpochSummary, batch_tensor, loader_config, next_nonempty, runtime_device};
use crate::flops::{self, Utilisation};
use crate::metrics::{DvaeLog, DvaeStepMetrics, Progress, Window};
use crate::stage_run::{StagePlan, StageRun, StepTiming};
use crate::validation::{self, DvaeValidation, HeldOut};
use crate::{Result, TrainError};
use dalle_data::loader::ImageLoader;
use dalle_data::order::Sharding;
use dalle_model::dvae::{Dvae, Objective, loss};
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Debug)]
pub struct TrainReport {
    pub logs: Vec<DvaeLog>,
    /// Each evaluation on the validation set.
    pub validation: Vec<DvaeValidation>,
    pub weights: PathBuf,
    pub loader: dalle_data::loader::LoaderStats,
}

/// Trains a dVAE as configured by `job` on this rank's slice of every
/// global batch (all of it with [`DataParallel::solo`]), calling
/// `on_progress` with every log line and every held-out evaluation. Only
/// rank 0 writes files.
pub fn train(
    job: &JobConfig,
    ddp: &mut DataParallel,
    mut on_progress: impl FnMut(Progress<'_, DvaeLog, DvaeValidation>),
) -> Result<TrainReport> {
    let cfg = &job.dvae.train;
    let device = runtime_device(job)?;
    let data = job.data_location()?;
    let model = seeded(job.run.seed, || Dvae::new(job.dvae.model.clone(), device))?;
    let mut optimizer = ddp.optimizer(model.named_parameters(), cfg.adamw, job.run.sharding);
    let params = model.named_parameters();
    ddp.share_initial_parameters(&params)?;
    let plan = StagePlan {
        name: "dvae",
        steps: cfg.steps,
        log_every: cfg.log_every,
        save_every: cfg.save_every,
        weights: job.dvae_weights_path(),
    };
    let variables = model.var_store().variables();
    let mut run = StageRun::resume(job, plan, ddp, None, &variables, &mut optimizer)?;
    let first_step = run.first_step();
    let flops_per_image = flops::dvae_per_image(&params, job.dvae.model.image_size);
    let peak = flops::job_peak(job);
    let mut loader = ImageLoader::start(
        &data,
        loader_config(
            job,
            job.dvae.model.image_size as u32,
            Sharding {
                global_batch: cfg.batch_size,
                rank: ddp.rank(),
                world: ddp.world_size(),
            },
        ),
        run.cursor(),
    )?;
    tracing::info!(
        data = %data.url, row_groups = loader.units(), ?device, first_step,
        "training dVAE for {} steps at batch {}", cfg.steps, cfg.batch_size
    );
    let image_size = job.dvae.model.image_size as u32;
    let steps = (first_step, cfg.steps);
    let held = HeldOut::open(job, &data, image_size, cfg.eval_every, steps, ddp)?;
    if let Some(held) = &held {
        held.expect_images()?;
    }
    let grid = job.dvae.model.grid_size();
    let mut window = Window::default();
    let mut epoch = EpochSummary::default();
    let mut logs = Vec::new();
    let mut validations = Vec::new();

    for step in first_step..cfg.steps {
        let started = Instant::now();
        let batch = next_nonempty(&mut loader, step, &mut epoch)?;
        let data_wait = started.elapsed();

        let objective = Objective {
            tau: cfg.tau.at(step),
            beta: cfg.beta.at(step),
            usage: cfg.usage.at(step),
            relaxation: cfg.relaxation,
            recon: cfg.recon,
        };
        let lr = cfg.lr.at(step);
        tch::manual_seed(step_seed(job.run.seed, ddp.rank(), step));
        let mut out = model.train_forward(&batch_tensor(&batch, device), &objective)?;
        let global_posterior = ddp.global_mean_tensor(&out.mean_posterior, batch.len())?;
        let usage_kl = out.add_usage_term(objective.usage, &global_posterior);
        optimizer.zero_grad();
        out.loss.backward();
        ddp.update(&mut optimizer, batch.len(), lr, cfg.grad_clip)?;
        ddp.verify_every(step + 1, job.run.verify_every, &params)?;

        let scalars = Tensor::stack(
            &[
                out.loss.detach(),
                out.recon.detach(),
                out.kl.detach(),
                out.mse,
                usage_kl,
            ],
            0,
        )
        .to_device(Device::Cpu)
        .to_kind(Kind::Double);
        let (means, images) = ddp.global_means(&Vec::<f64>::try_from(scalars)?, batch.len())?;
        let [loss_v, recon, kl, mse, usage] = <[f64; 5]>::try_from(means).expect("five scalars");
        if !loss_v.is_finite() {
            return Err(TrainError::Diverged { step, loss: loss_v });
        }
        window.add(DvaeStepMetrics {
            loss: loss_v,
            recon,
            kl,
            mse,
            usage,
            images,
            data_wait,
            comm: ddp.take_comm_time(),
            step_time: started.elapsed(),
        });
        let timing = StepTiming::since(started, data_wait);

        let done = step + 1;
        if run.log_due(done) {
            let (codes_used, code_perplexity) =
                loss::codebook_usage(&out.tokens, job.dvae.model.vocab_size);
            let line = window.finish(
                DvaeLog {
                    step: done,
                    tau: objective.tau,
                    beta: objective.beta,
                    usage_weight: objective.usage,
                    lr,
                    codes_used,
                    code_perplexity,
                    ..DvaeLog::default()
                },
                grid * grid,
            );
            let mut line = line;
            line.flops = Utilisation::of(flops_per_image * line.images_per_s, peak);
            run.log(&line)?;
            on_progress(Progress::Line(&line));
            logs.push(line);
        }
        if let Some(held) = held.as_ref().filter(|h| h.due(done)) {
            let local_batch = cfg.batch_size / ddp.world_size();
            let line = validation::evaluate_dvae(&model, held, cfg.recon, local_batch, ddp, done)?;
            run.log(&line)?;
            on_progress(Progress::Validation(&line));
            validations.push(line);
        }
        let save = |path: &std::path::Path| model.save(path);
        run.end_step(ddp, done, &batch, timing, loss_v, save, &params, &optimizer)?;
    }
    run.finish(|path| model.save(path))?;
    let weights = run.weights().to_path_buf();
    let stats = loader.stats();
    tracing::info!(
        weights = %weights.display(),
        seen = stats.seen, skipped = stats.skipped(), null_image = stats.null_image,
        empty_caption = stats.empty_caption, undecodable = stats.undecodable,
        held_out = stats.held_out,
        "dVAE training done"
    );
    Ok(TrainReport {
        logs,
        validation: validations,
        weights,
        loader: stats,
    })
}
