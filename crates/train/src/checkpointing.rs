//! Checkpoints of a training stage: what goes in one, when one is taken,
//! and where a run resumes from.
//!
//! A checkpoint holds the model's weights, the optimizer's moments and step,
//! the data cursor and the job's config (the transformer's also its
//! tokenizer). Schedules are functions of the step, and random draws are
//! reseeded every step from (seed, rank, step), so nothing else is needed
//! to continue exactly: on CPU a resumed run ends bitwise equal to one that
//! never stopped. Rank 0 writes (in the background: the step only waits to
//! copy the state to host memory); every rank reads.

use crate::config::JobConfig;
use crate::ddp::DataParallel;
use crate::optim::AdamW;
use crate::{Result, TrainError};
use dalle_data::order::Cursor;
use dalle_model::weights;
use dalle_store::Location;
use dalle_store::checkpoint::{CheckpointConfig, Checkpointer, Fence, Loaded, Snapshot};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;
use tch::Tensor;

const MODEL: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const JOB: &str = "job.toml";
const TOKENIZER: &str = "tokenizer.json";

/// The optimizer's step count and its whole state as named tensors
/// ([`AdamW::state`], or gathered across ranks when sharded).
pub type OptimizerState = (u64, Vec<(String, Tensor)>);

/// `[checkpoint]`: when to checkpoint, what to keep, where to resume from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointPolicy {
    /// Where checkpoints go (path or URL); default `<run.dir>/checkpoints`.
    pub url: Option<String>,
    /// Take one every this many steps (0: none, except at a stage's end).
    pub every: u64,
    /// Committed checkpoints kept per stage…
    pub keep_last: usize,
    /// …plus every one whose step is a multiple of this.
    pub keep_every: Option<u64>,
    /// Continue from the newest committed checkpoint of the run, if any.
    pub resume: bool,
    /// Continue from this checkpoint (a `…/STAGE/step-N` URL) instead.
    pub resume_from: Option<String>,
    /// With `resume = false`, start over even if the run has checkpoints
    /// (they are overwritten as the new run reaches their steps).
    pub overwrite: bool,
    /// Save in the background (false: the step waits for the upload).
    pub asynchronous: bool,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self {
            url: None,
            every: 1000,
            keep_last: 3,
            keep_every: None,
            resume: true,
            resume_from: None,
            overwrite: false,
            asynchronous: true,
        }
    }
}

/// What [`StageCheckpoints::save`] records besides the tensors.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Progress {
    stage: String,
    step: u64,
    cursor: Cursor,
    world_size: usize,
    wall_seconds: f64,
    version: String,
}

/// Where a stage resumes.
pub struct Resume {
    pub step: u64,
    pub cursor: Cursor,
    pub url: String,
}

pub struct StageCheckpoints {
    store: Checkpointer,
    stage: String,
    policy: CheckpointPolicy,
    writer: bool,
    job_toml: String,
    extra: Vec<(String, Vec<u8>)>,
    started: Instant,
    store_config: dalle_store::StoreConfig,
    /// Checkpoints saved, and the time training waited for them.
    saved: u64,
    paused: std::time::Duration,
}

impl StageCheckpoints {
    /// The checkpoints of `stage` in the job's run; `writer` is the one
    /// rank that saves, for `group` (fenced: see
    /// [`dalle_store::checkpoint::Fence`]) when the group is named.
    pub fn open(job: &JobConfig, stage: &str, writer: bool, group: Option<Fence>) -> Result<Self> {
        let policy = job.checkpoint.clone();
        // Every rank resumes from the checkpoints: with workers on several
        // machines they live where all of them reach.
        let url = policy
            .url
            .clone()
            .unwrap_or_else(|| job.shared_output_url("checkpoints"));
        let location =
            Location::parse(&url, &job.store).map_err(|e| TrainError::Config(e.to_string()))?;
        let config = CheckpointConfig {
            keep_last: policy.keep_last.max(1),
            keep_every: policy.keep_every,
            fence: group.filter(|_| writer),
            ..CheckpointConfig::default()
        };
        Ok(Self {
            store: Checkpointer::new(location, config).map_err(checkpoint_error)?,
            stage: stage.to_string(),
            policy,
            writer,
            job_toml: job.to_toml(),
            extra: Vec::new(),
            started: Instant::now(),
            store_config: job.store.clone(),
            saved: 0,
            paused: std::time::Duration::ZERO,
        })
    }

    /// The caption tokenizer, carried by every checkpoint of stage 2.
    pub fn carry_tokenizer(&mut self, json: Vec<u8>) {
        self.extra.push((TOKENIZER.to_string(), json));
    }

