//! `dalle rerank …`: the optional contrastive reranker that `dalle-sample
//! --candidates` uses to keep the best of N samples.

use anyhow::Result;
use clap::Subcommand;
use dalle_train::config::JobConfig;
use dalle_train::ddp::DataParallel;

#[derive(Subcommand)]
pub enum RerankCommand {
    /// Train the reranker (config section [rerank]) on the dataset's images
    /// and captions with the run's caption tokenizer; `dalle export` then
    /// puts it in the sampler bundle.
    Train,
}

pub fn run(cmd: RerankCommand, job: &JobConfig) -> Result<()> {
    match cmd {
        RerankCommand::Train => {
            let report = dalle_train::rerank::train(job, &mut DataParallel::solo(), |_| {})?;
            match report.logs.last() {
                None => println!(
                    "nothing to train: the run's checkpoint is at rerank.train.steps = {} already",
                    job.rerank.train.steps
                ),
                Some(last) => println!(
                    "trained {} steps: loss {:.4}, in-batch top-1 {:.1}%, {:.0} pairs/s; weights {}",
                    last.step,
                    last.loss,
                    100.0 * last.accuracy,
                    last.pairs_per_s,
                    report.weights.display()
                ),
            }
            if let Some(v) = report.validation.last() {
                println!("held out: {v}");
            }
            Ok(())
        }
    }
}
