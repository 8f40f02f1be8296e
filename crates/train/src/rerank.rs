//! The rerank stage: a small contrastive text–image model
//! ([`dalle_model::rerank`]) trained on the job's images and captions, data
//! parallel like the other stages, with checkpoints and resume; a log line
//! per window (also in `rerank-metrics.jsonl`) and held-out retrieval every
//! `eval_every` steps.
//!
//! The loss compares every image with every caption of the **global**
//! batch, not of each rank's slice: each rank gathers all ranks'
//! embeddings, puts its own live rows in their place, and takes the loss of
//! the whole batch. Its gradient through its own rows is then exactly its
//! share of the global gradient, so W ranks train as one process with the
//! whole batch (see [`global_batch_loss`]).

use crate::config::JobConfig;
use crate::ddp::{DataParallel, seeded, step_seed};
use crate::deferred::Pending;
use crate::feed::{EpochSummary, batch_tensor, loader_config, next_nonempty, runtime_device};
use crate::gpt::{CaptionEncoder, load_tokenizer};
use crate::metrics::Progress;
use crate::stage_run::{StagePlan, StageRun, StepTiming};
use crate::validation::HeldOut;
use crate::{Result, TrainError};
use dalle_data::columns::Payload;
use dalle_data::loader::{ImageLoader, LoaderStats};
use dalle_data::order::Sharding;
use dalle_model::rerank::{RerankConfig, Reranker, contrastive_loss, cosine_similarities};
use dalle_precision::Autocast;
use serde::Serialize;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Validation images embedded per pass.
const EVAL_CHUNK: usize = 64;

/// The reranker's full config: the job's architecture plus what the
/// tokenizer and the image size fix.
pub fn rerank_config(job: &JobConfig, text_vocab: usize) -> RerankConfig {
    RerankConfig {
        arch: job.rerank.model.clone(),
        text_vocab: text_vocab as i64,
        text_len: job.text.text_len as i64,
        image_size: job.dvae.model.image_size,
    }
}

/// The loss of the global batch as this rank backpropagates it.
pub struct GlobalLoss {
    /// What to call `backward` on: this rank's share of the global loss,
    /// scaled so that averaging gradients weighted by sample counts (as
    /// [`DataParallel::update`] does) gives the global loss's
    /// gradient.
    pub surrogate: Tensor,
    /// The global batch's loss (the same on every rank), detached.
    pub loss: Tensor,
    /// Share of the global batch's images whose own caption scores highest.
    pub accuracy: Tensor,
    /// Pairs in the global batch.
    pub total: usize,
}

/// The contrastive loss of every rank's pairs together. `images` and
/// `captions` are this rank's embeddings `(n, E)`, with gradients.
///
/// Every rank computes the same global loss, in which only its own rows are
/// live. The gradient of that loss through its own rows is this rank's part
/// of the true gradient; [`DataParallel::update`] weighs rank
/// `r` by `n_r / N`, so the surrogate is scaled by `N / n_r` to undo it. The
/// logit scale enters every rank's loss directly, not through its rows, so
/// its gradient would be counted on every rank: each rank lets through only
/// its `n_r / N` share of it.
pub fn global_batch_loss(
    model: &Reranker,
    images: &Tensor,
    captions: &Tensor,
    ddp: &mut DataParallel,
) -> Result<GlobalLoss> {
    let n = images.size()[0];
    let (all_images, offset) = ddp.gather_rows(images)?;
    let (all_captions, _) = ddp.gather_rows(captions)?;
    let total = all_images.size()[0];
    let live = |all: &Tensor, mine: &Tensor| {
        let off = offset as i64;
        Tensor::cat(
            &[
                all.narrow(0, 0, off),
                mine.shallow_clone(),
                all.narrow(0, off + n, total - off - n),
            ],
            0,
        )
    };
    let (all_images, all_captions) = (live(&all_images, images), live(&all_captions, captions));
    let share = n as f64 / total.max(1) as f64;
    let scale = model.logit_scale();
    let scale = scale.detach() + (&scale - scale.detach()) * share;
    let logits = cosine_similarities(&all_images, &all_captions) * scale;
    let loss = contrastive_loss(&logits);
    let surrogate = if n == 0 {
        loss.zeros_like()
    } else {
        &loss / share
    };
    let accuracy = tch::no_grad(|| own_caption_wins(&logits));
    Ok(GlobalLoss {
        surrogate,
        loss: loss.detach(),
        accuracy,
        total: total as usize,
    })
}