    /// Restores `parameters` and `optimizer` from the checkpoint the policy
    /// names, and says where to continue; `None` starts from scratch.
    ///
    /// Rank 0 decides (and, as the writer, first claims the run for its
    /// group) and tells the others the step, which they load exactly: no
    /// rank can pick up a checkpoint another did not see. The loaded
    /// parameters are then checked to be identical on every rank.
    pub fn resume(
        &mut self,
        parameters: &HashMap<String, Tensor>,
        optimizer: &mut AdamW,
        ddp: &mut DataParallel,
    ) -> Result<Option<Resume>> {
        if self.writer {
            self.store.claim().map_err(checkpoint_error)?;
        }
        let chosen = if ddp.is_leader() {
            self.choose()?
        } else {
            None
        };
        const NONE: u64 = u64::MAX;
        let mut step = chosen.as_ref().map_or(NONE, |l| l.step).to_le_bytes();
        if ddp.world_size() > 1 {
            ddp.broadcast_from_leader(&mut step, "agreeing on the resume step")?;
        }
        let step = u64::from_le_bytes(step);
        let loaded = match (chosen, step) {
            (Some(loaded), _) => Some(loaded),
            (None, NONE) => None,
            (None, step) => Some(self.load_chosen(step)?),
        };
        let resumed = self.restore(loaded, parameters, optimizer)?;
        if ddp.world_size() > 1 {
            let mut sorted: Vec<(String, Tensor)> = parameters
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect();
            sorted.sort_by(|a, b| a.0.cmp(&b.0));
            ddp.verify_identical(&sorted).map_err(|e| {
                TrainError::Config(format!(
                    "after resuming stage {} at step {step}: {e}",
                    self.stage
                ))
            })?;
        }
        Ok(resumed)
    }

    /// Rank 0's choice of checkpoint, by the policy.
    fn choose(&mut self) -> Result<Option<Loaded>> {
        let loaded = match &self.policy.resume_from {
            Some(url) => {
                let location = Location::parse(url, &self.store_config)
                    .map_err(|e| TrainError::Config(e.to_string()))?;
                let loaded = self.store.load(&location).map_err(checkpoint_error)?;
                if loaded.stage != self.stage {
                    return Ok(None);
                }
                Some(loaded)
            }
            None if self.policy.resume => self
                .store
                .load_latest(&self.stage)
                .map_err(checkpoint_error)?,
            None => {
                if self.writer
                    && !self.policy.overwrite
                    && !self
                        .store
                        .committed_steps(&self.stage)
                        .map_err(checkpoint_error)?
                        .is_empty()
                {
                    return Err(TrainError::Config(format!(
                        "checkpoint.resume is off but {} already holds checkpoints of stage {}: \
                         set checkpoint.overwrite = true to start over, or use another run",
                        self.store.run().url,
                        self.stage
                    )));
                }
                if self.writer {
                    let gone = self
                        .store
                        .discard_after(&self.stage, 0)
                        .map_err(checkpoint_error)?;
                    if !gone.is_empty() {
                        tracing::warn!(stage = %self.stage, steps = ?gone, "starting over: discarded the run's checkpoints");
                    }
                }
                None
            }
        };
        if let Some(loaded) = &loaded
            && self.writer
            && self.policy.resume_from.is_some()
        {
            // Continuing from an older checkpoint: the newer ones of this
            // run belong to the abandoned future and would block new saves.
            self.store
                .discard_after(&self.stage, loaded.step)
                .map_err(checkpoint_error)?;
        }
        Ok(loaded)
    }

    /// The checkpoint at `step` that rank 0 chose: of `resume_from`, or of
    /// this run.
    fn load_chosen(&self, step: u64) -> Result<Loaded> {
        let loaded = match &self.policy.resume_from {
            Some(url) => {
                let location = Location::parse(url, &self.store_config)
                    .map_err(|e| TrainError::Config(e.to_string()))?;
                self.store.load(&location)
            }
            None => self.store.load_step(&self.stage, step),
        }
        .map_err(checkpoint_error)?;
        if loaded.step != step {
            return Err(TrainError::Config(format!(
                "{}: holds step {}, but rank 0 resumes stage {} at step {step}",
                loaded.url, loaded.step, self.stage
            )));
        }
        Ok(loaded)
    }

