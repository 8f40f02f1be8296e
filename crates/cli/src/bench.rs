//! `dalle bench …`: throughput benchmarks that print one JSON line, so a
//! script can set them beside a reference measured in the same run.

mod memory;

use anyhow::Result;
use clap::Subcommand;
use dalle_model::dvae::{Dvae, Objective};
use dalle_model::gpt::sample::{Decoding, sample_decoding};
use dalle_model::gpt::{Gpt, GptConfig};
use dalle_precision::Autocast;
use dalle_train::config::JobConfig;
use dalle_train::optim::AdamW;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

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
    /// no data loading): images/s and peak resident memory, with each
    /// group recomputed in backward when `dvae.train.activation_checkpointing`.
    Dvae {
        #[arg(long, default_value_t = 3)]
        warmup: u64,
        #[arg(long, default_value_t = 20)]
        steps: u64,
    },
    /// Stage-2 transformer training steps on fixed random captions and
    /// image tokens (model compute only, no data loading, no tokenizer or
    /// dVAE needed): tokens/s, steps/s and peak resident memory. The model
    /// is `[gpt.model]` with `[text] text_len`; the vocabularies and the
    /// image grid default to the job's (`text.vocab_size`,
    /// `dvae.model.vocab_size`, the dVAE's grid). The whole batch goes in
    /// one pass (`gpt.train.micro_batch` is not used); blocks are recomputed
    /// in backward when `gpt.train.activation_checkpointing`.
    Gpt {
        #[arg(long, default_value_t = 3)]
        warmup: u64,
        #[arg(long, default_value_t = 10)]
        steps: u64,
        #[command(flatten)]
        shape: GptShape,
        /// Samples per step (default `gpt.train.batch_size`).
        #[arg(long)]
        batch: Option<i64>,
    },
    /// Sampling image tokens with the KV cache against recomputing the
    /// whole prefix for every token, on a randomly initialised
    /// transformer (timing only): image tokens/s, images/s and the
    /// speed-up. Sampling settings are the job's `[gpt.sample]`
    /// (guidance ≠ 1 decodes a null caption beside each caption).
    Sample {
        #[command(flatten)]
        shape: GptShape,
        /// Images sampled at once.
        #[arg(long, default_value_t = 1)]
        batch: i64,
        /// Time the cached run this many times (median reported).
        #[arg(long, default_value_t = 3)]
        cache_runs: usize,
        /// Time only the cached run.
        #[arg(long)]
        skip_no_cache: bool,
    },
    /// Peak resident memory per rank of transformer training (the job's
    /// `[gpt.model]`, random tokens) for each world size of `--worlds`,
    /// unsharded and with `run.sharding = "optimizer"`: one process per
    /// rank on a TCP ring over loopback, the ratio to unsharded in the same
    /// run.
    Memory {
        /// World sizes to run, e.g. `2,4`.
        #[arg(long, value_delimiter = ',', default_values_t = [2, 4])]
        worlds: Vec<usize>,
        #[arg(long, default_value_t = 2)]
        steps: u64,
        /// Samples per rank per step.
        #[arg(long, default_value_t = 1)]
        batch: i64,
    },
    /// One rank of `bench memory` (started by it).
    #[command(hide = true)]
    MemoryRank {
        #[arg(long)]
        rank: usize,
        #[arg(long)]
        world: usize,
        #[arg(long, value_parser = memory::parse_sharding)]
        sharding: dalle_train::config::StateSharding,
        #[arg(long)]
        steps: u64,
        #[arg(long)]
        batch: i64,
    },
}

/// The data-given half of a transformer's config (the job gives the rest).
#[derive(clap::Args, Default)]
pub struct GptShape {
    /// Text vocabulary (BPE ids; default `text.vocab_size`).
    #[arg(long)]
    text_vocab: Option<i64>,
    /// Image codebook size (default `dvae.model.vocab_size`).
    #[arg(long)]
    image_vocab: Option<i64>,
    /// Side of the image-token grid (default: the job's dVAE grid).
    #[arg(long)]
    image_grid: Option<i64>,
}

