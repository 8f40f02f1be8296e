//! The stage-2 training loop (one process): captions through the BPE
//! tokenizer (with caption dropout), image tokens from pre-tokenized data
//! or from the frozen dVAE, the weighted text/image cross-entropy, gradient
//! accumulation over micro-batches, clipping, AdamW under warm-up + cosine,
//! a log line per window (also appended to `gpt-metrics.jsonl`), and the
//! held-out loss every `eval_every` steps (the same file, marked
//! `"kind": "validation"`).

use crate::config::JobConfig;
use crate::ddp::{DataParallel, backward_passes, seeded, step_seed};
use crate::deferred::Pending;
use crate::feed::{EpochSummary, batch_tensor, loader_config, next_nonempty, runtime_device};
use crate::flops::{self, Utilisation};
use crate::metrics::{GptLog, GptStepMetrics, GptWindow, Progress};
use crate::stage_run::{StagePlan, StageRun, StepTiming};
use crate::validation::{self, GptHeldOut, GptValidation, HeldOut};
use crate::{Result, TrainError};
use dalle_data::columns::Payload;
use dalle_data::loader::{Batch, ImageLoader, LoaderStats};
use dalle_data::order::Sharding;
use dalle_model::dvae::{Dvae, DvaeConfig};
use dalle_model::gpt::{Gpt, GptConfig};
use dalle_model::text::TextTokenizer;
use dalle_precision::Autocast;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// The transformer's full config: the job's architecture plus what the
/// tokenizer and the dVAE fix.
pub fn gpt_config(job: &JobConfig, tokenizer: &TextTokenizer, dvae: &DvaeConfig) -> GptConfig {
    GptConfig {
        arch: job.gpt.model.clone(),
        text_vocab: tokenizer.vocab_size() as i64,
        text_len: job.text.text_len as i64,
        image_vocab: dvae.vocab_size,
        image_grid: dvae.grid_size(),
    }
}

/// Reads the job's tokenizer, naming the command that writes it.
pub fn load_tokenizer(job: &JobConfig) -> Result<TextTokenizer> {
    let path = job.tokenizer_path();
    if !path.is_file() {
        return Err(TrainError::Config(format!(
            "no caption tokenizer at {}: run `dalle text train-tokenizer` first",
            path.display()
        )));
    }
    Ok(TextTokenizer::load(&path)?)
}

/// Reads the job's dVAE config, naming the command that writes the weights.
pub fn load_dvae_config(job: &JobConfig) -> Result<DvaeConfig> {
    let path = job.dvae_weights_path();
    if !path.is_file() {
        return Err(TrainError::Config(format!(
            "no dVAE weights at {}: stage 2 needs the trained dVAE (`dalle dvae train`)",
            path.display()
        )));
    }
    Ok(Dvae::read_config(&path)?)
}

/// Turns a batch's captions into text ids: BPE (with dropout, if set),
/// per-position padding, and caption dropout drawn from a generator seeded
/// by (run seed, step, sample key), so a resumed run drops the same
/// captions, and so does a run on any number of workers.
pub struct CaptionEncoder {
    tokenizer: TextTokenizer,
    text_len: usize,
    null: Vec<i64>,
    dropout: f64,
    seed: u64,
    warned: bool,
}

impl CaptionEncoder {
    pub fn new(job: &JobConfig, tokenizer: &TextTokenizer) -> Result<Self> {
        let bpe_dropout = job.text.bpe_dropout;
        let tokenizer = if bpe_dropout > 0.0 {
            tokenizer.with_dropout(bpe_dropout)?
        } else {
            tokenizer.clone()
        };
        let text_len = job.text.text_len;
        Ok(Self {
            null: dalle_model::text::null_caption(tokenizer.vocab_size(), text_len),
            tokenizer,
            text_len,
            dropout: job.gpt.train.caption_dropout,
            seed: job.run.seed,
            warned: false,
        })
    }

    /// The encoder of held-out captions: no BPE dropout, no caption
    /// dropout, so evaluation sees every caption as it is.
    pub fn for_evaluation(job: &JobConfig, tokenizer: &TextTokenizer) -> Self {
        let text_len = job.text.text_len;
        Self {
            null: dalle_model::text::null_caption(tokenizer.vocab_size(), text_len),
            tokenizer: tokenizer.clone(),
            text_len,
            dropout: 0.0,
            seed: job.run.seed,
            warned: false,
        }
    }

