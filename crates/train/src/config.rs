//! The job configuration: one serde struct per component, composed here,
//! read from TOML through the `config` crate with `DALLE_*` environment
//! overrides and `key=value` command-line overrides, in that order of
//! precedence (later wins). Unknown or mistyped keys are errors that name
//! the key.
//!
//! A key absent from a file takes the component's default (the paper's
//! values for the model and its training). With no file at all, the
//! embedded demo (`configs/demo.toml`) is the whole configuration.

use crate::checkpointing::CheckpointPolicy;
use crate::optim::AdamWConfig;
use crate::schedule::Cosine;
use crate::threads::ThreadCount;
use crate::{Result, TrainError};
use dalle_data::columns::ColumnConfig;
use dalle_data::image_ops::Crop;
use dalle_data::synth::SynthConfig;
use dalle_data::validation::ValidationConfig;
use dalle_model::dvae::{DvaeConfig, ReconLoss, Relaxation};
use dalle_model::gpt::GptArch;
use dalle_model::gpt::sample::SamplingConfig;
use dalle_model::rerank::RerankArch;
use dalle_model::text::TextConfig;
use dalle_precision::{Precision, PrecisionSetting};
use dalle_store::{Location, StoreConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The embedded demo configuration, used when no file is given.
pub const DEMO_TOML: &str = include_str!("../../../configs/demo.toml");

/// Environment variables `DALLE_SECTION__KEY[__SUBKEY]` override config
/// keys; `__` separates levels. Only names with a `__` are config, so
/// other `DALLE_*` variables (paths for scripts) are left alone.
const ENV_PREFIX: &str = "DALLE_";
const ENV_SEPARATOR: &str = "__";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobConfig {
    pub run: RunConfig,
    pub data: DataConfig,
    /// How to reach S3-compatible storage for `s3://` URLs.
    pub store: StoreConfig,
    pub synth: SynthConfig,
    pub dvae: DvaeStage,
    /// The caption tokenizer of stage 2.
    pub text: TextConfig,
    pub gpt: GptStage,
    /// The optional contrastive reranker (`rerank` in `run.stages`).
    pub rerank: RerankStage,
    pub checkpoint: CheckpointPolicy,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Where the job writes weights, metrics and images.
    pub dir: PathBuf,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    pub seed: u64,
    /// Intra-op threads of libtorch; 0: the worker's share of its
    /// machine's cores (all of them for a worker alone on its machine).
    pub threads: usize,
    /// With several workers, check every this many steps that all ranks
    /// hold bitwise identical parameters (0: only at the start).
    pub verify_every: u64,
    /// Write the sample ledger: each step's sample keys per rank, under
    /// `<run.dir>/ledger/`.
    pub ledger: bool,
    /// What carries gradients between workers: `auto` (NCCL on CUDA, the
    /// TCP ring on CPU), `tcp-ring` or `nccl`.
    pub backend: String,
    /// The stages `dalle launch` runs, a subset of the full plan in its
    /// order: e.g. `["pretokenize", "gpt", "export"]` for stage 2 on a dVAE
    /// and tokenizer trained before.
    pub stages: Vec<JobStage>,
    /// Where workers on different machines exchange stage outputs: the
    /// dVAE weights and caption tokenizer rank 0 trains, and the
    /// pre-tokenized data every rank writes its share of. Any store URL
    /// every worker reaches (`s3://…`, or `file://` on a shared file
    /// system). Unset: the run directory, which all workers then share (one
    /// machine, or a shared file system).
    pub shared_url: Option<String>,
    /// The device's peak TFLOP/s for MFU in log lines; unset: the table of
    /// known GPUs (`dalle_train::flops::peak_tflops`), none on CPU.
    pub peak_tflops: Option<f64>,
    /// What each rank keeps of the training state: `none` (every rank
    /// holds everything), `optimizer` (ZeRO-1: each rank keeps the Adam
    /// moments of its 1/W of the parameters, updates that share and
    /// all-gathers the rest) or `gradients` (ZeRO-2: also only that
    /// share's gradients, reduce-scattered during backward).
    pub sharding: StateSharding,
    /// Reduce each gradient bucket as soon as backward has written it,
    /// on a communication thread, while backward computes the rest (the
    /// TCP ring; NCCL reduces after backward for now). With sharded
    /// gradients buckets are always reduced during backward.
    pub overlap_reduction: bool,
    /// What the training stages, their evaluations and sampling compute in:
    /// `auto` (bf16 on a GPU of compute capability 8.0 or newer, fp32
    /// elsewhere), `fp32`, `tf32` (fp32 on a CPU) or `bf16` (autocast; the
    /// weights, optimizer state and checkpoints stay fp32).
    pub precision: PrecisionSetting,
}

impl RunConfig {
    /// The precision the stages run in on `device` (`run.precision`
    /// resolved, see [`PrecisionSetting::resolve`]).
    pub fn precision_on(&self, device: tch::Device) -> Precision {
        self.precision.resolve(device)
    }
}

/// How the training state is split across the ranks of a group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateSharding {
    /// Every rank holds full gradients and optimizer state.
    #[default]
    None,
    /// Optimizer state sharded (ZeRO-1).
    Optimizer,
    /// Optimizer state and gradients sharded (ZeRO-2).
    Gradients,
}

