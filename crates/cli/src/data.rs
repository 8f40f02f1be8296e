//! `dalle data …`: dataset commands.

use crate::{progress, tokenize};
use anyhow::{Context, Result};
use clap::Subcommand;
use dalle_data::synth;
use dalle_store::Location;
use dalle_train::config::JobConfig;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Write the synthetic shapes dataset (config section [synth]) as Parquet.
    Synth {
        /// Output directory; defaults to the job's data path.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Encode a dataset's images with a trained dVAE into Parquet of
    /// (key, caption, tokens: fixed-size list of u16), one file per input file.
    Tokenize {
        /// dVAE weights; defaults to `<run.dir>/dvae.safetensors`.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Dataset to read (path or URL); defaults to `data.url`.
        #[arg(long)]
        input: Option<String>,
        /// Where to write (path or URL); defaults to `<run.dir>/tokens`.
        #[arg(long)]
        out: Option<String>,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
    },
}

pub fn run(cmd: DataCommand, job: &JobConfig) -> Result<()> {
    match cmd {
        DataCommand::Tokenize {
            weights,
            input,
            out,
            batch_size,
        } => {
            let weights = weights.unwrap_or_else(|| job.dvae_weights_path());
            let device = dalle_model::device::parse_device(&job.run.device)?;
            let model = dalle_model::dvae::Dvae::load(&weights, device)
                .with_context(|| format!("loading dVAE weights {}", weights.display()))?;
            let input = input.unwrap_or_else(|| job.data_url());
            let out = out.unwrap_or_else(|| job.tokens_url());
            let args = tokenize::TokenizeArgs {
                shard: (0, 1),
                model: &model,
                input: Location::parse(&input, &job.store)?,
                output: Location::parse(&out, &job.store)?,
                batch_size,
            };
            tokenize::run(job, args)
        }
        DataCommand::Synth { out } => {
            let dir = match out {
                Some(dir) => dir,
                None => job.data_dir()?,
            };
            let cfg = &job.synth;
            let bar = progress::bar(cfg.count.div_ceil(cfg.rows_per_file.max(1)) as u64, "files");
            let files = synth::write_dataset(&dir, cfg, |_| bar.inc(1))
                .with_context(|| format!("writing synthetic data to {}", dir.display()))?;
            bar.finish_and_clear();
            println!(
                "wrote {} samples in {} files to {}",
                cfg.count,
                files.len(),
                dir.display()
            );
            Ok(())
        }
    }
}