    /// Whether the caption of sample `key` is dropped at `step`.
    fn drops(&self, step: u64, key: &str) -> bool {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x5EED_CA97_10D5);
        rng.set_stream(step);
        rng.set_word_pos(u128::from(hasher.finish()) << 4);
        rng.random::<f64>() < self.dropout
    }

    /// `(B, T)` ids for the batch's captions, and how many were truncated.
    pub fn encode(&mut self, batch: &Batch, step: u64) -> Result<(Tensor, usize)> {
        let mut ids = Vec::with_capacity(batch.len() * self.text_len);
        let mut truncated = 0;
        for (key, caption) in batch.keys.iter().zip(&batch.captions) {
            let encoded = self.tokenizer.encode(caption, self.text_len)?;
            if encoded.truncated {
                truncated += 1;
                if !self.warned {
                    self.warned = true;
                    tracing::warn!(
                        key = %key,
                        "caption longer than text.text_len = {}, truncated (counted in the log \
                         lines from now on)",
                        self.text_len
                    );
                }
            }
            if self.dropout > 0.0 && self.drops(step, key) {
                ids.extend_from_slice(&self.null);
            } else {
                ids.extend_from_slice(&encoded.ids);
            }
        }
        let ids = Tensor::from_slice(&ids).view([batch.len() as i64, self.text_len as i64]);
        Ok((ids, truncated))
    }
}

/// Image tokens of a batch: its pre-tokenized grids, or its images encoded
/// by the frozen dVAE.
pub struct ImageTokens {
    dvae: Option<Dvae>,
    image_len: usize,
    /// The dVAE's codebook size: every pre-tokenized token must be below.
    image_vocab: i64,
    data: String,
}

impl ImageTokens {
    pub fn new(job: &JobConfig, payload: Payload, device: Device, data: &str) -> Result<Self> {
        let dvae_config = load_dvae_config(job)?;
        let image_len = (dvae_config.grid_size() * dvae_config.grid_size()) as usize;
        let dvae = match payload {
            Payload::EncodedImage => {
                tracing::info!(
                    data,
                    "the data holds images: encoding them with the frozen dVAE on the fly \
                     (pre-tokenize with `dalle data tokenize` to skip this)"
                );
                let path = job.dvae_weights_path();
                Some(crate::ddp::exclusive(|| Dvae::load(&path, device))?)
            }
            Payload::Tokens { len } if len == image_len => None,
            Payload::Tokens { len } => {
                return Err(TrainError::Config(format!(
                    "{data} holds image-token grids of {len} tokens, but the dVAE at {} makes \
                     grids of {image_len} ({}×{}): tokenized with another dVAE?",
                    job.dvae_weights_path().display(),
                    dvae_config.grid_size(),
                    dvae_config.grid_size()
                )));
            }
        };
        Ok(Self {
            dvae,
            image_len,
            image_vocab: dvae_config.vocab_size,
            data: data.to_string(),
        })
    }

    /// `(B, N)` int64 tokens on `device`.
    pub fn of(&self, batch: &Batch, device: Device) -> Result<Tensor> {
        let n = batch.len() as i64;
        match &self.dvae {
            Some(dvae) => Ok(dvae.encode(&batch_tensor(batch, device))?.view([n, -1])),
            None => {
                if batch.token_len != self.image_len {
                    return Err(TrainError::Config(format!(
                        "{}: a batch holds {} tokens per sample, expected {}",
                        self.data, batch.token_len, self.image_len
                    )));
                }
                let tokens: Vec<i64> = batch.tokens.iter().map(|&t| i64::from(t)).collect();
                // Checked here, on the host, where they are read: the model
                // does not read ids back from the device every step.
                if let Some(at) = tokens.iter().position(|&t| t >= self.image_vocab) {
                    let key = &batch.keys[at / self.image_len];
                    return Err(TrainError::Config(format!(
                        "{}: sample {key} holds image token {}, outside the dVAE's codebook of \
                         {}",
                        self.data, tokens[at], self.image_vocab
                    )));
                }
                Ok(Tensor::from_slice(&tokens).view([n, -1]).to_device(device))
            }
        }
    }
}

