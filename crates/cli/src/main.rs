//! `dalle`: the command line of dalle-rs. This file only parses arguments
//! and dispatches; each command group lives in its own module.

mod bench;
mod data;
mod dvae;
mod eval;
mod export;
mod gpt;
mod inputs;
mod launch;
mod logging;
mod node;
mod plan;
mod progress;
mod rerank;
mod shared;
mod stages;
mod status;
mod text;
mod tokenize;
mod usage;
mod worker;

use anyhow::Result;
use clap::{Parser, Subcommand};
use dalle_model::weights::StoredDtype;
use dalle_train::config::JobConfig;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "dalle",
    version,
    about = "Distributed DALL-E pretraining and sampling"
)]
struct Cli {
    /// Job config (TOML). Without it the embedded demo config is used.
    #[arg(long, global = true, env = "DALLE_CONFIG")]
    config: Option<PathBuf>,
    /// Override a config key, e.g. `--set dvae.train.steps=100` (repeatable).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Continue from this checkpoint (`…/checkpoints/STAGE/step-N`) instead
    /// of the run's newest (`checkpoint.resume_from`).
    #[arg(long, global = true, value_name = "URL")]
    resume_from: Option<String>,
    /// Start over instead of resuming the run's newest checkpoint; refused
    /// when the run has checkpoints unless `--set checkpoint.overwrite=true`.
    #[arg(long, global = true)]
    no_resume: bool,
    /// How log lines look on stderr: `text` for people, `json` (one object
    /// a line, with rank, stage, step and generation as fields) for log
    /// pipelines.
    #[arg(
        long,
        global = true,
        env = "DALLE_LOG_FORMAT",
        value_enum,
        default_value_t = logging::LogFormat::Text
    )]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Datasets: synthetic data, pre-tokenization.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Stage 1: the discrete VAE.
    #[command(subcommand)]
    Dvae(dvae::DvaeCommand),
    /// Stage 2: the caption tokenizer.
    #[command(subcommand)]
    Text(text::TextCommand),
    /// Stage 2: the transformer.
    #[command(subcommand)]
    Gpt(gpt::GptCommand),
    /// The optional reranker, which picks the best of N samples.
    #[command(subcommand)]
    Rerank(rerank::RerankCommand),
    /// Measure a trained run on held-out images: dVAE reconstruction and
    /// codebook usage, the transformer's held-out loss, prompt fidelity
    /// (`<run.dir>/eval/eval.json` and pictures).
    Eval(eval::EvalArgs),
    /// Write the sampler bundle (dVAE decoder, transformer, tokenizer) for
    /// `dalle-sample`.
    Export {
        /// Path or URL; defaults to `<run.dir>/bundle`.
        #[arg(long)]
        out: Option<String>,
        /// What the bundle's weights are stored as: `fp32` (as trained) or
        /// `bf16` (half the size; loaded back as fp32).
        #[arg(long, default_value = "fp32")]
        dtype: StoredDtype,
    },
    /// Run the job (the stages of `run.stages`, all by default) with a
    /// coordinator and N local worker processes.
    Launch(launch::LaunchArgs),
    /// What one rank needs in memory to train each stage (parameters,
    /// gradients, optimizer state, activations) against what its device
    /// has, and what sharding, checkpointing or a smaller micro-batch
    /// would save; fails when a stage does not fit.
    Plan(plan::PlanArgs),
    /// One training process of a distributed job: join the coordinator,
    /// train data-parallel, follow its instructions.
    Worker(worker::WorkerArgs),
    /// The agent of one machine of a distributed job (what a cluster's
    /// per-node script runs): one worker per GPU or CPU slot, their exits
    /// reported to the coordinator and restarted, SIGTERM a graceful stop
    /// at a step boundary (exit 75).
    Node(node::NodeArgs),
    /// Where a running job stands, from its coordinator's status page:
    /// stages, workers, re-formations (`--json` for scripts).
    Status(status::StatusArgs),
    /// Throughput benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Print the resolved job config as TOML.
    Config,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let mut overrides = cli.overrides.clone();
    if let Some(url) = &cli.resume_from {
        overrides.push(format!("checkpoint.resume_from={url}"));
    }
    if cli.no_resume {
        overrides.push("checkpoint.resume=false".into());
    }
    let job = || -> Result<JobConfig> { Ok(JobConfig::load(cli.config.as_deref(), &overrides)?) };
    match cli.command {
        Command::Data(cmd) => data::run(cmd, &job()?),
        Command::Dvae(cmd) => dvae::run(cmd, &job()?),
        Command::Text(cmd) => text::run(cmd, &job()?),
        Command::Gpt(cmd) => gpt::run(cmd, &job()?),
        Command::Rerank(cmd) => rerank::run(cmd, &job()?),
        Command::Eval(args) => eval::run(args, &job()?),
        Command::Export { out, dtype } => export::run(&job()?, out, dtype),
        Command::Launch(args) => launch::run(args, &job()?),
        Command::Plan(args) => plan::run(args, &job()?),
        Command::Worker(args) => worker::run(args),
        Command::Status(args) => status::run(args),
        Command::Node(args) => node::run(args),
        Command::Bench(cmd) => bench::run(cmd, &job()?),
        Command::Config => {
            print!("{}", toml::to_string(&job()?)?);
            Ok(())
        }
    }
}