/// Share of rows of a square similarity matrix whose diagonal entry is the
/// row's highest. Ties count as wins: a caption repeated in the set (the
/// same words for two images) embeds identically, and either is right.
fn own_caption_wins(similarity: &Tensor) -> Tensor {
    let own = similarity.diagonal(0, 0, 1);
    let best = similarity.amax(&[1i64][..], false);
    own.ge_tensor(&(best - 1e-5))
        .to_kind(Kind::Float)
        .mean(Kind::Float)
}

/// What one step reports.
#[derive(Clone, Copy, Debug, Default)]
struct StepMetrics {
    loss: f64,
    accuracy: f64,
    grad_norm: f64,
    pairs: usize,
    data_wait: Duration,
    comm: Duration,
    step_time: Duration,
}

/// What the host knows of a step while its scalars wait on the device.
struct RerankHostMetrics {
    data_wait: Duration,
    comm: Duration,
    step_time: Duration,
}

/// One log line of the rerank stage.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RerankLog {
    pub step: u64,
    /// The contrastive loss of the global batch, nats.
    pub loss: f64,
    /// Share of the global batch's images whose own caption ranks first.
    pub accuracy: f64,
    /// The learned logit scale at the window's end.
    pub logit_scale: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub pairs_per_s: f64,
    /// Share of wall time the step loop waited for the loader (0..1).
    pub data_wait: f64,
    /// Share of wall time spent communicating with other ranks (0..1).
    pub comm: f64,
}

impl fmt::Display for RerankLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "step {} | loss {:.4} | in-batch top-1 {:.1}% | scale {:.1} | grad norm {:.3} | \
             lr {:.2e} | {:.1} pairs/s | data wait {:.1}%",
            self.step,
            self.loss,
            100.0 * self.accuracy,
            self.logit_scale,
            self.grad_norm,
            self.lr,
            self.pairs_per_s,
            100.0 * self.data_wait
        )?;
        if self.comm > 0.0 {
            write!(f, " | comm {:.1}%", 100.0 * self.comm)?;
        }
        Ok(())
    }
}

/// Accumulates step metrics between two log lines.
#[derive(Default)]
struct Window {
    steps: u64,
    sum: StepMetrics,
}

impl Window {
    fn add(&mut self, m: StepMetrics) {
        self.steps += 1;
        let s = &mut self.sum;
        s.loss += m.loss;
        s.accuracy += m.accuracy;
        s.grad_norm += m.grad_norm;
        s.pairs += m.pairs;
        s.data_wait += m.data_wait;
        s.comm += m.comm;
        s.step_time += m.step_time;
    }

    fn finish(&mut self, step: u64, lr: f64, logit_scale: f64) -> RerankLog {
        let n = self.steps.max(1) as f64;
        let wall = self.sum.step_time.as_secs_f64().max(1e-9);
        let s = &self.sum;
        let line = RerankLog {
            step,
            loss: s.loss / n,
            accuracy: s.accuracy / n,
            logit_scale,
            grad_norm: s.grad_norm / n,
            lr,
            pairs_per_s: s.pairs as f64 / wall,
            data_wait: s.data_wait.as_secs_f64() / wall,
            comm: s.comm.as_secs_f64() / wall,
        };
        *self = Self::default();
        line
    }
}

/// Retrieval on the validation set: every held-out image against every
/// held-out caption (over all ranks).
#[derive(Clone, Debug, Serialize)]
pub struct RerankValidation {
    /// Always "validation".
    pub kind: &'static str,
    pub step: u64,
    pub val_samples: usize,
    /// The contrastive loss of the whole set as one batch, nats.
    pub val_loss: f64,
    /// Share of held-out images whose own caption scores highest of all
    /// the set's captions.
    pub val_top1: f64,
    /// What guessing would score: 1 / samples.
    pub val_chance: f64,
}

impl fmt::Display for RerankValidation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "step {} | validation | loss {:.4} | top-1 {:.1}% of {} captions (chance {:.1}%)",
            self.step,
            self.val_loss,
            100.0 * self.val_top1,
            self.val_samples,
            100.0 * self.val_chance
        )
    }
}

/// The validation set as reranker inputs, encoded once.
struct HeldOutPairs {
    held: HeldOut,
    chunks: Vec<(Tensor, Tensor)>,
}

impl HeldOutPairs {
    fn encode(held: HeldOut, captions: &mut CaptionEncoder, device: Device) -> Result<Self> {
        held.expect_images()?;
        let chunks = held
            .chunks(EVAL_CHUNK)
            .map(|range| {
                let batch = held.set.batch(range);
                let (ids, _) = captions.encode(&batch, 0)?;
                Ok((batch_tensor(&batch, device), ids.to_device(device)))
            })
            .collect::<Result<_>>()?;
        Ok(Self { held, chunks })
    }
}

