//! The blocking facade training loops use: an internal tokio runtime runs
//! one background save at a time, and loads.

use super::layout::{self, MANIFEST, ObjectEntry};
use super::{
    CheckpointConfig, CheckpointError, CommitInfo, Loaded, Result, Snapshot, reader, retention,
    writer,
};
use crate::Location;
use object_store::ObjectStoreExt;
use std::collections::BTreeSet;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// State shared by the facade and its background tasks.
pub struct Shared {
    pub run: Location,
    pub config: CheckpointConfig,
    /// (stage, step) of committed checkpoints that failed verification when
    /// this process loaded them: a new save of that step may replace them,
    /// and they do not count towards `keep_last`.
    known_bad: Mutex<BTreeSet<(String, u64)>>,
}

impl Shared {
    pub fn mark_bad(&self, stage: &str, step: u64) {
        self.known_bad
            .lock()
            .expect("known-bad lock")
            .insert((stage.to_string(), step));
    }

    pub fn is_bad(&self, stage: &str, step: u64) -> bool {
        self.known_bad
            .lock()
            .expect("known-bad lock")
            .contains(&(stage.to_string(), step))
    }
}

/// The save in flight.
struct InFlight {
    stage: String,
    step: u64,
    url: String,
    done: mpsc::Receiver<Result<CommitInfo>>,
}

/// Saves and loads the checkpoints of one run (`RUN`, a [`Location`]).
///
/// Call it from ordinary threads (training loops), not from async code:
/// its methods block. One `Checkpointer` per run writes; any number may read.
pub struct Checkpointer {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    in_flight: Option<InFlight>,
}

impl Checkpointer {
    pub fn new(run: Location, config: CheckpointConfig) -> Result<Self> {
        if config.part_bytes < 5 << 20 {
            return Err(CheckpointError::Invalid(format!(
                "part_bytes is {}; S3 multipart parts must be at least 5 MiB",
                config.part_bytes
            )));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("checkpoint")
            .enable_all()
            .build()
            .map_err(|e| CheckpointError::Task(format!("cannot start its runtime: {e}")))?;
        Ok(Self {
            shared: Arc::new(Shared {
                run,
                config,
                known_bad: Mutex::default(),
            }),
            runtime: Some(runtime),
            in_flight: None,
        })
    }

    /// The run's location.
    pub fn run(&self) -> &Location {
        &self.shared.run
    }

    pub fn config(&self) -> &CheckpointConfig {
        &self.shared.config
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("runtime lives until drop")
    }

    /// Runs `future` on the runtime and waits for it from this thread.
    fn block<T: Send + 'static>(
        &self,
        future: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.runtime().spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv()
            .map_err(|_| CheckpointError::Task("a checkpoint task panicked".into()))?
    }

    /// Queues `snapshot` for the background uploader and returns at once,
    /// unless a save is still in flight: then it first waits for that one.
    ///
    /// An `Err` is about the *previous* save (it did not commit; the
    /// checkpoint before it is still valid) or about `snapshot` being
    /// invalid (bad names; then nothing is queued). After a previous-save
    /// error `snapshot` **is** queued: log the error and train on.
    pub fn save_async(&mut self, snapshot: Snapshot) -> Result<()> {
        writer::validate(&snapshot)?;
        let previous = self.wait();
        let (stage, step) = (snapshot.stage.clone(), snapshot.step);
        let url = self
            .shared
            .run
            .describe(&layout::step_path(&self.shared.run, &stage, step));
        let (tx, done) = mpsc::sync_channel(1);
        let shared = self.shared.clone();
        self.runtime().spawn(async move {
            let _ = tx.send(save(shared, snapshot).await);
        });
        self.in_flight = Some(InFlight {
            stage,
            step,
            url,
            done,
        });
        previous.map(|_| ())
    }

