//! The dVAE training loop (one process): batches from the loader, the
//! relaxed ELB objective under the paper's schedules, AdamW, a log line per
//! window (also appended to `dvae-metrics.jsonl`), held-out reconstruction
//! every `eval_every` steps (the same file, marked `"kind": "validation"`),
//! and weights written atomically during and at the end of training.

use crate::Result;
use crate::config::JobConfig;
use crate::ddp::{DataParallel, backward_passes, seeded, step_seed};
use crate::deferred::Pending;
use crate::feed::{EpochSummary, batch_tensor, loader_config, next_nonempty, runtime_device};
use crate::flops::{self, Utilisation};
use crate::metrics::{DvaeLog, DvaeStepMetrics, Progress, Window};
use crate::stage_run::{StagePlan, StageRun, StepTiming};
use crate::validation::{self, DvaeValidation, HeldOut};
use dalle_data::loader::ImageLoader;
use dalle_data::order::Sharding;
use dalle_model::dvae::{Dvae, Objective, loss};
use dalle_precision::Autocast;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

#[derive(Debug)]
pub struct TrainReport {
    pub logs: Vec<DvaeLog>,
    /// Each evaluation on the validation set.
    pub validation: Vec<DvaeValidation>,
    pub weights: PathBuf,
    pub loader: dalle_data::loader::LoaderStats,
}

/// One step's figures over the whole local batch, every one detached.
pub struct DvaeStepParts {
    /// recon + β·KL/dims + the usage term's surrogate (see
    /// [`loss::usage_surrogate`]), the batch's mean.
    pub loss: Tensor,
    pub recon: Tensor,
    pub kl: Tensor,
    pub mse: Tensor,
    /// KL(q̄ ‖ uniform) of the global batch's mean posterior q̄.
    pub usage: Tensor,
    /// Argmax codes of every image of the batch, `(N, h, w)`.
    pub tokens: Tensor,
}

/// The forward and backward passes of one step over a local batch of
/// `images`, in `micro`-image slices whose gradients accumulate, each
/// scaled by its share of the batch, so they are the whole batch's; with
/// `checkpointing` the encoder's and decoder's groups are recomputed in
/// backward ([`Dvae::train_pass`]).
///
/// The usage term is a non-linear function of the global batch's mean
/// posterior q̄ (every rank's batch, through `ddp`), so it does not split
/// into per-slice losses; its gradient does: at q̄ it is a fixed slope on
/// q̄, and q̄ is a share-weighted mean of the slices' mean posteriors, so
/// each slice's [`loss::usage_surrogate`] with that slope, scaled by its
/// share like the rest of its loss, gives exactly its part of the
/// gradient. Without slices the posterior comes from the pass itself, as
/// it always has; with slices, and a usage weight above zero, a first
/// pass of the encoder alone without autograd (it draws no noise) gives q̄
/// before any backward. Ranks all reduce q̄ once per step either way.
pub fn accumulate_gradients(
    model: &Dvae,
    images: &Tensor,
    objective: &Objective,
    micro: usize,
    checkpointing: bool,
    ddp: &mut DataParallel,
) -> Result<DvaeStepParts> {
    let n = images.size()[0];
    let samples = n as usize;
    let micro = (micro as i64).clamp(1, n.max(1));
    if micro >= n {
        let mut pass = model.train_pass(images, objective, checkpointing)?;
        let global = ddp.global_mean_tensor(&pass.out.mean_posterior, samples)?;
        let usage = pass.out.add_usage_term(objective.usage, &global);
        let out = pass.backward(1.0);
        return Ok(DvaeStepParts {
            loss: out.loss,
            recon: out.recon,
            kl: out.kl,
            mse: out.mse,
            usage,
            tokens: out.tokens,
        });
    }
    let slices: Vec<(i64, i64)> = (0..n)
        .step_by(micro as usize)
        .map(|first| (first, (n - first).min(micro)))
        .collect();
    let share = |m: i64| m as f64 / n as f64;
    let global = if objective.usage > 0.0 {
        let mut local = Tensor::zeros([model.config().vocab_size], (Kind::Float, model.device()));
        for &(first, m) in &slices {
            let logits = tch::no_grad(|| model.encoder_logits(&images.narrow(0, first, m)))?;
            local += loss::mean_posterior(&logits) * share(m);
        }
        Some(ddp.global_mean_tensor(&local, samples)?)
    } else {
        None
    };
    let mut local = Tensor::zeros([model.config().vocab_size], (Kind::Float, model.device()));
    let mut sums = Tensor::zeros([4], (Kind::Float, model.device()));
    let mut tokens = Vec::with_capacity(slices.len());
    for &(first, m) in &slices {
        let mut pass = model.train_pass(&images.narrow(0, first, m), objective, checkpointing)?;
        if let Some(global) = &global {
            let _ = pass.out.add_usage_term(objective.usage, global);
        }
        let out = pass.backward(share(m));
        local += out.mean_posterior * share(m);
        sums += Tensor::stack(&[out.loss, out.recon, out.kl, out.mse], 0) * share(m);
        tokens.push(out.tokens);
    }
    let global = match global {
        Some(global) => global,
        None => ddp.global_mean_tensor(&local, samples)?,
    };
    Ok(DvaeStepParts {
        loss: sums.get(0),
        recon: sums.get(1),
        kl: sums.get(2),
        mse: sums.get(3),
        usage: loss::usage_kl(&global),
        tokens: Tensor::cat(&tokens, 0),
    })
}