/// Evaluates retrieval after `step` steps; the figures do not depend on
/// how the set is split across ranks.
fn evaluate(
    model: &Reranker,
    set: &HeldOutPairs,
    ddp: &mut DataParallel,
    step: u64,
) -> Result<RerankValidation> {
    let device = model.device();
    let (images, captions) = tch::no_grad(|| -> Result<(Tensor, Tensor)> {
        let (mut images, mut captions) = (Vec::new(), Vec::new());
        for (pixels, ids) in &set.chunks {
            images.push(model.embed_images(pixels)?);
            captions.push(model.embed_captions(ids)?);
        }
        let e = model.config().arch.embed_dim;
        let empty = || Tensor::zeros([0, e], (Kind::Float, device));
        let cat = |parts: Vec<Tensor>| {
            if parts.is_empty() {
                empty()
            } else {
                Tensor::cat(&parts, 0)
            }
        };
        Ok((cat(images), cat(captions)))
    })?;
    let (images, _) = ddp.gather_rows(&images)?;
    let (captions, _) = ddp.gather_rows(&captions)?;
    ddp.take_comm_time();
    let samples = images.size()[0] as usize;
    let (loss, top1) = tch::no_grad(|| {
        let logits = model.logits(&images, &captions);
        (
            contrastive_loss(&logits).double_value(&[]),
            own_caption_wins(&logits).double_value(&[]),
        )
    });
    if !loss.is_finite() {
        return Err(TrainError::Diverged { step, loss });
    }
    Ok(RerankValidation {
        kind: "validation",
        step,
        val_samples: samples,
        val_loss: loss,
        val_top1: top1,
        val_chance: 1.0 / samples.max(1) as f64,
    })
}

#[derive(Debug)]
pub struct RerankTrainReport {
    pub logs: Vec<RerankLog>,
    pub validation: Vec<RerankValidation>,
    pub weights: PathBuf,
    pub loader: LoaderStats,
}