    /// Saves `snapshot` and waits until it is committed (and retention
    /// ran). If an earlier async save had failed, that error is logged
    /// (`error`); the result is this save's.
    pub fn save_blocking(&mut self, snapshot: Snapshot) -> Result<CommitInfo> {
        let step = snapshot.step;
        let previous = self.save_async(snapshot);
        if let Err(CheckpointError::Invalid(reason)) = previous {
            return Err(CheckpointError::Invalid(reason));
        }
        let this = self.wait();
        if let Err(e) = previous {
            tracing::error!("{e} (before the blocking save of step {step})");
        }
        Ok(this?.expect("a save was queued"))
    }

    /// Waits for the save in flight: its commit, `None` if there was none,
    /// or its error (naming the step directory's URL).
    pub fn wait(&mut self) -> Result<Option<CommitInfo>> {
        let Some(flight) = self.in_flight.take() else {
            return Ok(None);
        };
        let outcome = flight
            .done
            .recv()
            .unwrap_or_else(|_| Err(CheckpointError::Task("the uploader panicked".into())));
        outcome
            .map(Some)
            .map_err(|source| CheckpointError::SaveFailed {
                stage: flight.stage,
                step: flight.step,
                url: flight.url,
                source: Box::new(source),
            })
    }

    /// Uploads `data` as object `name` of the checkpoint of `stage` at
    /// `step` that the writer rank is about to commit, and returns the
    /// entry to hand it (into [`Snapshot::external`]). For a rank's own
    /// share of a checkpoint, written in parallel with the others'.
    pub fn put_object(
        &self,
        stage: &str,
        step: u64,
        name: &str,
        data: Vec<u8>,
    ) -> Result<ObjectEntry> {
        let (shared, stage, name) = (self.shared.clone(), stage.to_string(), name.to_string());
        self.block(async move { writer::put_object(&shared, &stage, step, name, data).await })
    }

    /// Claims the run for this writer's group (its `fence`): from now on a
    /// writer of an older group commits and deletes nothing. `Err(Fenced)`
    /// when a newer group holds it already. Without a fence, nothing to do.
    pub fn claim(&self) -> Result<()> {
        let Some(mine) = self.config().fence else {
            return Ok(());
        };
        let run = self.shared.run.clone();
        self.block(async move { super::fence::claim(&run, mine).await })
    }

    /// The committed checkpoint of `stage` at `step` of this run, verified
    /// (no fallback).
    pub fn load_step(&self, stage: &str, step: u64) -> Result<Loaded> {
        layout::validate_stage(stage).map_err(CheckpointError::Invalid)?;
        let mut dir = self.shared.run.clone();
        dir.prefix = layout::step_path(&self.shared.run, stage, step);
        self.load(&dir)
    }

    /// Whether a save is in flight.
    pub fn saving(&self) -> bool {
        self.in_flight.is_some()
    }

    /// The newest committed checkpoint of `stage` that verifies, `None` if
    /// the stage has none. Corrupt or incomplete ones are logged and the
    /// previous one is tried (they are listed in [`Loaded::skipped`]); if
    /// checkpoints exist but none verifies, that is an error rather than a
    /// silent fresh start.
    pub fn load_latest(&self, stage: &str) -> Result<Option<Loaded>> {
        let shared = self.shared.clone();
        let stage = stage.to_string();
        self.block(async move { reader::load_latest(&shared, &stage).await })
    }

    /// Loads and verifies the checkpoint at `step_dir` (a `step-N`
    /// directory, or its `manifest.json`), of this run or any other
    /// (`--resume-from`). No fallback: a bad checkpoint is an error.
    pub fn load(&self, step_dir: &Location) -> Result<Loaded> {
        let mut loc = step_dir.clone();
        if loc.prefix.filename() == Some(MANIFEST) {
            loc.prefix = loc
                .prefix
                .parts()
                .take(loc.prefix.parts().count() - 1)
                .collect();
        }
        let (part_bytes, concurrency) = (self.config().part_bytes, self.config().concurrency);
        self.block(async move {
            let dir = loc.prefix.clone();
            reader::load_dir(&loc, &dir, part_bytes, concurrency).await
        })
    }

