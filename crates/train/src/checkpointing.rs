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
use dalle_store::checkpoint::{
    CheckpointConfig, Checkpointer, Fence, Loaded, ObjectEntry, Snapshot,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;
use tch::Tensor;

const MODEL: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
/// A sharded optimizer's state: one object per rank,
/// `optimizer-shard-RANK-of-WORLD.safetensors`.
const OPTIMIZER_SHARD: &str = "optimizer-shard-";
/// Bytes a rank's entry for its share takes when passed to the writer.
const SHARE_MESSAGE: usize = 512;
const JOB: &str = "job.toml";
const TOKENIZER: &str = "tokenizer.json";

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
            // Every rank: the writer's commits and deletions, and each
            // rank's upload of its share of a sharded checkpoint.
            fence: group,
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
        let restored = if loaded.objects.contains_key(OPTIMIZER) {
            let state = weights::from_bytes(object(OPTIMIZER)?, Path::new(&loaded.url))?;
            let moments: Vec<(String, Tensor)> = state.tensors.into_iter().collect();
            optimizer.load_state(progress.step, &moments)
        } else {
            // Saved sharded, at whatever world size: this rank takes its
            // share from the pieces of every rank's.
            let mut pieces = Vec::new();
            for (name, bytes) in &loaded.objects {
                if name.starts_with(OPTIMIZER_SHARD) {
                    let url = format!("{}/{name}", loaded.url);
                    pieces.extend(weights::from_bytes(bytes, Path::new(&url))?.tensors);
                }
            }
            if pieces.is_empty() {
                return Err(TrainError::Config(format!(
                    "checkpoint {} lacks {OPTIMIZER} and has no {OPTIMIZER_SHARD}* shares",
                    loaded.url
                )));
            }
            optimizer.load_shards(progress.step, &pieces)
        };
        restored.map_err(|e| TrainError::Config(format!("{}: {e}", loaded.url)))?;
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

    /// Saves the state after step `step`. Every rank calls it: the writer
    /// commits the checkpoint; with a sharded optimizer every rank first
    /// uploads its own share of the optimizer state, in parallel, and hands
    /// the writer its entry for the manifest.
    pub fn save(
        &mut self,
        step: u64,
        cursor: Cursor,
        parameters: &[(String, Tensor)],
        optimizer: &AdamW,
        ddp: &mut DataParallel,
    ) -> Result<()> {
        let pause = Instant::now();
        let meta = HashMap::from([("step".to_string(), step.to_string())]);
        let (optimizer_objects, external) = if optimizer.is_sharded() {
            let (rank, world) = (ddp.rank(), ddp.world_size());
            let name = format!("{OPTIMIZER_SHARD}{rank:05}-of-{world:05}.safetensors");
            let bytes = weights::to_bytes(&optimizer.shard_state(), meta, Path::new(&name))?;
            if self.writer {
                let external = self.shares_of_others(step, ddp, None)?;
                (vec![(name, bytes)], external)
            } else {
                let put = self.store.put_object(&self.stage, step, &name, bytes);
                self.shares_of_others(step, ddp, Some(put))?;
                self.paused += pause.elapsed();
                return Ok(());
            }
        } else if self.writer {
            let (_, moments) = optimizer.state();
            let bytes = weights::to_bytes(&moments, meta, Path::new(OPTIMIZER))?;
            (vec![(OPTIMIZER.to_string(), bytes)], Some(Vec::new()))
        } else {
            return Ok(());
        };
        let result = match external {
            Some(external) => self.save_now(
                step,
                cursor,
                ddp.world_size(),
                optimizer.steps_taken(),
                parameters,
                optimizer_objects,
                external,
            ),
            // A rank could not upload its share: this checkpoint is lost
            // (the ones before it stay) and training goes on, as when an
            // asynchronous upload fails.
            None => Ok(()),
        };
        self.paused += pause.elapsed();
        self.saved += 1;
        result
    }

    /// Every other rank's entry for its share of the checkpoint at `step`
    /// (this rank's upload is `mine`, or `None` on the writer), passed to
    /// the writer one rank at a time; `None` on the writer when a share is
    /// missing, after logging which.
    fn shares_of_others(
        &mut self,
        step: u64,
        ddp: &mut DataParallel,
        mine: Option<dalle_store::checkpoint::Result<ObjectEntry>>,
    ) -> Result<Option<Vec<ObjectEntry>>> {
        let mine = mine.map(|put| {
            put.map_err(|e| {
                tracing::error!(stage = %self.stage, step, "uploading this rank's share of the checkpoint failed: {e}");
                e.to_string()
            })
        });
        let mut entries = Vec::new();
        let mut complete = true;
        for root in 1..ddp.world_size() {
            let mut message = [0u8; SHARE_MESSAGE];
            if root == ddp.rank() {
                let json = serde_json::to_vec(mine.as_ref().expect("a rank's own upload"))
                    .expect("an entry serialises");
                if json.len() > SHARE_MESSAGE - 4 {
                    return Err(TrainError::Checkpoint(format!(
                        "this rank's checkpoint entry takes {} bytes, over the {SHARE_MESSAGE} that are exchanged",
                        json.len()
                    )));
                }
                message[..4].copy_from_slice(&(json.len() as u32).to_le_bytes());
                message[4..4 + json.len()].copy_from_slice(&json);
            }
            ddp.broadcast_from(root, &mut message, "collecting the checkpoint's shares")?;
            if !self.writer {
                continue;
            }
            let len = u32::from_le_bytes(message[..4].try_into().expect("4 bytes")) as usize;
            let told: std::result::Result<ObjectEntry, String> = serde_json::from_slice(
                &message[4..4 + len.min(SHARE_MESSAGE - 4)],
            )
            .map_err(|e| TrainError::Checkpoint(format!("rank {root}'s checkpoint entry: {e}")))?;
            match told {
                Ok(entry) => entries.push(entry),
                Err(e) => {
                    tracing::error!(
                        stage = %self.stage, step,
                        "rank {root} could not upload its share of the checkpoint, which is \
                         skipped (training goes on): {e}"
                    );
                    complete = false;
                }
            }
        }
        Ok(complete.then_some(entries))
    }

    #[allow(clippy::too_many_arguments)]
    fn save_now(
        &mut self,
        step: u64,
        cursor: Cursor,
        world_size: usize,
        opt_step: u64,
        parameters: &[(String, Tensor)],
        optimizer_objects: Vec<(String, Vec<u8>)>,
        external: Vec<ObjectEntry>,
    ) -> Result<()> {
        let mut objects = vec![
            (
                MODEL.to_string(),
                weights::to_bytes(parameters, HashMap::new(), Path::new(MODEL))?,
            ),
            (JOB.to_string(), self.job_toml.clone().into_bytes()),
        ];
        objects.extend(optimizer_objects);
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
            external,
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
