//! The job's stages as a worker runs them. The coordinator owns the plan
//! (`run.stages`, handed to every group with where to start); a worker runs
//! each stage it is given by name: dVAE training (data parallel) → caption
//! tokenizer (rank 0) → pre-tokenization split across ranks by file →
//! transformer training (data parallel) → the optional reranker (data
//! parallel) → sampler bundle (rank 0). Ranks
//! meet at a barrier at the end of every stage, since the next one reads
//! what any rank wrote.

use crate::shared::SharedOutputs;
use crate::{export, text, tokenize};
use anyhow::{Context, Result, bail};
use dalle_model::dvae::Dvae;
use dalle_model::weights::StoredDtype;
use dalle_runtime::{PlanStage, ValidationReport};
use dalle_store::Location;
use dalle_train::config::{JobConfig, JobStage};
use dalle_train::ddp::DataParallel;
use dalle_train::metrics::Progress;
use dalle_train::rerank::RerankValidation;
use dalle_train::validation::{DvaeValidation, GptValidation};

/// The plan the coordinator hands out for `job`.
pub fn plan(job: &JobConfig) -> Vec<PlanStage> {
    job.run
        .stages
        .iter()
        .map(|stage| PlanStage {
            name: stage.name().into(),
            leader_only: stage.leader_only(),
        })
        .collect()
}

/// The coordinator's plan as stages this worker knows how to run; refuses
/// a plan with a stage it does not know (a coordinator of another release)
/// before anything runs.
pub fn from_plan(plan: &[PlanStage]) -> Result<Vec<JobStage>> {
    if plan.is_empty() {
        bail!("the coordinator sent no stage plan: is it an older dalle-rs release?");
    }
    plan.iter()
        .map(|stage| {
            let known = JobStage::from_name(&stage.name).with_context(|| {
                format!(
                    "the coordinator's plan has a stage {:?} this worker does not know \
                     (it knows {}): run the same dalle-rs release everywhere",
                    stage.name,
                    JobStage::ALL.map(JobStage::name).join(", ")
                )
            })?;
            if known.leader_only() != stage.leader_only {
                bail!(
                    "the coordinator's plan runs stage {} on {}, this worker on {}: \
                     run the same dalle-rs release everywhere",
                    stage.name,
                    ranks(stage.leader_only),
                    ranks(known.leader_only())
                );
            }
            Ok(known)
        })
        .collect()
}

fn ranks(leader_only: bool) -> &'static str {
    if leader_only { "rank 0" } else { "every rank" }
}

/// Runs one stage on this rank (leader-only stages do nothing elsewhere),
/// handing each held-out evaluation of a training stage to
/// `on_validation`, then waits at the barrier that ends it.
pub fn run(
    stage: JobStage,
    job: &JobConfig,
    ddp: &mut DataParallel,
    on_validation: &mut dyn FnMut(ValidationReport),
) -> Result<()> {
    let rank = ddp.rank();
    tracing::info!(
        rank,
        world = ddp.world_size(),
        stage = %stage.name(),
        "stage starts"
    );
    let shared = SharedOutputs::of(job)?;
    // What the stage reads from rank 0's earlier stages, on this machine.
    if let Some(shared) = &shared {
        let needs = match stage {
            JobStage::Pretokenize => vec![job.dvae_weights_path()],
            JobStage::Gpt => vec![job.dvae_weights_path(), job.tokenizer_path()],
            JobStage::Rerank => vec![job.tokenizer_path()],
            _ => Vec::new(),
        };
        for file in needs {
            fetch_or_keep(shared, &file)?;
        }
    }
    match stage {
        JobStage::Dvae => {
            dalle_train::dvae::train(job, ddp, |progress| {
                if let Progress::Validation(v) = progress {
                    on_validation(dvae_report(v));
                }
            })?;
            if let Some(shared) = shared.as_ref().filter(|_| ddp.is_leader()) {
                shared.publish(&job.dvae_weights_path())?;
            }
        }
        JobStage::Tokenizer if ddp.is_leader() => {
            text::run(
                text::TextCommand::TrainTokenizer {
                    input: None,
                    out: None,
                },
                job,
            )?;
            if let Some(shared) = &shared {
                shared.publish(&job.tokenizer_path())?;
            }
        }
        JobStage::Pretokenize => pretokenize(job, rank, ddp.world_size())?,
        JobStage::Gpt => {
            dalle_train::gpt::train(job, ddp, |progress| {
                if let Progress::Validation(v) = progress {
                    on_validation(gpt_report(v));
                }
            })?;
        }
        JobStage::Rerank => {
            dalle_train::rerank::train(job, ddp, |progress| {
                if let Progress::Validation(v) = progress {
                    on_validation(rerank_report(v));
                }
            })?;
        }
        JobStage::Export if ddp.is_leader() => export::run(job, None, StoredDtype::F32)?,
        JobStage::Tokenizer | JobStage::Export => {}
    }
    ddp.barrier()?;
    Ok(())
}

/// The dVAE's held-out figures as the coordinator takes them.
fn dvae_report(v: &DvaeValidation) -> ValidationReport {
    ValidationReport {
        step: v.step,
        samples: v.val_samples as u64,
        recon: Some(v.val_recon),
        psnr_db: Some(v.val_psnr),
        codes_used: Some(v.val_codes_used as u32),
        code_perplexity: Some(v.val_code_perplexity),
        ..ValidationReport::default()
    }
}

/// The transformer's held-out figures as the coordinator takes them.
fn gpt_report(v: &GptValidation) -> ValidationReport {
    ValidationReport {
        step: v.step,
        samples: v.val_samples as u64,
        text_loss: Some(v.val_text_loss),
        image_loss: Some(v.val_image_loss),
        ..ValidationReport::default()
    }
}

/// The reranker's held-out figures as the coordinator takes them.
fn rerank_report(v: &RerankValidation) -> ValidationReport {
    ValidationReport {
        step: v.step,
        samples: v.val_samples as u64,
        rerank_loss: Some(v.val_loss),
        rerank_top1: Some(v.val_top1),
        ..ValidationReport::default()
    }
}

/// Fetches a shared stage output; a run that skipped the stage making it
/// (`run.stages`) may hold it locally instead.
fn fetch_or_keep(shared: &SharedOutputs, local: &std::path::Path) -> Result<()> {
    match shared.fetch(local) {
        Ok(()) => Ok(()),
        Err(e) if local.is_file() => {
            tracing::warn!("{e:#}; using the local {} instead", local.display());
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// This rank's files of the dataset, encoded to dVAE tokens.
fn pretokenize(job: &JobConfig, rank: usize, world: usize) -> Result<()> {
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
            shard: (rank, world),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_round_trips_and_foreign_stages_are_refused() {
        let job = JobConfig::default();
        let plan = plan(&job);
        assert_eq!(from_plan(&plan).unwrap(), JobStage::DEFAULT);
        let mut job = JobConfig::default();
        job.run.stages = JobStage::ALL.to_vec();
        assert_eq!(from_plan(&super::plan(&job)).unwrap(), JobStage::ALL);
        let err = from_plan(&[PlanStage::all_ranks("distill")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"distill\"") && err.contains("dvae"), "{err}");
        let err = from_plan(&[PlanStage::all_ranks("export")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("export") && err.contains("rank 0"), "{err}");
        assert!(from_plan(&[]).is_err());
    }
}
