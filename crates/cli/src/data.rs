//! `dalle data …`: dataset commands.

use crate::progress;
use anyhow::{Context, Result};
use clap::Subcommand;
use dalle_data::synth;
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
}

pub fn run(cmd: DataCommand, job: &JobConfig) -> Result<()> {
    match cmd {
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
