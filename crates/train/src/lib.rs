//! Training for dalle-rs: the optimizer (kept in the project so its state
//! can be saved), schedules, the dVAE and transformer training loops with
//! their metrics and held-out evaluation, and the job configuration that
//! drives them.

pub mod bucket_hooks;
pub mod checkpointing;
pub mod config;
pub mod ddp;
pub mod deferred;
pub mod dvae;
pub mod error;
pub mod eval;
pub mod feed;
pub mod flops;
pub mod gpt;
pub mod metrics;
pub mod optim;
pub mod rerank;
pub mod schedule;
mod stage_run;
pub mod threads;
pub mod validation;

pub use error::{Result, TrainError};
