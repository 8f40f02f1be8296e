//! Checkpoints: a set of named byte blobs plus JSON metadata, committed
//! atomically to any [`Location`](crate::Location) (`file://`, `s3://`,
//! `memory://`), uploaded in the background, pruned by a retention rule, and
//! verified when loaded.
//!
//! # Layout and commit protocol
//!
//! ```text
//! RUN/STAGE/step-0000000042/<object names>   1. every object (multipart when large)
//! RUN/STAGE/step-0000000042/manifest.json    2. names, sizes, CRC-32C, metadata
//! RUN/STAGE/latest                           3. "step-0000000042\n"
//! ```
//!
//! A checkpoint exists once its manifest does, and only then. The manifest
//! is written create-only where the store honours it; an existing manifest
//! for the same step is an error, checked before anything is written (S3
//! servers such as Garage ignore `If-None-Match`, so that check is what
//! protects a committed checkpoint there; one writer per run is assumed).
//! `latest` is a hint for people and tools: loading lists the stage's step
//! directories, so a crash between the manifest and the pointer loses
//! nothing.
//!
//! # Failures
//!
//! - A save that fails (after object_store's own retries, see
//!   [`StoreConfig`](crate::StoreConfig)) leaves the previous checkpoint
//!   valid; its error, naming the URL, comes back from the next
//!   [`Checkpointer::save_async`] or [`Checkpointer::wait`]. Training can
//!   go on: the next save is a fresh attempt.
//! - Loading verifies every object's size and checksum. A corrupt or
//!   incomplete checkpoint is logged (`error`, naming the object and what is
//!   wrong) and the previous committed one is tried; a store error that is
//!   not a missing object stops the load instead (falling back because of a
//!   network error would silently go back in time). A checkpoint that
//!   failed verification may be replaced by the next save of its step.
//! - The objects of a save that never committed are removed by the next
//!   commit's retention pass, and on local disks so are the `<name>#<N>`
//!   staging files of writes killed before their rename (listings hide
//!   them).
//! - A manifest's sizes are checked against the store's before any buffer
//!   is sized by them, so a damaged manifest is a corrupt checkpoint (and
//!   loading falls back), not a huge allocation.
//! - A writer given a [`Fence`] (its group) claims the run before training
//!   and commits or deletes nothing once a newer group has claimed it, so a
//!   process dropped as hung that wakes up later cannot commit over the new
//!   group's checkpoints or prune its upload in progress (see `fence.rs` for
//!   what this does on stores without conditional puts).
//! - Local files are not fsynced (object_store's default): after a power
//!   loss a manifest may survive objects that did not reach the disk;
//!   verification then finds them and the previous checkpoint is used.
//!
//! # Checksum
//!
//! CRC-32C (the `crc32c` crate): it catches the accidents checkpoints meet
//! (truncation, bit flips, a part written twice or lost) at 10+ GB/s with
//! SSE4.2 / ARMv8 instructions, so checksumming costs nothing next to the
//! upload, which matters because it runs beside training. It is also the
//! checksum S3 offers natively. SHA-256 would guard against deliberate
//! tampering, which is not the threat here, at about a tenth of the speed.

mod bench;
mod checkpointer;
mod fence;
mod layout;
mod pins;
mod reader;
mod retention;
mod writer;

#[cfg(test)]
mod tests;

pub use bench::{BenchReport, bench};
pub use checkpointer::Checkpointer;
pub use fence::{FENCE, Fence};
pub use layout::{LATEST, MANIFEST, Manifest, ObjectEntry, step_dir_name};
pub use retention::{RetentionPlan, plan_retention};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How checkpoints are kept and uploaded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Keep the newest `keep_last` committed checkpoints of a stage (at
    /// least 1: the newest committed one is never deleted).
    pub keep_last: usize,
    /// Also keep, forever, every checkpoint whose step is a multiple of this.
    pub keep_every: Option<u64>,
    /// Objects larger than this go as multipart uploads of parts this size,
    /// and are read back by ranges of this size (S3 wants parts ≥ 5 MiB).
    pub part_bytes: usize,
    /// Requests in flight at once, per save or load.
    pub concurrency: usize,
    /// The group this writer belongs to: set, it claims the run
    /// ([`Checkpointer::claim`]), records itself in every manifest, and
    /// commits or deletes nothing once a newer group has claimed the run.
    #[serde(skip)]
    pub fence: Option<Fence>,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            keep_last: 3,
            keep_every: None,
            part_bytes: 16 << 20,
            concurrency: 8,
            fence: None,
        }
    }
}

