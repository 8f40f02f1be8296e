//! The job's stage plan as one worker runs it: dVAE training (data
//! parallel) → caption tokenizer (rank 0) → pre-tokenization split across
//! ranks by file → transformer training (data parallel) → sampler bundle
//! (rank 0). Ranks meet at a barrier wherever one stage reads what another
//! rank wrote.

use crate::{export, text, tokenize};
use anyhow::{Context, Result};
use dalle_model::dvae::Dvae;
use dalle_store::Location;
use dalle_train::config::JobConfig;
use dalle_train::ddp::DataParallel;

/// Runs every stage of `job` on this rank.
pub fn run_all(job: &JobConfig, ddp: &mut DataParallel) -> Result<()> {
    let rank = ddp.rank();
    tracing::info!(rank, world = ddp.world_size(), "stage 1: dVAE training");
    dalle_train::dvae::train(job, ddp, |_| {})?;
    ddp.barrier()?;

    if ddp.is_leader() {
        tracing::info!("stage 2 preparation: caption tokenizer");
        text::run(
            text::TextCommand::TrainTokenizer {
                input: None,
                out: None,
            },
            job,
        )?;
    }
    tracing::info!(
        rank,
        "stage 2 preparation: pre-tokenizing this rank's files"
    );
    let device = dalle_model::device::parse_device(&job.run.device)?;
    let weights = job.dvae_weights_path();
    let dvae = Dvae::load(&weights, device)
        .with_context(|| format!("loading dVAE weights {}", weights.display()))?;
    tokenize::run(
        job,
        tokenize::TokenizeArgs {
            model: &dvae,
            input: Location::parse(&job.data_url(), &job.store)?,
            output: Location::parse(&job.tokens_url(), &job.store)?,
            batch_size: 64,
            shard: (rank, ddp.world_size()),
        },
    )?;
    ddp.barrier()?;

    tracing::info!(rank, "stage 2: transformer training");
    dalle_train::gpt::train(job, ddp, |_| {})?;
    ddp.barrier()?;
    if ddp.is_leader() {
        export::run(job, None)?;
    }
    Ok(())
}