/// Backward passes over `micro`-sample slices of a batch, each loss scaled
/// by its share of the batch, so the accumulated gradients are those of the
/// whole batch's mean loss. Returns the batch's (loss, text, image) means.
pub fn accumulate_gradients(
    model: &Gpt,
    text: &Tensor,
    image: &Tensor,
    micro: usize,
    text_weight: f64,
) -> Result<Tensor> {
    accumulate_gradients_checkpointed(model, text, image, micro, text_weight, false)
}

/// [`accumulate_gradients`], each micro-batch's transformer blocks
/// recomputed in backward when `checkpointing` (`gpt.train.
/// activation_checkpointing`; see [`Gpt::loss_backward`]): the same
/// gradients, for a fraction of the activation memory.
pub fn accumulate_gradients_checkpointed(
    model: &Gpt,
    text: &Tensor,
    image: &Tensor,
    micro: usize,
    text_weight: f64,
    checkpointing: bool,
) -> Result<Tensor> {
    let n = text.size()[0];
    let mut parts = Tensor::zeros([3], (Kind::Float, model.device()));
    for first in (0..n).step_by(micro.max(1)) {
        let m = (n - first).min(micro as i64);
        let share = m as f64 / n as f64;
        let loss = model.loss_backward(
            &text.narrow(0, first, m),
            &image.narrow(0, first, m),
            text_weight,
            share,
            checkpointing,
        )?;
        parts += Tensor::stack(&[loss.loss, loss.text, loss.image], 0) * share;
    }
    Ok(parts)
}

#[derive(Debug)]
pub struct GptTrainReport {
    pub logs: Vec<GptLog>,
    /// Each evaluation on the validation set.
    pub validation: Vec<GptValidation>,
    pub weights: PathBuf,
    pub loader: LoaderStats,
    pub truncated_captions: usize,
}

/// What the host knows of a step whose losses are still on the device.
struct GptHostMetrics {
    truncated_captions: usize,
    data_wait: Duration,
    comm: Duration,
    step_time: Duration,
}