/// What the host knows of a step whose losses are still on the device.
struct DvaeHostMetrics {
    data_wait: Duration,
    comm: Duration,
    step_time: Duration,
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
    let precision = job.run.precision_on(device);
    let data = job.data_location()?;
    let model = seeded(job.run.seed, || Dvae::new(job.dvae.model.clone(), device))?;
    let mut optimizer = ddp.optimizer(model.named_parameters(), cfg.adamw, job.run.sharding)?;
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
    let flops_per_image = flops::dvae_per_image(&params, &job.dvae.model);
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
        checkpointing = cfg.activation_checkpointing, precision = precision.name(),
        "training dVAE for {} steps at batch {} (micro-batch {})",
        cfg.steps, cfg.batch_size, cfg.micro_batch()
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

    let mut pending = Pending::default();
    let no_global = Tensor::zeros([0], (Kind::Float, device));
    // The loss the step hook reports: that of the last step read.
    let mut last_loss = f64::NAN;
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
        optimizer.zero_grad();
        ddp.begin_step(
            &mut optimizer,
            batch.len(),
            backward_passes(batch.len(), cfg.micro_batch()),
        )?;
        // Forward and backward in the run's precision; the region (and
        // autocast's casts of the weights) ends before the optimizer steps.
        let out = {
            let _autocast = Autocast::enter(device, precision);
            accumulate_gradients(
                &model,
                &batch_tensor(&batch, device),
                &objective,
                cfg.micro_batch(),
                cfg.activation_checkpointing,
                ddp,
            )?
        };
        ddp.update(&mut optimizer, batch.len(), lr, cfg.grad_clip)?;
        ddp.verify_every(step + 1, job.run.verify_every, &params)?;

        // The loss terms stay on the device until a step that reads them
        // (crate::deferred); what the host knows waits with them.
        let scalars = Tensor::stack(&[out.loss, out.recon, out.kl, out.mse, out.usage], 0);
        let host = DvaeHostMetrics {
            data_wait,
            comm: ddp.take_comm_time(),
            step_time: started.elapsed(),
        };
        pending.push(step, &scalars, &no_global, batch.len(), host);
        let done = step + 1;
        if run.reads_due(done) {
            for ready in pending.drain(ddp)? {
                let [loss, recon, kl, mse, usage] =
                    <[f64; 5]>::try_from(ready.means).expect("five scalars");
                let h = ready.host;
                window.add(DvaeStepMetrics {
                    loss,
                    recon,
                    kl,
                    mse,
                    usage,
                    images: ready.samples,
                    data_wait: h.data_wait,
                    comm: h.comm,
                    step_time: h.step_time,
                });
                last_loss = loss;
            }
        }
        let timing = StepTiming::since(started, data_wait);

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
            let line = {
                let _autocast = Autocast::enter(device, precision);
                validation::evaluate_dvae(&model, held, cfg.recon, local_batch, ddp, done)?
            };
            run.log(&line)?;
            on_progress(Progress::Validation(&line));
            validations.push(line);
        }
        let save = |path: &std::path::Path| model.save(path);
        run.end_step(
            ddp, done, &batch, timing, last_loss, save, &params, &optimizer,
        )?;
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
