//! `dalle gpt …`: stage 2, the transformer over caption and image tokens.

use crate::export;
use anyhow::Result;
use clap::Subcommand;
use dalle_model::weights::StoredDtype;
use dalle_train::config::JobConfig;
use dalle_train::ddp::DataParallel;

#[derive(Subcommand)]
pub enum GptCommand {
    /// Train the transformer (config sections [gpt], [text]) on pre-tokenized
    /// data (`dalle data tokenize`) or on images tokenized on the fly, then
    /// export the sampler bundle to `<run.dir>/bundle`.
    Train,
}

pub fn run(cmd: GptCommand, job: &JobConfig) -> Result<()> {
    match cmd {
        GptCommand::Train => {
            let report = dalle_train::gpt::train(job, &mut DataParallel::solo(), |_| {})?;
            if report.logs.is_empty() {
                println!(
                    "nothing to train: the run's checkpoint is at gpt.train.steps = {} already",
                    job.gpt.train.steps
                );
            }
            if let Some(last) = report.logs.last() {
                println!(
                    "trained {} steps: loss {:.4} (text {:.4}, image {:.4}), {:.0} tokens/s; weights {}",
                    last.step,
                    last.loss,
                    last.text_loss,
                    last.image_loss,
                    last.tokens_per_s,
                    report.weights.display()
                );
            }
            export::run(job, None, StoredDtype::F32)
        }
    }
}