/// What a training loop hands over: everything needed to continue, as named
/// byte blobs (weights, optimizer state, RNG, data cursor, ...) plus JSON
/// metadata (stage, step, samples seen, world size, versions, ...).
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// One path segment of `[A-Za-z0-9._-]`, e.g. `dvae` or `gpt`.
    pub stage: String,
    pub step: u64,
    /// Names are `/`-separated segments of `[A-Za-z0-9._-]`, unique.
    pub objects: Vec<(String, Vec<u8>)>,
    /// Objects of this checkpoint that other ranks uploaded already
    /// ([`Checkpointer::put_object`]: each rank's shard of a sharded
    /// optimizer). The commit checks they are there, at their size, and
    /// lists them in the manifest beside `objects`.
    pub external: Vec<ObjectEntry>,
    pub metadata: serde_json::Value,
}

/// A committed checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct CommitInfo {
    pub stage: String,
    pub step: u64,
    /// The step directory's URL.
    pub url: String,
    /// Bytes of all objects.
    pub bytes: u64,
    /// From the start of the upload to the manifest (retention excluded).
    pub seconds: f64,
    /// Committed checkpoints deleted by retention after this commit.
    pub deleted: Vec<u64>,
    /// Step directories of saves that never committed, removed.
    pub removed_incomplete: Vec<u64>,
}

/// A checkpoint read back and verified. While it is alive, retention in
/// this process does not delete it.
pub struct Loaded {
    pub stage: String,
    pub step: u64,
    /// The step directory's URL.
    pub url: String,
    pub metadata: serde_json::Value,
    pub objects: BTreeMap<String, Vec<u8>>,
    /// Newer checkpoints that were passed over, and why.
    pub skipped: Vec<Skipped>,
    _pin: pins::Pin,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sizes: BTreeMap<&str, usize> = self
            .objects
            .iter()
            .map(|(k, v)| (k.as_str(), v.len()))
            .collect();
        f.debug_struct("Loaded")
            .field("stage", &self.stage)
            .field("step", &self.step)
            .field("url", &self.url)
            .field("metadata", &self.metadata)
            .field("object_sizes", &sizes)
            .field("skipped", &self.skipped)
            .finish()
    }
}

/// A checkpoint that [`Checkpointer::load_latest`] did not use.
#[derive(Clone, Debug, PartialEq)]
pub struct Skipped {
    pub step: u64,
    pub url: String,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{url}: {source}")]
    Store {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error(
        "{url}: a checkpoint of this step is already committed there (its manifest exists); \
         refusing to overwrite it (resuming an older step of the same run needs \
         `discard_after` or another run URL)"
    )]
    AlreadyCommitted { url: String },
    #[error("{url}: no committed checkpoint there (no manifest)")]
    NotCommitted { url: String },
    #[error("{url}: {reason}")]
    Corrupt { url: String, reason: String },
    #[error("{url}: not a usable checkpoint manifest: {reason}")]
    BadManifest { url: String, reason: String },
    #[error(
        "{url}: checkpoints exist but none verifies ({}); refusing to start over silently",
        .skipped.iter().map(|s| format!("step {}: {}", s.step, s.reason)).collect::<Vec<_>>().join("; ")
    )]
    NoneValid { url: String, skipped: Vec<Skipped> },
    #[error("invalid checkpoint: {0}")]
    Invalid(String),
    #[error(
        "{url}: {newer} has claimed the run; this writer ({mine}) must not commit or delete \
         anything any more (a process dropped from its group that woke up?)"
    )]
    Fenced {
        url: String,
        mine: Fence,
        newer: Fence,
    },
    #[error("checkpoint of stage `{stage}` step {step} at {url} was not committed: {source}")]
    SaveFailed {
        stage: String,
        step: u64,
        url: String,
        #[source]
        source: Box<CheckpointError>,
    },
    #[error("checkpoint background task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Location(#[from] crate::StoreError),
}

impl CheckpointError {
    /// Errors that mean "this checkpoint is unusable", as opposed to "the
    /// store could not be reached": only these make loading fall back.
    fn is_bad_checkpoint(&self) -> bool {
        matches!(
            self,
            Self::Corrupt { .. } | Self::BadManifest { .. } | Self::NotCommitted { .. }
        )
    }
}

pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;