    /// Puts `loaded` into `parameters` and `optimizer`.
    fn restore(
        &mut self,
        loaded: Option<Loaded>,
        parameters: &HashMap<String, Tensor>,
        optimizer: &mut AdamW,
    ) -> Result<Option<Resume>> {
        let Some(loaded) = loaded else {
            return Ok(None);
        };
        for skipped in &loaded.skipped {
            tracing::error!(url = %skipped.url, reason = %skipped.reason, "skipped a bad checkpoint");
        }
        let progress: Progress = serde_json::from_value(loaded.metadata.clone()).map_err(|e| {
            TrainError::Config(format!("{}: unreadable progress record: {e}", loaded.url))
        })?;
        let object = |name: &str| {
            loaded.objects.get(name).ok_or_else(|| {
                TrainError::Config(format!("checkpoint {} lacks {name}", loaded.url))
            })
        };
        let model = weights::from_bytes(object(MODEL)?, Path::new(&loaded.url))?;
        model.assign(parameters, "", "")?;
        let state = weights::from_bytes(object(OPTIMIZER)?, Path::new(&loaded.url))?;
        let moments: Vec<(String, Tensor)> = state.tensors.into_iter().collect();
        optimizer
            .load_state(progress.step, &moments)
            .map_err(|e| TrainError::Config(format!("{}: {e}", loaded.url)))?;
        tracing::info!(
            stage = %self.stage, step = progress.step, url = %loaded.url,
            "resuming from a checkpoint"
        );
        Ok(Some(Resume {
            step: progress.step,
            cursor: progress.cursor,
            url: loaded.url.clone(),
        }))
    }

    /// Whether the step just finished (`done` of `last`) is checkpointed:
    /// every `every` steps, and at the stage's end.
    pub fn due(&self, done: u64, last: u64) -> bool {
        done == last || (self.policy.every > 0 && done.is_multiple_of(self.policy.every))
    }

    /// Saves the state after step `step` (writer rank only; others return).
    pub fn save(
        &mut self,
        step: u64,
        cursor: Cursor,
        world_size: usize,
        parameters: &[(String, Tensor)],
        optimizer_state: &OptimizerState,
    ) -> Result<()> {
        if !self.writer {
            return Ok(());
        }
        let pause = Instant::now();
        let result = self.save_now(step, cursor, world_size, parameters, optimizer_state);
        self.paused += pause.elapsed();
        self.saved += 1;
        result
    }

    fn save_now(
        &mut self,
        step: u64,
        cursor: Cursor,
        world_size: usize,
        parameters: &[(String, Tensor)],
        (opt_step, moments): &OptimizerState,
    ) -> Result<()> {
        let meta = HashMap::from([("step".to_string(), step.to_string())]);
        let opt_step = *opt_step;
        let mut objects = vec![
            (
                MODEL.to_string(),
                weights::to_bytes(parameters, HashMap::new(), Path::new(MODEL))?,
            ),
            (
                OPTIMIZER.to_string(),
                weights::to_bytes(moments, meta, Path::new(OPTIMIZER))?,
            ),
            (JOB.to_string(), self.job_toml.clone().into_bytes()),
        ];
        objects.extend(self.extra.iter().cloned());
        let progress = Progress {
            stage: self.stage.clone(),
            step: opt_step.max(step),
            cursor,
            world_size,
            wall_seconds: self.started.elapsed().as_secs_f64(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let snapshot = Snapshot {
            stage: self.stage.clone(),
            step,
            objects,
            metadata: serde_json::to_value(&progress).expect("progress serialises"),
        };
        if self.policy.asynchronous {
            // An error here is the previous save's: that checkpoint is lost,
            // the ones before it stay, and training goes on.
            if let Err(e) = self.store.save_async(snapshot) {
                tracing::error!("a checkpoint upload failed (training continues): {e}");
            }
        } else {
            self.store
                .save_blocking(snapshot)
                .map_err(checkpoint_error)?;
        }
        Ok(())
    }

    /// Waits for the save in flight, and logs what checkpoints cost.
    pub fn finish(&mut self) -> Result<()> {
        self.store.wait().map_err(checkpoint_error)?;
        if self.writer && self.saved > 0 {
            let elapsed = self.started.elapsed().as_secs_f64().max(1e-9);
            let paused = self.paused.as_secs_f64();
            tracing::info!(
                stage = %self.stage, saved = self.saved,
                asynchronous = self.policy.asynchronous,
                "checkpoints paused training for {paused:.3} s in all, {:.2}% of the stage's {elapsed:.1} s",
                100.0 * paused / elapsed
            );
        }
        Ok(())
    }
}

fn checkpoint_error(e: dalle_store::checkpoint::CheckpointError) -> TrainError {
    TrainError::Checkpoint(e.to_string())
}
