//! What both training loops do around their steps, whatever the model:
//! resuming from the stage's newest checkpoint, and after every step the
//! log line when due (to the log and the metrics file), the weights, the
//! sample ledger, the checkpoint and the step hook, in that order; at the
//! end, the last checkpoint upload and weights a resumed-at-the-end stage
//! did not rewrite.

use crate::checkpointing::StageCheckpoints;
use crate::config::JobConfig;
use crate::ddp::{DataParallel, StepEnd};
use crate::feed::Ledger;
use crate::metrics::MetricsFile;
use crate::optim::AdamW;
use crate::{Result, TrainError};
use dalle_data::loader::Batch;
use dalle_data::order::Cursor;
use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tch::Tensor;

/// How a stage is scheduled: its name (for checkpoints, ledger and files)
/// and its step counts.
pub(crate) struct StagePlan {
    pub name: &'static str,
    pub steps: u64,
    pub log_every: u64,
    /// Weights every this many steps (0: only at the end).
    pub save_every: u64,
    /// Where rank 0 writes the weights.
    pub weights: PathBuf,
}

/// One stage's training run on this rank.
pub(crate) struct StageRun {
    plan: StagePlan,
    checkpoints: StageCheckpoints,
    metrics: MetricsFile,
    ledger: Ledger,
    leader: bool,
    rank: usize,
    first_step: u64,
    cursor: Cursor,
}

impl StageRun {
    /// Opens the stage's checkpoints (carrying `tokenizer` in each, for
    /// stage 2), restores `parameters` and `optimizer` from the newest one
    /// the policy allows, and opens the metrics file and ledger.
    pub fn resume(
        job: &JobConfig,
        plan: StagePlan,
        ddp: &mut DataParallel,
        tokenizer: Option<Vec<u8>>,
        parameters: &HashMap<String, Tensor>,
        optimizer: &mut AdamW,
    ) -> Result<Self> {
        let leader = ddp.is_leader();
        let mut checkpoints = StageCheckpoints::open(job, plan.name, leader, ddp.group())?;
        if let Some(json) = tokenizer {
            checkpoints.carry_tokenizer(json);
        }
        let resume = checkpoints.resume(parameters, optimizer, ddp)?;
        let (first_step, cursor) = resume
            .as_ref()
            .map_or((0, Cursor::start(job.run.seed)), |r| (r.step, r.cursor));
        let metrics = MetricsFile::create(
            &job.run.dir.join(format!("{}-metrics.jsonl", plan.name)),
            leader,
            resume.is_some(),
        )?;
        let generation = ddp.group().map_or(0, |g| g.generation);
        let ledger = Ledger::open(job, plan.name, ddp.rank(), ddp.world_size(), generation)?;
        Ok(Self {
            plan,
            checkpoints,
            metrics,
            ledger,
            leader,
            rank: ddp.rank(),
            first_step,
            cursor,
        })
    }

    /// The first step to train (0, or where the checkpoint left off).
    pub fn first_step(&self) -> u64 {
        self.first_step
    }

    /// Where the data order continues.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// The weights file.
    pub fn weights(&self) -> &Path {
        &self.plan.weights
    }

    /// Whether `done` steps end a log window.
    pub fn log_due(&self, done: u64) -> bool {
        done.is_multiple_of(self.plan.log_every.max(1)) || done == self.plan.steps
    }

    /// Whether step `done` must read the steps' scalars kept on the device
    /// ([`crate::deferred`]): it ends a log window, or writes weights or a
    /// checkpoint, which must not hold the result of a step that diverged.
    pub fn reads_due(&self, done: u64) -> bool {
        let weights = self.plan.save_every > 0 && done.is_multiple_of(self.plan.save_every);
        self.log_due(done) || weights || self.checkpoints.due(done, self.plan.steps)
    }

    /// Writes a log line to the log and the metrics file.
    pub fn log(&mut self, line: &(impl Display + Serialize)) -> Result<()> {
        // The line's step and model FLOP/s as fields too, for JSON logs and
        // the figures a worker sends its coordinator.
        let figures = serde_json::to_value(line).unwrap_or_default();
        let step = figures.get("step").and_then(serde_json::Value::as_u64);
        let tflops = figures.get("tflops").and_then(serde_json::Value::as_f64);
        let mfu = figures.get("mfu").and_then(serde_json::Value::as_f64);
        let (rank, stage) = (self.rank, self.plan.name);
        // Under the loop's own target, which log filters and readers use;
        // `rank` last, as text lines always ended.
        match self.plan.name {
            "dvae" => {
                tracing::info!(target: "dalle_train::dvae", stage, step, tflops, mfu, rank, "{line}")
            }
            "gpt" => {
                tracing::info!(target: "dalle_train::gpt", stage, step, tflops, mfu, rank, "{line}")
            }
            "rerank" => {
                tracing::info!(target: "dalle_train::rerank", stage, step, tflops, mfu, rank, "{line}")
            }
            _ => tracing::info!(stage, step, tflops, mfu, rank, "{line}"),
        }
        self.metrics.append(line)
    }

    /// Everything after step `done`'s optimizer step and log line: rank 0's
    /// weights (`save` writes them) when due, the ledger, the checkpoint,
    /// and the step hook (which may stop training here).
    #[allow(clippy::too_many_arguments)]
    pub fn end_step(
        &mut self,
        ddp: &mut DataParallel,
        done: u64,
        batch: &Batch,
        timing: StepTiming,
        loss: f64,
        save: impl FnOnce(&Path) -> dalle_model::Result<()>,
        parameters: &[(String, Tensor)],
        optimizer: &AdamW,
    ) -> Result<()> {
        let periodic = self.plan.save_every > 0 && done.is_multiple_of(self.plan.save_every);
        if self.leader && (periodic || done == self.plan.steps) {
            save(&self.plan.weights)?;
        }
        self.ledger.record(done, &batch.keys)?;
        if self.checkpoints.due(done, self.plan.steps) {
            self.checkpoints
                .save(done, batch.cursor, parameters, optimizer, ddp)?;
        }
        let seconds = timing.step.as_secs_f64().max(1e-9);
        ddp.end_step(&StepEnd {
            step: done,
            loss,
            samples_per_second: batch.len() as f64 / seconds,
            data_wait: timing.data_wait.as_secs_f64() / seconds,
        })
    }

    /// After the last step: waits for the last checkpoint upload, and
    /// writes the weights when the stage resumed from its final checkpoint
    /// (no step ran to write them).
    pub fn finish(&mut self, save: impl FnOnce(&Path) -> dalle_model::Result<()>) -> Result<()> {
        self.checkpoints.finish()?;
        if self.first_step >= self.plan.steps && self.leader {
            save(&self.plan.weights).map_err(TrainError::from)?;
        }
        Ok(())
    }
}

/// How long a step took, and how much of it went to waiting on data.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepTiming {
    pub step: Duration,
    pub data_wait: Duration,
}

impl StepTiming {
    /// Since `started`, of which `data_wait` waiting on data.
    pub fn since(started: Instant, data_wait: Duration) -> Self {
        Self {
            step: started.elapsed(),
            data_wait,
        }
    }
}