impl GptShape {
    fn config(&self, job: &JobConfig) -> Result<GptConfig> {
        let config = GptConfig {
            arch: job.gpt.model.clone(),
            text_vocab: self.text_vocab.unwrap_or(job.text.vocab_size as i64),
            text_len: job.text.text_len as i64,
            image_vocab: self.image_vocab.unwrap_or(job.dvae.model.vocab_size),
            image_grid: self.image_grid.unwrap_or(job.dvae.model.grid_size()),
        };
        config.validate()?;
        Ok(config)
    }
}

fn parameter_count(model: &Gpt) -> i64 {
    model
        .named_parameters()
        .iter()
        .map(|(_, t)| t.numel() as i64)
        .sum()
}

/// Seconds spent in each part of the timed training steps.
#[derive(Default)]
struct Phases {
    forward: Duration,
    backward: Duration,
    clip: Duration,
    optimizer: Duration,
}

fn bench_gpt(
    job: &JobConfig,
    shape: &GptShape,
    batch: Option<i64>,
    warmup: u64,
    steps: u64,
) -> Result<()> {
    anyhow::ensure!(steps > 0, "--steps must be positive");
    let device = dalle_train::feed::runtime_device(job)?;
    let precision = job.run.precision_on(device);
    let train = &job.gpt.train;
    let config = shape.config(job)?;
    let batch = batch.unwrap_or(train.batch_size as i64);
    anyhow::ensure!(batch > 0, "the batch must be positive");
    tch::manual_seed(job.run.seed as i64);
    let model = Gpt::new(config.clone(), device)?;
    let mut opt = AdamW::new(model.named_parameters(), train.adamw);
    // Every text target (BPE ids and per-position pads) and image token.
    let text = Tensor::randint(
        config.text_targets(),
        [batch, config.text_len],
        (Kind::Int64, device),
    );
    let image = Tensor::randint(
        config.image_vocab,
        [batch, config.image_len()],
        (Kind::Int64, device),
    );
    // The phase split is only meaningful where ops run synchronously.
    let mut phases = Phases::default();
    let mut step = |phases: &mut Phases| -> Result<f64> {
        let t0 = Instant::now();
        opt.zero_grad();
        // Forward and backward in `run.precision`, as the training loop.
        let autocast = Autocast::enter(device, precision);
        // With activation checkpointing, forward and backward interleave
        // (blocks are recomputed in backward): timed as one.
        let (loss, t1) = if train.activation_checkpointing {
            let loss = model.loss_backward(&text, &image, train.text_loss_weight, 1.0, true)?;
            (loss, None)
        } else {
            let loss = model.loss(&text, &image, train.text_loss_weight, true)?;
            let t1 = Instant::now();
            loss.loss.backward();
            (loss, Some(t1))
        };
        drop(autocast);
        let t2 = Instant::now();
        let t1 = t1.unwrap_or(t2);
        // As the training loop: the norm is computed (and logged) anyway.
        match train.grad_clip {
            Some(max_norm) => opt.clip_grad_norm(max_norm),
            None => opt.grad_norm(),
        };
        let t3 = Instant::now();
        opt.step(1e-4);
        // One host read per step, like the training loop's metrics.
        let value = loss.loss.double_value(&[]);
        let t4 = Instant::now();
        phases.forward += t1 - t0;
        phases.backward += t2 - t1;
        phases.clip += t3 - t2;
        phases.optimizer += t4 - t3;
        Ok(value)
    };
    for _ in 0..warmup {
        step(&mut Phases::default())?;
    }
    let started = Instant::now();
    let mut loss = 0.0;
    for _ in 0..steps {
        loss = step(&mut phases)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let positions = config.seq_len();
    let per_step = |d: Duration| d.as_secs_f64() / steps as f64;
    let phases = (device == Device::Cpu).then(|| {
        let split = !train.activation_checkpointing;
        serde_json::json!({
            "forward_loss": split.then(|| per_step(phases.forward)),
            "backward": split.then(|| per_step(phases.backward)),
            "forward_backward": per_step(phases.forward + phases.backward),
            "grad_norm_clip": per_step(phases.clip),
            "optimizer": per_step(phases.optimizer),
        })
    });
    let a = &config.arch;
    let tokens_per_s = (batch * positions) as f64 * steps as f64 / seconds;
    let flops_per_token = dalle_train::flops::gpt_per_token(
        dalle_train::flops::gpt_non_embedding(&model.named_parameters()),
        a.depth as u64,
        a.dim as u64,
        positions as u64,
    );
    let model_flops = dalle_train::flops::Utilisation::of(
        flops_per_token * tokens_per_s,
        dalle_train::flops::job_peak(job),
    );
    let line = serde_json::json!({
        "impl": "dalle-rs",
        "threads": tch::get_num_threads(),
        "device": format!("{device:?}"),
        "precision": precision.name(),
        "dim": a.dim,
        "depth": a.depth,
        "heads": a.heads,
        "mlp_ratio": a.mlp_ratio,
        "attention": a.attention,
        "activation_checkpointing": train.activation_checkpointing,
        "text_len": config.text_len,
        "text_vocab": config.text_vocab,
        "image_vocab": config.image_vocab,
        "image_grid": config.image_grid,
        "positions": positions,
        "batch_size": batch,
        "parameters": parameter_count(&model),
        "steps": steps,
        "seconds": seconds,
        "steps_per_s": steps as f64 / seconds,
        "tokens_per_s": tokens_per_s,
        "model_tflops": model_flops.tflops,
        "mfu": model_flops.mfu,
        "seconds_per_step": phases,
        "peak_rss_mib": peak_rss_mib(),
        "final_loss": loss,
    });
    println!("{line}");
    Ok(())
}

fn bench_sample(
    job: &JobConfig,
    shape: &GptShape,
    batch: i64,
    cache_runs: usize,
    skip_no_cache: bool,
) -> Result<()> {
    anyhow::ensure!(batch > 0, "--batch must be positive");
    anyhow::ensure!(cache_runs > 0, "--cache-runs must be positive");
    let device = dalle_train::feed::runtime_device(job)?;
    let precision = job.run.precision_on(device);
    let config = shape.config(job)?;
    let settings = &job.gpt.sample;
    tch::manual_seed(job.run.seed as i64);
    let model = Gpt::new(config.clone(), device)?;
    let captions = Tensor::randint(
        config.text_vocab,
        [batch, config.text_len],
        (Kind::Int64, device),
    );
    let time = |decoding: Decoding| -> Result<(f64, Tensor)> {
        let started = Instant::now();
        let autocast = Autocast::enter(device, precision);
        let tokens = sample_decoding(&model, &captions, settings, decoding, |_| {})?;
        drop(autocast);
        // The tokens are read back, so the time covers the whole decode.
        let tokens = tokens.to_device(Device::Cpu);
        Ok((started.elapsed().as_secs_f64(), tokens))
    };
    // The median of `cache_runs` runs of one decoding, and its tokens.
    let median = |decoding: Decoding| -> Result<(f64, Tensor)> {
        let mut seconds = Vec::with_capacity(cache_runs);
        let mut tokens = None;
        for _ in 0..cache_runs {
            let (s, t) = time(decoding)?;
            seconds.push(s);
            tokens = Some(t);
        }
        seconds.sort_by(f64::total_cmp);
        Ok((
            seconds[seconds.len() / 2],
            tokens.expect("at least one run"),
        ))
    };
    // Same seed and logits up to rounding: the draws should agree.
    let agreement = |a: &Tensor, b: &Tensor| {
        a.eq_tensor(b)
            .to_kind(Kind::Double)
            .mean(Kind::Double)
            .double_value(&[])
    };
    // What users get (on a GPU the captured graph). On a GPU also the
    // cache without the graph, to show what the graph saves, and the
    // graph's very step run op by op, which it must match token for token.
    let chosen = Decoding::cached_on(device);
    let (cached, tokens) = median(chosen)?;
    let graph_check = if chosen == (Decoding::FixedCache { graph: true }) {
        let (seconds, eager_tokens) = median(Decoding::Cache)?;
        let (_, direct) = time(Decoding::FixedCache { graph: false })?;
        Some((
            seconds,
            agreement(&tokens, &eager_tokens),
            agreement(&tokens, &direct),
        ))
    } else {
        None
    };
    let image_tokens = (batch * config.image_len()) as f64;
    let rates = |seconds: f64| {
        serde_json::json!({
            "seconds": seconds,
            "image_tokens_per_s": image_tokens / seconds,
            "images_per_s": batch as f64 / seconds,
        })
    };
    let uncached = if skip_no_cache {
        None
    } else {
        let (seconds, reference) = time(Decoding::Recompute)?;
        Some((seconds, agreement(&tokens, &reference)))
    };
    let a = &config.arch;
    let line = serde_json::json!({
        "impl": "dalle-rs",
        "threads": tch::get_num_threads(),
        "device": format!("{device:?}"),
        "precision": precision.name(),
        "dim": a.dim,
        "depth": a.depth,
        "heads": a.heads,
        "attention": a.attention,
        "text_len": config.text_len,
        "text_vocab": config.text_vocab,
        "image_vocab": config.image_vocab,
        "image_grid": config.image_grid,
        "image_len": config.image_len(),
        "parameters": parameter_count(&model),
        "batch": batch,
        "guidance_scale": settings.guidance_scale,
        "rows_decoded": if settings.guidance_scale != 1.0 { 2 * batch } else { batch },
        "top_k": settings.top_k,
        "top_p": settings.top_p,
        "decoding": format!("{chosen:?}"),
        "cache": rates(cached),
        "cache_runs": cache_runs,
        "cache_without_graph": graph_check.map(|(seconds, ..)| rates(seconds)),
        "graph_speedup": graph_check.map(|(seconds, ..)| seconds / cached),
        "graph_tokens_agree": graph_check.map(|(_, agree, _)| agree),
        "graph_matches_its_step": graph_check.map(|(.., same)| same),
        "no_cache": uncached.map(|(seconds, _)| rates(seconds)),
        "speedup": uncached.map(|(seconds, _)| seconds / cached),
        "tokens_agree": uncached.map(|(_, agree)| agree),
        "peak_rss_mib": peak_rss_mib(),
    });
    println!("{line}");
    Ok(())
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
            let precision = job.run.precision_on(device);
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
                // The PyTorch reference has no usage term.
                usage: 0.0,
                relaxation: train.relaxation,
                recon: train.recon,
            };
            let checkpointing = train.activation_checkpointing;
            let mut step = || -> Result<f64> {
                opt.zero_grad();
                // Forward and backward in `run.precision`, as the training loop.
                let autocast = Autocast::enter(device, precision);
                let out = model
                    .train_pass(&x, &objective, checkpointing)?
                    .backward(1.0);
                drop(autocast);
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
            let images_per_s = (batch as u64 * steps) as f64 / seconds;
            let per_image = dalle_train::flops::dvae_per_image(&model.named_parameters(), cfg);
            let model_flops = dalle_train::flops::Utilisation::of(
                per_image * images_per_s,
                dalle_train::flops::job_peak(job),
            );
            let line = serde_json::json!({
                "impl": "dalle-rs",
                "threads": tch::get_num_threads(),
                "device": format!("{device:?}"),
                "precision": precision.name(),
                "image_size": cfg.image_size,
                "n_hid": cfg.n_hid,
                "n_blk_per_group": cfg.n_blk_per_group,
                "activation_checkpointing": checkpointing,
                "vocab_size": cfg.vocab_size,
                "n_init": cfg.n_init,
                "batch_size": batch,
                "steps": steps,
                "seconds": seconds,
                "images_per_s": images_per_s,
                "model_tflops": model_flops.tflops,
                "mfu": model_flops.mfu,
                "peak_rss_mib": peak_rss_mib(),
                "final_loss": loss,
            });
            println!("{line}");
            Ok(())
        }
        BenchCommand::Gpt {
            warmup,
            steps,
            shape,
            batch,
        } => bench_gpt(job, &shape, batch, warmup, steps),
        BenchCommand::Sample {
            shape,
            batch,
            cache_runs,
            skip_no_cache,
        } => bench_sample(job, &shape, batch, cache_runs, skip_no_cache),
        BenchCommand::Memory {
            worlds,
            steps,
            batch,
        } => memory::bench_memory(job, &worlds, steps, batch),
        BenchCommand::MemoryRank {
            rank,
            world,
            sharding,
            steps,
            batch,
        } => memory::memory_rank(job, rank, world, sharding, steps, batch),
    }
}