impl StateSharding {
    /// Every setting, from holding the most to the least.
    pub const ALL: [StateSharding; 3] = [
        StateSharding::None,
        StateSharding::Optimizer,
        StateSharding::Gradients,
    ];

    /// Whether the optimizer state is split across ranks.
    pub fn shards_optimizer(self) -> bool {
        matches!(self, StateSharding::Optimizer | StateSharding::Gradients)
    }

    /// Whether the gradients are split across ranks too.
    pub fn shards_gradients(self) -> bool {
        matches!(self, StateSharding::Gradients)
    }

    /// The name in the config (`run.sharding`).
    pub fn name(self) -> &'static str {
        match self {
            StateSharding::None => "none",
            StateSharding::Optimizer => "optimizer",
            StateSharding::Gradients => "gradients",
        }
    }
}

/// One stage of the whole job, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStage {
    /// dVAE training, data parallel.
    Dvae,
    /// Training the caption tokenizer (rank 0).
    Tokenizer,
    /// Encoding the dataset's images to dVAE tokens, split across ranks by
    /// file.
    Pretokenize,
    /// Transformer training, data parallel.
    Gpt,
    /// Training the contrastive reranker, data parallel (optional: not in
    /// the default plan).
    Rerank,
    /// Writing the sampler bundle (rank 0).
    Export,
}

impl JobStage {
    /// Every stage, in order.
    pub const ALL: [JobStage; 6] = [
        JobStage::Dvae,
        JobStage::Tokenizer,
        JobStage::Pretokenize,
        JobStage::Gpt,
        JobStage::Rerank,
        JobStage::Export,
    ];

    /// The plan when `run.stages` is not set: every stage but the optional
    /// reranker.
    pub const DEFAULT: [JobStage; 5] = [
        JobStage::Dvae,
        JobStage::Tokenizer,
        JobStage::Pretokenize,
        JobStage::Gpt,
        JobStage::Export,
    ];