/// Trains the transformer as configured by `job` on this rank's slice of
/// every global batch (all of it with [`DataParallel::solo`]), calling
/// `on_progress` with every log line and every held-out evaluation. Only
/// rank 0 writes files.
pub fn train(
    job: &JobConfig,
    ddp: &mut DataParallel,
    mut on_progress: impl FnMut(Progress<'_, GptLog, GptValidation>),
) -> Result<GptTrainReport> {
    let cfg = &job.gpt.train;
    let device = runtime_device(job)?;
    let precision = job.run.precision_on(device);
    let tokenizer = load_tokenizer(job)?;
    let dvae_config = load_dvae_config(job)?;
    let config = gpt_config(job, &tokenizer, &dvae_config);
    let data_url = job.gpt_data_url();
    let data = dalle_store::Location::parse(&data_url, &job.store)
        .map_err(|e| TrainError::Config(e.to_string()))?;
    let model = seeded(job.run.seed, || Gpt::new(config.clone(), device))?;
    let params = model.named_parameters();
    ddp.share_initial_parameters(&params)?;
    let mut optimizer = ddp.optimizer(model.named_parameters(), cfg.adamw, job.run.sharding)?;
    let plan = StagePlan {
        name: "gpt",
        steps: cfg.steps,
        log_every: cfg.log_every,
        save_every: cfg.save_every,
        weights: job.gpt_weights_path(),
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
    let mut loader = ImageLoader::start(
        &data,
        loader_config(
            job,
            dvae_config.image_size as u32,
            Sharding {
                global_batch: cfg.batch_size,
                rank: ddp.rank(),
                world: ddp.world_size(),
            },
        ),
        run.cursor(),
    )?;
    let images = ImageTokens::new(job, loader.payload(), device, &data.url)?;
    let mut captions = CaptionEncoder::new(job, &tokenizer)?;
    let image_size = dvae_config.image_size as u32;
    let steps = (first_step, cfg.steps);
    let held = match HeldOut::open(job, &data, image_size, cfg.eval_every, steps, ddp)? {
        Some(held) => {
            // A validation dataset of its own may hold images where the
            // training data holds tokens (or the other way round).
            let own_images;
            let held_images = if held.set.payload == loader.payload() {
                &images
            } else {
                own_images = ImageTokens::new(job, held.set.payload, device, &held.url)?;
                &own_images
            };
            let mut encoder = CaptionEncoder::for_evaluation(job, &tokenizer);
            let chunk = cfg.micro_batch();
            Some(GptHeldOut::encode(
                held,
                &mut encoder,
                held_images,
                chunk,
                device,
            )?)
        }
        None => None,
    };
    let parameters: i64 = params.iter().map(|(_, t)| t.numel() as i64).sum();
    tracing::info!(
        data = %data.url, row_groups = loader.units(), ?device, parameters, first_step,
        text_vocab = config.text_vocab, image_vocab = config.image_vocab,
        seq_len = config.seq_len(),
        checkpointing = cfg.activation_checkpointing, precision = precision.name(),
        "training the transformer for {} steps at batch {} (micro-batch {})",
        cfg.steps, cfg.batch_size, cfg.micro_batch()
    );
    let mut window = GptWindow::default();
    let mut epoch = EpochSummary::default();
    let mut logs = Vec::new();
    let mut validations = Vec::new();
    let mut truncated_total = 0;
    let positions_per_sample = (config.text_len + config.image_len()) as usize;
    let flops_per_token = flops::gpt_per_token(
        flops::gpt_non_embedding(&params),
        config.arch.depth as u64,
        config.arch.dim as u64,
        positions_per_sample as u64,
    );
    let peak = flops::job_peak(job);

    let mut pending = Pending::default();
    // The loss the step hook reports: that of the last step read.
    let mut last_loss = f64::NAN;
    for step in first_step..cfg.steps {
        let started = Instant::now();
        let batch = next_nonempty(&mut loader, step, &mut epoch)?;
        let data_wait = started.elapsed();
        let (text, truncated) = captions.encode(&batch, step)?;
        let text = text.to_device(device);
        let image = images.of(&batch, device)?;
        truncated_total += truncated;

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
        let parts = {
            let _autocast = Autocast::enter(device, precision);
            accumulate_gradients_checkpointed(
                &model,
                &text,
                &image,
                cfg.micro_batch(),
                cfg.text_loss_weight,
                cfg.activation_checkpointing,
            )?
        };
        let update = ddp.update(&mut optimizer, batch.len(), lr, cfg.grad_clip)?;
        ddp.verify_every(step + 1, job.run.verify_every, &params)?;

        // The losses and the norm stay on the device until a step that
        // reads them (crate::deferred); what the host knows waits with them.
        pending.push(
            step,
            &parts,
            &update.grad_norm,
            batch.len(),
            GptHostMetrics {
                truncated_captions: truncated,
                data_wait,
                comm: ddp.take_comm_time(),
                step_time: started.elapsed(),
            },
        );
        let done = step + 1;
        if run.reads_due(done) {
            for ready in pending.drain(ddp)? {
                let [loss, text_loss, image_loss, grad_norm] =
                    <[f64; 4]>::try_from(ready.means).expect("three means and the norm");
                let h = ready.host;
                window.add(GptStepMetrics {
                    loss,
                    text_loss,
                    image_loss,
                    grad_norm,
                    images: ready.samples,
                    tokens: ready.samples * positions_per_sample,
                    truncated_captions: h.truncated_captions,
                    data_wait: h.data_wait,
                    comm: h.comm,
                    step_time: h.step_time,
                });
                last_loss = loss;
            }
        }
        let timing = StepTiming::since(started, data_wait);
        if run.log_due(done) {
            let mut line = window.finish(done, lr);
            line.flops = Utilisation::of(flops_per_token * line.tokens_per_s, peak);
            run.log(&line)?;
            on_progress(Progress::Line(&line));
            logs.push(line);
        }
        if let Some(held) = held.as_ref().filter(|h| h.held.due(done)) {
            let weight = cfg.text_loss_weight;
            let line = {
                let _autocast = Autocast::enter(device, precision);
                validation::evaluate_gpt(&model, held, weight, ddp, done)?
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
        held_out = stats.held_out, truncated_captions = truncated_total,
        "transformer training done"
    );
    Ok(GptTrainReport {
        logs,
        validation: validations,
        weights,
        loader: stats,
        truncated_captions: truncated_total,
    })
}
