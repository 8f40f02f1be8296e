//! Object storage for dalle-rs. One URL parser for every location the
//! project reads or writes — datasets, checkpoints, bundles:
//!
//! - `file:///abs/dir`, or a plain path (relative to the working directory)
//! - `s3://bucket/prefix` on any S3-compatible endpoint (endpoint, region,
//!   path-style addressing from [`StoreConfig`]; credentials only from the
//!   standard `AWS_*` environment variables, never logged)
//! - `memory://name/prefix`, a process-wide in-memory store for tests
//!
//! A [`Location`] is a store plus a prefix inside it. Transient errors are
//! retried with backoff up to a deadline; past it, the error names the URL.
//!
//! [`checkpoint`] stores training checkpoints on any of them: atomic commit
//! (objects, then a manifest), background upload, retention, verified loads.

pub mod checkpoint;
mod glob;
mod location;

pub use location::{Location, StoreConfig, StoreError};
pub use object_store;