    /// Whether any stage of the run holds a committed checkpoint (for
    /// refusing to start over on top of an existing run).
    pub fn exists(&self) -> Result<bool> {
        let run = self.shared.run.clone();
        self.block(async move {
            let listing = run
                .store
                .list_with_delimiter(Some(&run.prefix))
                .await
                .map_err(|source| CheckpointError::Store {
                    url: run.url.clone(),
                    source,
                })?;
            for stage in listing.common_prefixes {
                let Some(name) = stage.filename() else {
                    continue;
                };
                if layout::validate_stage(name).is_ok()
                    && layout::scan(&run, name)
                        .await?
                        .values()
                        .any(|d| d.committed)
                {
                    return Ok(true);
                }
            }
            Ok(false)
        })
    }

    /// Committed steps of `stage`, oldest first (unverified).
    pub fn committed_steps(&self, stage: &str) -> Result<Vec<u64>> {
        layout::validate_stage(stage).map_err(CheckpointError::Invalid)?;
        let run = self.shared.run.clone();
        let stage = stage.to_string();
        self.block(async move {
            Ok(layout::scan(&run, &stage)
                .await?
                .into_iter()
                .filter(|(_, d)| d.committed)
                .map(|(s, _)| s)
                .collect())
        })
    }

    /// Deletes the committed checkpoints of `stage` newer than `step`
    /// (manifests first), so that a run resumed from an older step can
    /// save over them. Returns the steps deleted.
    pub fn discard_after(&mut self, stage: &str, step: u64) -> Result<Vec<u64>> {
        self.wait()?;
        layout::validate_stage(stage).map_err(CheckpointError::Invalid)?;
        let run = self.shared.run.clone();
        let stage = stage.to_string();
        let fence = self.config().fence;
        self.block(async move {
            if let Some(mine) = fence {
                super::fence::check(&run, mine).await?;
            }
            let mut deleted = Vec::new();
            for (s, dir) in layout::scan(&run, &stage).await?.into_iter().rev() {
                if s <= step {
                    break;
                }
                let path = layout::step_path(&run, &stage, s);
                let manifest = layout::child(&path, MANIFEST);
                writer::delete_all(&run, vec![manifest.clone()]).await?;
                let rest = dir.objects.into_iter().filter(|p| *p != manifest).collect();
                writer::delete_all(&run, rest).await?;
                if let Some(local) = layout::local_dir(&run, &path) {
                    layout::remove_empty_dirs(&local);
                }
                tracing::warn!(
                    "{}: discarded (newer than step {step})",
                    run.describe(&path)
                );
                if dir.committed {
                    deleted.push(s);
                }
            }
            // The pointer must not name a discarded step.
            let latest = run.child(&format!("{stage}/{}", layout::LATEST));
            let pointer = format!("{}\n", layout::step_dir_name(step));
            if !deleted.is_empty() {
                run.store
                    .put(&latest, pointer.into())
                    .await
                    .map_err(|source| CheckpointError::Store {
                        url: run.describe(&latest),
                        source,
                    })?;
            }
            deleted.reverse();
            Ok(deleted)
        })
    }
}

/// One background save: commit, then retention (whose failure is logged:
/// the checkpoint is committed all the same).
async fn save(shared: Arc<Shared>, snapshot: Snapshot) -> Result<CommitInfo> {
    let mut info = writer::commit(&shared, snapshot).await?;
    if let Err(e) = retention::apply(&shared, &mut info).await {
        tracing::warn!(
            "{}: retention after committing step {} failed (will be retried after the next commit): {e}",
            shared.run.url,
            info.step
        );
    }
    tracing::info!(
        "{}: committed step {} ({:.1} MB in {:.2} s)",
        info.url,
        info.step,
        info.bytes as f64 / 1e6,
        info.seconds
    );
    Ok(info)
}

impl Drop for Checkpointer {
    /// Finishes the save in flight, so a loop that forgot `wait` loses
    /// nothing.
    fn drop(&mut self) {
        if let Err(e) = self.wait() {
            tracing::error!("{e}");
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