    /// Its name in configs and on the wire.
    pub fn name(self) -> &'static str {
        match self {
            JobStage::Dvae => "dvae",
            JobStage::Tokenizer => "tokenizer",
            JobStage::Pretokenize => "pretokenize",
            JobStage::Gpt => "gpt",
            JobStage::Rerank => "rerank",
            JobStage::Export => "export",
        }
    }

    /// The stage of this name.
    pub fn from_name(name: &str) -> Option<JobStage> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Rank 0 alone does the work.
    pub fn leader_only(self) -> bool {
        matches!(self, JobStage::Tokenizer | JobStage::Export)
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("runs/default"),
            device: "auto".into(),
            seed: 0,
            threads: 0,
            verify_every: 0,
            ledger: false,
            backend: "auto".into(),
            stages: JobStage::DEFAULT.to_vec(),
            shared_url: None,
            peak_tflops: None,
            sharding: StateSharding::None,
            overlap_reduction: true,
            precision: PrecisionSetting::Auto,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// The dataset: a Parquet file, a prefix (directory) holding Parquet
    /// files, or a glob, as a path or a `file://`, `s3://` or `memory://`
    /// URL. Defaults to `<run.dir>/data`.
    pub url: Option<String>,
    /// Image-decoding threads per worker: a number, or `auto` (the
    /// worker's share of its machine's cores, see [`crate::threads`]).
    pub decode_threads: ThreadCount,
    /// Bytes of row groups read from storage at once (bounded read-ahead).
    pub read_ahead_bytes: u64,
    /// Row groups whose samples are shuffled together.
    pub shuffle_window: usize,
    pub prefetch_batches: usize,
    /// Share of bad samples (0..1) above which the job stops.
    pub max_bad_fraction: f64,
    /// Decompression-bomb guard.
    pub max_pixels: u64,
    pub crop: Crop,
    pub columns: ColumnConfig,
    /// What the stages evaluate on: samples held out by key hash, or a
    /// dataset of its own.
    pub validation: ValidationConfig,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            url: None,
            decode_threads: ThreadCount::Auto,
            read_ahead_bytes: 256 * 1024 * 1024,
            shuffle_window: 4,
            prefetch_batches: 4,
            max_bad_fraction: 0.01,
            max_pixels: 64 * 1024 * 1024,
            crop: Crop::Center,
            columns: ColumnConfig::default(),
            validation: ValidationConfig::default(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DvaeStage {
    pub model: DvaeConfig,
    pub train: DvaeTrainConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DvaeTrainConfig {
    pub steps: u64,
    pub batch_size: usize,
    /// Images per forward/backward pass; gradients of
    /// `batch_size / micro_batch` passes are accumulated (0: no accumulation).
    pub micro_batch: usize,
    /// Recompute each encoder and decoder group's activations in backward
    /// instead of keeping them: less memory for about a third more compute.
    pub activation_checkpointing: bool,
    pub lr: Cosine,
    /// Gumbel-softmax temperature.
    pub tau: Cosine,
    /// Weight of the KL term.
    pub beta: Cosine,
    /// Weight of the codebook-usage term: KL of the global batch's mean
    /// posterior to uniform, in nats (not per image dimension). The paper
    /// has none (0); short runs need it to keep codes alive.
    pub usage: Cosine,
    pub relaxation: Relaxation,
    pub recon: ReconLoss,
    pub adamw: AdamWConfig,
    /// Clip gradients to this global norm, if set.
    pub grad_clip: Option<f64>,
    pub log_every: u64,
    /// Write the weights every this many steps (0: only at the end).
    pub save_every: u64,
    /// Evaluate on the validation set (`data.validation`) every this many
    /// steps and at the last one (0: never).
    pub eval_every: u64,
}

impl Default for DvaeTrainConfig {
    /// The paper's schedules (section 2.1 and appendix A.2).
    fn default() -> Self {
        Self {
            steps: 3_000_000,
            batch_size: 512,
            micro_batch: 0,
            activation_checkpointing: false,
            lr: Cosine::new(1e-4, 1.25e-6, 1_200_000),
            tau: Cosine::new(1.0, 1.0 / 16.0, 150_000),
            beta: Cosine::new(0.0, 6.6, 5_000),
            usage: Cosine::new(0.0, 0.0, 1),
            relaxation: Relaxation::Soft,
            recon: ReconLoss::LogitLaplace,
            adamw: AdamWConfig::default(),
            grad_clip: None,
            log_every: 100,
            save_every: 10_000,
            eval_every: 1_000,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GptStage {
    pub model: GptArch,
    pub train: GptTrainConfig,
    /// Defaults of `dalle-sample` and of the samples drawn after training.
    pub sample: SamplingConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GptTrainConfig {
    /// Pre-tokenized data (`dalle data tokenize`), or an image dataset that
    /// is then tokenized on the fly by the frozen dVAE. Defaults to
    /// `<run.dir>/tokens`.
    pub data_url: Option<String>,
    pub steps: u64,
    /// Samples per optimizer step.
    pub batch_size: usize,
    /// Samples per forward/backward pass; gradients of
    /// `batch_size / micro_batch` passes are accumulated (0: no accumulation).
    pub micro_batch: usize,
    /// Recompute each transformer block's activations in backward instead
    /// of keeping them: less memory for about a third more compute.
    pub activation_checkpointing: bool,
    pub lr: Cosine,
    pub adamw: AdamWConfig,
    /// Clip gradients to this global norm, if set.
    pub grad_clip: Option<f64>,
    /// Weight of the text loss; the image loss gets the rest.
    pub text_loss_weight: f64,
    /// Probability of replacing a caption by the all-pad null caption, so
    /// classifier-free guidance has an unconditional model to push from.
    pub caption_dropout: f64,
    pub log_every: u64,
    /// Write the weights every this many steps (0: only at the end).
    pub save_every: u64,
    /// Evaluate on the validation set (`data.validation`) every this many
    /// steps and at the last one (0: never).
    pub eval_every: u64,
}

impl Default for GptTrainConfig {
    /// The paper's settings (section 2.4 and appendix B.2), with a cosine
    /// decay after the warm-up in place of halving on plateaus.
    fn default() -> Self {
        Self {
            data_url: None,
            steps: 430_000,
            batch_size: 1024,
            micro_batch: 0,
            activation_checkpointing: false,
            lr: Cosine {
                start: 4.5e-4,
                end: 4.5e-6,
                steps: 430_000,
                warmup: 5_000,
            },
            adamw: AdamWConfig {
                beta1: 0.9,
                beta2: 0.96,
                eps: 1e-8,
                weight_decay: 4.5e-2,
            },
            grad_clip: Some(4.0),
            text_loss_weight: 0.125,
            caption_dropout: 0.0,
            log_every: 100,
            save_every: 10_000,
            eval_every: 1_000,
        }
    }
}

impl DvaeTrainConfig {
    /// Images per forward pass.
    pub fn micro_batch(&self) -> usize {
        if self.micro_batch == 0 {
            self.batch_size
        } else {
            self.micro_batch
        }
    }
}

impl GptTrainConfig {
    /// Samples per forward pass.
    pub fn micro_batch(&self) -> usize {
        if self.micro_batch == 0 {
            self.batch_size
        } else {
            self.micro_batch
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RerankStage {
    pub model: RerankArch,
    pub train: RerankTrainConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RerankTrainConfig {
    pub steps: u64,
    /// Pairs per optimizer step. Every image is contrasted with every
    /// caption of the whole global batch, across ranks: a larger batch is
    /// a harder, more useful task.
    pub batch_size: usize,
    pub lr: Cosine,
    pub adamw: AdamWConfig,
    /// Clip gradients to this global norm, if set.
    pub grad_clip: Option<f64>,
    pub log_every: u64,
    /// Write the weights every this many steps (0: only at the end).
    pub save_every: u64,
    /// Evaluate retrieval on the validation set every this many steps and
    /// at the last one (0: never).
    pub eval_every: u64,
}

impl Default for RerankTrainConfig {
    /// CLIP's recipe scaled down: AdamW (β₂ 0.98, decay 0.2), warm-up then
    /// cosine decay.
    fn default() -> Self {
        Self {
            steps: 100_000,
            batch_size: 4096,
            lr: Cosine {
                start: 5e-4,
                end: 5e-6,
                steps: 100_000,
                warmup: 2_000,
            },
            adamw: AdamWConfig {
                beta1: 0.9,
                beta2: 0.98,
                eps: 1e-6,
                weight_decay: 0.2,
            },
            grad_clip: None,
            log_every: 100,
            save_every: 10_000,
            eval_every: 1_000,
        }
    }
}

impl JobConfig {
    /// Reads `file` (or the embedded demo), then `DALLE_*` variables from
    /// the process environment, then `overrides` (`dotted.key=value`).
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<Self> {
        Self::load_with_env(file, overrides, std::env::vars())
    }

    pub fn load_with_env(
        file: Option<&Path>,
        overrides: &[String],
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<Self> {
        let origin = file.map_or("the embedded demo config".to_string(), |p| {
            p.display().to_string()
        });
        // The defaults go in first, so a file that sets part of a table
        // (`lr.start` only) keeps the default for the rest of it.
        let defaults = config::Config::try_from(&JobConfig::default())
            .map_err(|e| TrainError::Config(format!("default config: {e}")))?;
        let mut builder = config::Config::builder().add_source(defaults);
        builder = match file {
            Some(path) => {
                if !path.is_file() {
                    return Err(TrainError::Config(format!(
                        "config file {} not found",
                        path.display()
                    )));
                }
                builder.add_source(config::File::from(path).format(config::FileFormat::Toml))
            }
            None => builder.add_source(config::File::from_str(DEMO_TOML, config::FileFormat::Toml)),
        };
        // (variable, key) of every override from the environment, to blame
        // the right one for a bad value.
        let mut from_env = Vec::new();
        for (name, value) in env {
            let Some(path) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if !path.contains(ENV_SEPARATOR) {
                continue;
            }
            let key = path.to_lowercase().replace(ENV_SEPARATOR, ".");
            builder = builder
                .set_override(key.clone(), parse_value(&value))
                .map_err(|e| TrainError::Config(format!("environment variable {name}: {e}")))?;
            from_env.push((name, key));
        }
        for item in overrides {
            let (key, value) = item.split_once('=').ok_or_else(|| {
                TrainError::Config(format!("override `{item}` is not of the form key=value"))
            })?;
            builder = builder
                .set_override(key.trim(), parse_value(value.trim()))
                .map_err(|e| TrainError::Config(format!("override `{item}`: {e}")))?;
        }
        let merged = builder
            .build()
            .map_err(|e| TrainError::Config(format!("{origin}: {e}")))?;
        let job: JobConfig = merged.try_deserialize().map_err(|e| {
            TrainError::Config(blame(&origin, overrides, &from_env, &e.to_string()))
        })?;
        job.validate()?;
        Ok(job)
    }

    /// A resolved job config as TOML text (what `dalle config` prints, and
    /// what a coordinator hands its workers); `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let defaults = config::Config::try_from(&JobConfig::default())
            .map_err(|e| TrainError::Config(format!("default config: {e}")))?;
        let job: JobConfig = config::Config::builder()
            .add_source(defaults)
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .and_then(|merged| merged.try_deserialize())
            .map_err(|e| TrainError::Config(format!("{origin}: {e}")))?;
        job.validate()?;
        Ok(job)
    }

    /// The job as TOML text, read back exactly by [`JobConfig::from_toml`].
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the job config serialises to TOML")
    }

    pub fn validate(&self) -> Result<()> {
        self.dvae.model.validate()?;
        self.data
            .validation
            .validate()
            .map_err(TrainError::Config)?;
        let t = &self.dvae.train;
        let checks = [
            (t.batch_size == 0, "dvae.train.batch_size must be positive"),
            (
                !t.batch_size.is_multiple_of(t.micro_batch()),
                "dvae.train.micro_batch must divide dvae.train.batch_size",
            ),
            (t.log_every == 0, "dvae.train.log_every must be positive"),
            (t.lr.start <= 0.0, "dvae.train.lr.start must be positive"),
            (
                t.tau.end <= 0.0 || t.tau.start <= 0.0,
                "dvae.train.tau must stay positive",
            ),
            (
                !(0.0..=1.0).contains(&self.data.max_bad_fraction),
                "data.max_bad_fraction must be within 0..1",
            ),
        ];
        let g = &self.gpt.train;
        let gpt_checks = [
            (g.batch_size == 0, "gpt.train.batch_size must be positive"),
            (
                !g.batch_size.is_multiple_of(g.micro_batch()),
                "gpt.train.micro_batch must divide gpt.train.batch_size",
            ),
            (g.log_every == 0, "gpt.train.log_every must be positive"),
            (g.lr.start <= 0.0, "gpt.train.lr.start must be positive"),
            (
                !(0.0..=1.0).contains(&g.text_loss_weight),
                "gpt.train.text_loss_weight must be within 0..1",
            ),
            (
                !(0.0..1.0).contains(&g.caption_dropout),
                "gpt.train.caption_dropout must be within 0..1 (1 excluded)",
            ),
            (self.text.text_len == 0, "text.text_len must be positive"),
            (
                self.rerank.train.batch_size < 2,
                "rerank.train.batch_size must be at least 2 (pairs are contrasted with each other)",
            ),
            (
                self.rerank.train.log_every == 0,
                "rerank.train.log_every must be positive",
            ),
            (
                self.rerank.train.lr.start <= 0.0,
                "rerank.train.lr.start must be positive",
            ),
            (
                !["auto", "tcp-ring", "nccl"].contains(&self.run.backend.as_str()),
                "run.backend must be auto, tcp-ring or nccl",
            ),
        ];
        let stages = &self.run.stages;
        let stage_checks = [
            (stages.is_empty(), "run.stages must name at least one stage"),
            (
                stages.windows(2).any(|w| w[0] >= w[1]),
                "run.stages must list each stage once, in the order dvae, tokenizer, pretokenize, gpt, rerank, export",
            ),
        ];
        let checks: Vec<_> = checks
            .into_iter()
            .chain(gpt_checks)
            .chain(stage_checks)
            .collect();
        match checks.iter().find(|(bad, _)| *bad) {
            Some((_, msg)) => Err(TrainError::Config(msg.to_string())),
            None => Ok(()),
        }
    }

    /// The dataset's URL (or path).
    pub fn data_url(&self) -> String {
        self.data
            .url
            .clone()
            .unwrap_or_else(|| self.run.dir.join("data").display().to_string())
    }

    /// The dataset as a location on its store.
    pub fn data_location(&self) -> Result<Location> {
        Location::parse(&self.data_url(), &self.store)
            .map_err(|e| TrainError::Config(e.to_string()))
    }

    /// The dataset's local directory, for commands that write it with the
    /// file system (`dalle data synth`).
    pub fn data_dir(&self) -> Result<PathBuf> {
        let url = self.data_url();
        match url.split_once("://") {
            None => Ok(PathBuf::from(url)),
            Some(("file", path)) => Ok(PathBuf::from(path)),
            Some(_) => Err(TrainError::Config(format!(
                "data.url {url} is not a local directory; give one with --out"
            ))),
        }
    }

    /// The validation dataset of its own (`data.validation.url`), if set.
    pub fn validation_location(&self) -> Result<Option<Location>> {
        self.data
            .validation
            .url
            .as_deref()
            .map(|url| {
                Location::parse(url, &self.store)
                    .map_err(|e| TrainError::Config(format!("data.validation.url: {e}")))
            })
            .transpose()
    }

    pub fn dvae_weights_path(&self) -> PathBuf {
        self.run.dir.join("dvae.safetensors")
    }

    pub fn gpt_weights_path(&self) -> PathBuf {
        self.run.dir.join("gpt.safetensors")
    }

    /// Where the rerank stage writes its weights (and export looks for them).
    pub fn rerank_weights_path(&self) -> PathBuf {
        self.run.dir.join("reranker.safetensors")
    }

    /// Stage 2's training data: pre-tokenized by default.
    pub fn gpt_data_url(&self) -> String {
        self.gpt
            .train
            .data_url
            .clone()
            .unwrap_or_else(|| self.tokens_url())
    }

    /// Where `dalle data tokenize` writes by default.
    pub fn tokens_url(&self) -> String {
        self.shared_output_url("tokens")
    }

    /// Where an output every worker reads lives (tokens, checkpoints, the
    /// bundle): under `run.shared_url` when set, else under `run.dir`.
    pub fn shared_output_url(&self, name: &str) -> String {
        match &self.run.shared_url {
            Some(url) => format!("{}/{name}", url.trim_end_matches('/')),
            None => self.run.dir.join(name).display().to_string(),
        }
    }

    /// Where `dalle text train-tokenizer` writes and stage 2 reads.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.run.dir.join("tokenizer.json")
    }
}

/// A config error, said to come from the `--set` override of the key it
/// names when there is one, else from `origin` (the file).
fn blame(origin: &str, overrides: &[String], from_env: &[(String, String)], error: &str) -> String {
    let names_key = |key: &str| error.contains(&format!("key `{}`", key.trim()));
    // `--set` is applied last, so it wins over the environment, which wins
    // over the file.
    let set = overrides
        .iter()
        .rev()
        .find(|item| item.split_once('=').is_some_and(|(key, _)| names_key(key)));
    if let Some(item) = set {
        return format!("--set {item}: {error}");
    }
    match from_env.iter().rev().find(|(_, key)| names_key(key)) {
        Some((name, _)) => format!("environment variable {name}: {error}"),
        None => format!("{origin}: {error}"),
    }
}

/// A value given as text (`--set`, environment variables): a number, a
/// boolean, a list in brackets (`[dvae, gpt]` or `["dvae", "gpt"]`), else
/// a string.
fn parse_value(value: &str) -> config::Value {
    match value.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
        Some(items) if items.trim().is_empty() => config::Value::from(Vec::<config::Value>::new()),
        Some(items) => config::Value::from(
            items
                .split(',')
                .map(|item| {
                    let item = item.trim();
                    let unquoted = item
                        .strip_prefix('"')
                        .and_then(|i| i.strip_suffix('"'))
                        .or_else(|| item.strip_prefix('\'').and_then(|i| i.strip_suffix('\'')));
                    match unquoted {
                        Some(text) => config::Value::from(text),
                        None => parse_scalar(item),
                    }
                })
                .collect::<Vec<_>>(),
        ),
        None => parse_scalar(value),
    }
}

/// Command-line and environment values arrive as text: read numbers and
/// booleans as such so typed keys accept them.
fn parse_scalar(value: &str) -> config::Value {
    if let Ok(i) = value.parse::<i64>() {
        i.into()
    } else if let Ok(f) = value.parse::<f64>() {
        f.into()
    } else if let Ok(b) = value.parse::<bool>() {
        b.into()
    } else {
        value.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str, overrides: &[&str], env: &[(&str, &str)]) -> Result<JobConfig> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.toml");
        std::fs::write(&path, toml).unwrap();
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        JobConfig::load_with_env(Some(&path), &overrides, env.collect::<Vec<_>>().into_iter())
    }

    #[test]
    fn a_job_travels_as_toml_unchanged() {
        let mut job = JobConfig::load_with_env(None, &[], std::iter::empty()).unwrap();
        job.gpt.train.data_url = Some("s3://bucket/tokens".into());
        job.run.verify_every = 3;
        let back = JobConfig::from_toml(&job.to_toml(), "the coordinator's job").unwrap();
        assert_eq!(back, job);
        let err = JobConfig::from_toml("[run]\nsteps = 1\n", "the coordinator's job")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the coordinator's job") && err.contains("steps"),
            "{err}"
        );
    }

    #[test]
    fn embedded_demo_is_valid_and_small() {
        let job = JobConfig::load_with_env(None, &[], std::iter::empty()).unwrap();
        assert!(job.dvae.model.n_hid < DvaeConfig::default().n_hid);
        assert!(job.dvae.train.steps < DvaeTrainConfig::default().steps);
    }

    #[test]
    fn missing_keys_take_defaults_and_file_values_win() {
        let job = load("[dvae.train]\nsteps = 7\n", &[], &[]).unwrap();
        assert_eq!(job.dvae.train.steps, 7);
        assert_eq!(job.dvae.train.batch_size, 512);
        assert_eq!(job.dvae.model, DvaeConfig::default());
    }

    #[test]
    fn environment_then_command_line_override() {
        let env = [
            ("DALLE_DVAE__TRAIN__STEPS", "11"),
            ("DALLE_RUN__DEVICE", "cpu"),
            ("DALLE_CACHE_DIR", "/x"),
        ];
        let job = load("[dvae.train]\nsteps = 7\n", &[], &env).unwrap();
        assert_eq!((job.dvae.train.steps, job.run.device.as_str()), (11, "cpu"));
        let job = load(
            "",
            &["dvae.train.steps=13", "dvae.train.lr.start=0.5"],
            &env,
        )
        .unwrap();
        assert_eq!(job.dvae.train.steps, 13);
        assert_eq!(job.dvae.train.lr.start, 0.5);
    }

    #[test]
    fn misspelled_or_mistyped_keys_are_named() {
        let err = load("[dvae.train]\nstepz = 7\n", &[], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("stepz") && err.contains("job.toml"), "{err}");
        let err = load("[dvae.train]\nsteps = \"many\"\n", &[], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("steps"), "{err}");
        let err = load("", &[], &[("DALLE_DVAE__TRAIN__BATCHSIZE", "3")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("batchsize"), "{err}");
        let err = load("[dvae.model]\nimage_size = 30\n", &[], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("dvae.image_size"), "{err}");
        let err = load("", &["nonsense"], &[]).unwrap_err().to_string();
        assert!(err.contains("nonsense"), "{err}");
        let err = load("", &["run.backend=gloo"], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("run.backend"), "{err}");
        // A bad value from the environment names its variable, not the file.
        let err = load("", &[], &[("DALLE_DVAE__TRAIN__STEPS", "many")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("environment variable DALLE_DVAE__TRAIN__STEPS")
                && !err.contains("job.toml"),
            "{err}"
        );
        // --set wins over the environment, and is blamed for its own value.
        let err = load(
            "",
            &["dvae.train.steps=lots"],
            &[("DALLE_DVAE__TRAIN__STEPS", "many")],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("--set dvae.train.steps=lots"), "{err}");
    }

    #[test]
    fn the_validation_section_is_read_and_checked() {
        let job = load(
            "[data.validation]\nfraction = 0.05\nmax_samples = 64\n[gpt.train]\neval_every = 50\n",
            &["dvae.train.eval_every=20"],
            &[],
        )
        .unwrap();
        let v = &job.data.validation;
        assert_eq!(
            (v.fraction, v.max_samples, v.url.as_deref()),
            (0.05, 64, None)
        );
        assert_eq!(
            (job.dvae.train.eval_every, job.gpt.train.eval_every),
            (20, 50)
        );
        let back = JobConfig::from_toml(&job.to_toml(), "round trip").unwrap();
        assert_eq!(back.data.validation, job.data.validation);
        let err = load("[data.validation]\nfraction = 1.5\n", &[], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("data.validation.fraction"), "{err}");
        let err = load("", &["data.validation.fraktion=0.1"], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("fraktion"), "{err}");
        let err = load(
            "[data.validation]\nfraction = 0.1\nurl = \"s3://b/val\"\n",
            &[],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("data.validation") && err.contains("not both"),
            "{err}"
        );
    }

    #[test]
    fn run_precision_is_read_and_a_bad_one_is_named() {
        assert_eq!(
            load("", &[], &[]).unwrap().run.precision,
            PrecisionSetting::Auto
        );
        let job = load("[run]\nprecision = \"bf16\"\n", &[], &[]).unwrap();
        assert_eq!(job.run.precision, PrecisionSetting::Bf16);
        assert_eq!(job.run.precision_on(tch::Device::Cpu), Precision::Bf16);
        let job = load("", &["run.precision=tf32"], &[]).unwrap();
        assert_eq!(job.run.precision_on(tch::Device::Cpu), Precision::Fp32);
        let back = JobConfig::from_toml(&job.to_toml(), "round trip").unwrap();
        assert_eq!(back.run.precision, PrecisionSetting::Tf32);
        let err = load("", &["run.precision=fp16"], &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("run.precision") && err.contains("fp16") && err.contains("bf16"),
            "{err}"
        );
    }

    #[test]
    fn lists_can_be_given_on_the_command_line_and_in_the_environment() {
        let want = [JobStage::Pretokenize, JobStage::Gpt, JobStage::Export];
        for list in [
            "[pretokenize, gpt, export]",
            "[\"pretokenize\",\"gpt\",\"export\"]",
        ] {
            let job = load("", &[&format!("run.stages={list}")], &[]).unwrap();
            assert_eq!(job.run.stages, want, "{list}");
        }
        let env = [("DALLE_RUN__STAGES", "['pretokenize', 'gpt', 'export']")];
        assert_eq!(load("", &[], &env).unwrap().run.stages, want);
        let job = load("", &["synth.unseen_combos=[red star, blue ring]"], &[]).unwrap();
        let combos: Vec<String> = job
            .synth
            .unseen_combos
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(combos, ["red star", "blue ring"]);
        // An empty list is a list, refused here by the stage plan's rule.
        let err = load("", &["run.stages=[]"], &[]).unwrap_err().to_string();
        assert!(err.contains("run.stages"), "{err}");
    }

    #[test]
    fn a_bad_override_is_named_as_the_culprit_not_the_file() {
        let err = load("", &["data.decode_threads=many"], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--set data.decode_threads=many"), "{err}");
        let err = load("[data]\ndecode_threads = \"many\"\n", &[], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("job.toml") && !err.contains("--set"), "{err}");
    }

    #[test]
    fn run_stages_choose_part_of_the_plan_in_order() {
        assert_eq!(load("", &[], &[]).unwrap().run.stages, JobStage::DEFAULT);
        let job = load(
            "[run]\nstages = [\"gpt\", \"rerank\", \"export\"]\n",
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(
            job.run.stages,
            [JobStage::Gpt, JobStage::Rerank, JobStage::Export]
        );
        let job = load("[run]\nstages = [\"pretokenize\", \"gpt\"]\n", &[], &[]).unwrap();
        assert_eq!(job.run.stages, [JobStage::Pretokenize, JobStage::Gpt]);
        let back = JobConfig::from_toml(&job.to_toml(), "round trip").unwrap();
        assert_eq!(back.run.stages, job.run.stages);
        for bad in ["[]", "[\"gpt\", \"dvae\"]", "[\"gpt\", \"gpt\"]"] {
            let err = load(&format!("[run]\nstages = {bad}\n"), &[], &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains("run.stages"), "{bad}: {err}");
        }
        let err = load("[run]\nstages = [\"dvea\"]\n", &[], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("dvea"), "{err}");
    }
}