/// Trains the reranker as configured by `job` on this rank's slice of
/// every global batch, calling `on_progress` with every log line and
/// held-out evaluation. Only rank 0 writes files.
pub fn train(
    job: &JobConfig,
    ddp: &mut DataParallel,
    mut on_progress: impl FnMut(Progress<'_, RerankLog, RerankValidation>),
) -> Result<RerankTrainReport> {
    let cfg = &job.rerank.train;
    let device = runtime_device(job)?;
    let precision = job.run.precision_on(device);
    let tokenizer = load_tokenizer(job)?;
    let config = rerank_config(job, tokenizer.vocab_size());
    let data = job.data_location()?;
    let model = seeded(job.run.seed, || Reranker::new(config.clone(), device))?;
    let params = model.named_parameters();
    ddp.share_initial_parameters(&params)?;
    let mut optimizer = ddp.optimizer(model.named_parameters(), cfg.adamw, job.run.sharding)?;
    let plan = StagePlan {
        name: "rerank",
        steps: cfg.steps,
        log_every: cfg.log_every,
        save_every: cfg.save_every,
        weights: job.rerank_weights_path(),
    };
    let tokenizer_json = tokenizer
        .to_json()
        .map_err(|e| TrainError::Config(e.to_string()))?
        .into_bytes();
    let variables = model.var_store().variables();
    let mut run = StageRun::resume(
        job,
        plan,
        ddp,
        Some(tokenizer_json),
        &variables,
        &mut optimizer,
    )?;
    let first_step = run.first_step();
    let image_size = config.image_size as u32;
    let mut loader = ImageLoader::start(
        &data,
        loader_config(
            job,
            image_size,
            Sharding {
                global_batch: cfg.batch_size,
                rank: ddp.rank(),
                world: ddp.world_size(),
            },
        ),
        run.cursor(),
    )?;
    if loader.payload() != Payload::EncodedImage {
        return Err(TrainError::Config(format!(
            "{} holds {}; the reranker trains on images and their captions (data.url)",
            data.url,
            loader.payload()
        )));
    }
    // Captions as the transformer is given them at sampling time: whole,
    // no BPE or caption dropout.
    let mut captions = CaptionEncoder::for_evaluation(job, &tokenizer);
    let held = match HeldOut::open(
        job,
        &data,
        image_size,
        cfg.eval_every,
        (first_step, cfg.steps),
        ddp,
    )? {
        Some(held) => Some(HeldOutPairs::encode(held, &mut captions, device)?),
        None => None,
    };
    let parameters: i64 = params.iter().map(|(_, t)| t.numel() as i64).sum();
    tracing::info!(
        data = %data.url, row_groups = loader.units(), ?device, parameters, first_step,
        precision = precision.name(),
        "training the reranker for {} steps at batch {}", cfg.steps, cfg.batch_size
    );
    let (mut window, mut epoch) = (Window::default(), EpochSummary::default());
    let (mut logs, mut validations) = (Vec::new(), Vec::new());
    let mut pending = Pending::default();
    let mut last_loss = f64::NAN;

    for step in first_step..cfg.steps {
        let started = Instant::now();
        let batch = next_nonempty(&mut loader, step, &mut epoch)?;
        let data_wait = started.elapsed();
        let (ids, _) = captions.encode(&batch, step)?;
        let pixels = batch_tensor(&batch, device);

        let lr = cfg.lr.at(step);
        tch::manual_seed(step_seed(job.run.seed, ddp.rank(), step));
        optimizer.zero_grad();
        ddp.begin_step(&mut optimizer, batch.len(), 1)?;
        // Forward and backward in the run's precision (the similarities and
        // the loss in fp32, see `cosine_similarities`); the region ends
        // before the optimizer steps.
        let global = {
            let _autocast = Autocast::enter(device, precision);
            let images = model.embed_images(&pixels)?;
            let texts = model.embed_captions(&ids)?;
            let global = global_batch_loss(&model, &images, &texts, ddp)?;
            global.surrogate.backward();
            global
        };
        let update = ddp.update(&mut optimizer, batch.len(), lr, cfg.grad_clip)?;
        ddp.verify_every(step + 1, job.run.verify_every, &params)?;

        // The loss, the in-batch accuracy and the norm stay on the device
        // until a step that reads them (crate::deferred). The first two are
        // of the global batch already, the same on every rank: they go as
        // global values, not as means to average.
        let scalars = Tensor::stack(&[&global.loss, &global.accuracy, &update.grad_norm], 0);
        let nothing_local = Tensor::zeros([0], (Kind::Float, device));
        pending.push(
            step,
            &nothing_local,
            &scalars,
            batch.len(),
            RerankHostMetrics {
                data_wait,
                comm: ddp.take_comm_time(),
                step_time: started.elapsed(),
            },
        );
        let done = step + 1;
        if run.reads_due(done) {
            for ready in pending.drain(ddp)? {
                let [loss, accuracy, grad_norm] =
                    <[f64; 3]>::try_from(ready.means).expect("the loss, accuracy and norm");
                let h = ready.host;
                window.add(StepMetrics {
                    loss,
                    accuracy,
                    grad_norm,
                    pairs: ready.samples,
                    data_wait: h.data_wait,
                    comm: h.comm,
                    step_time: h.step_time,
                });
                last_loss = loss;
            }
        }
        let timing = StepTiming::since(started, data_wait);
        let done = step + 1;
        if run.log_due(done) {
            let scale = model.logit_scale().double_value(&[]);
            let line = window.finish(done, lr, scale);
            run.log(&line)?;
            on_progress(Progress::Line(&line));
            logs.push(line);
        }
        if let Some(held) = held.as_ref().filter(|h| h.held.due(done)) {
            let line = {
                let _autocast = Autocast::enter(device, precision);
                evaluate(&model, held, ddp, done)?
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
        weights = %weights.display(), seen = stats.seen, skipped = stats.skipped(),
        held_out = stats.held_out, "reranker training done"
    );
    Ok(RerankTrainReport {
        logs,
        validation: validations,
        weights,
        loader: stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_with_a_repeated_caption_count_as_wins() {
        let s = Tensor::from_slice(&[0.9f32, 0.9, 0.1, 0.2, 0.8, 0.7, 0.5, 0.6, 0.4]).view([3, 3]);
        // Row 0 ties its duplicate, row 1 wins, row 2 loses.
        let wins = own_caption_wins(&s).double_value(&[]);
        assert!((wins - 2.0 / 3.0).abs() < 1e-6, "{wins}");
    }

    #[test]
    fn log_lines_say_what_they_measure() {
        let line = RerankLog {
            step: 10,
            loss: 1.5,
            accuracy: 0.5,
            logit_scale: 14.3,
            pairs_per_s: 100.0,
            data_wait: 0.1,
            ..Default::default()
        };
        let text = line.to_string();
        assert!(
            text.contains("step 10") && text.contains("top-1 50.0%") && text.contains("pairs/s")
        );
        let v = RerankValidation {
            kind: "validation",
            step: 10,
            val_samples: 64,
            val_loss: 2.0,
            val_top1: 0.25,
            val_chance: 1.0 / 64.0,
        };
        assert!(v.to_string().contains("top-1 25.0% of 64 captions"), "{v}");
        assert_eq!(serde_json::to_value(&v).unwrap()["kind"], "validation");
    }
}
