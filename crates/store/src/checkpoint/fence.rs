//! Fencing: a writer of an older group must not commit or delete anything
//! once a newer group has started.
//!
//! A group is named by its [`Fence`]: the job's epoch (the coordinator's
//! start, so that every group of a later job comes after every group of an
//! earlier one on the same run) and the generation within the job. Before
//! training, a group's writer *claims* the run: `RUN/fence.json` then names
//! its fence, unless a newer one is there already (then it is refused).
//! Right before each commit and each deletion the writer reads the marker
//! again and stops if a newer group has claimed the run.
//!
//! This is a check, then an act, on stores that do not all honour
//! conditional puts (Garage ignores them): a stale writer that read the
//! marker an instant before the newer group claimed it can still finish
//! that one commit. The window is the time between two requests, not the
//! minutes or hours a dropped process may sleep before it wakes up, which
//! is the case fencing is for. And a checkpoint records the fence that wrote
//! it, so a newer group can tell.

use super::{CheckpointError, Result};
use crate::Location;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

/// The marker's name under the run.
pub const FENCE: &str = "fence.json";

/// Which group of which job writes: later groups compare greater.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Fence {
    /// The job's epoch: when its coordinator first started (ms since the Unix
    /// epoch), kept when the coordinator restarts.
    pub epoch: u64,
    /// The group's generation within the job (1, 2, ...).
    pub generation: u64,
}

impl std::fmt::Display for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "generation {} of job epoch {}",
            self.generation, self.epoch
        )
    }
}

/// The fence the run's marker names, if any.
pub async fn read(run: &Location) -> Result<Option<Fence>> {
    let path = run.child(FENCE);
    let url = run.describe(&path);
    match run.store.get(&path).await {
        Ok(got) => {
            let bytes = got.bytes().await.map_err(|source| CheckpointError::Store {
                url: url.clone(),
                source,
            })?;
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| CheckpointError::Invalid(format!("{url}: unreadable fence: {e}")))
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(source) => Err(CheckpointError::Store { url, source }),
    }
}

/// Makes `mine` the run's fence, unless a newer group holds it.
pub async fn claim(run: &Location, mine: Fence) -> Result<()> {
    check(run, mine).await?;
    let path = run.child(FENCE);
    let json = serde_json::to_vec(&mine).expect("a fence serialises");
    run.store
        .put(&path, PutPayload::from(json))
        .await
        .map_err(|source| CheckpointError::Store {
            url: run.describe(&path),
            source,
        })?;
    Ok(())
}

/// `Err(Fenced)` when a newer group than `mine` has claimed the run.
pub async fn check(run: &Location, mine: Fence) -> Result<()> {
    match read(run).await? {
        Some(newer) if newer > mine => Err(CheckpointError::Fenced {
            url: run.describe(&run.child(FENCE)),
            mine,
            newer,
        }),
        _ => Ok(()),
    }
}
