//! The distributed runtime's control plane: a gRPC coordinator and the
//! worker's side of it.
//!
//! - [`coordinator`]: rendezvous (ranks, world size, ring peers or the NCCL
//!   id, the job's config), heartbeats, failure detection and re-formation
//!   of the group within a restart budget, a job-level log line, and an HTTP
//!   status page with Prometheus metrics.
//! - the stage plan: the coordinator hands every group the job's stages
//!   ([`PlanStage`]) and where to start in them; workers report each stage
//!   done, and a re-formed group starts at the first stage not complete.
//! - [`worker`]: a blocking client for the synchronous training loop: join,
//!   heartbeats fed with step metrics (and held-out figures) in the
//!   background, the coordinator's latest [`Instruction`], leave.
//!
//! The service is `dalle.v1.Coordinator` (`proto/dalle/v1/coordinator.proto`);
//! every call carries the job [`Token`]. The coordinator holds no tensors and
//! does not depend on CUDA: the NCCL unique id comes from a callback.

mod auth;
pub mod coordinator;
mod error;
mod tls;
pub mod worker;

/// The generated gRPC types and stubs of `dalle.v1`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("dalle.v1");
}

use std::fmt;
use std::str::FromStr;

pub use auth::Token;
pub use coordinator::{
    Coordinator, CoordinatorConfig, CoordinatorHandle, JobOutcome, JobStateStore, JobStatus,
    StageState, StageStatus, StateStore, WorkerSupply,
};
pub use error::RuntimeError;
pub use tls::{ClientTls, ServerTls};
pub use worker::{Assignment, Departure, Heartbeats, JoinInfo, Membership};

/// The protocol a worker and its coordinator must both speak; bumped with
/// any incompatible change of `dalle.v1` (see the proto file).
pub const PROTOCOL_VERSION: u32 = 2;

/// Which collective carries the gradients; chosen by the coordinator and
/// handed to every worker in its assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The TCP ring all-reduce between the workers' `data_addr`s (CPU).
    TcpRing,
    /// NCCL, bootstrapped from the unique id in the assignment (GPU).
    Nccl,
}

impl Backend {
    /// The name on the wire and in configs: `tcp-ring` or `nccl`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::TcpRing => "tcp-ring",
            Backend::Nccl => "nccl",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Backend {
    type Err = RuntimeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp-ring" => Ok(Backend::TcpRing),
            "nccl" => Ok(Backend::Nccl),
            other => Err(RuntimeError::Config(format!(
                "unknown backend {other:?}: expected \"tcp-ring\" or \"nccl\""
            ))),
        }
    }
}

/// One stage of a job's plan: the coordinator owns the plan and hands it to
/// every group; workers run each stage by its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanStage {
    /// What the workers run, e.g. "dvae" or "export".
    pub name: String,
    /// Rank 0 alone does the work; the other ranks wait at the barrier
    /// that ends the stage.
    pub leader_only: bool,
}

impl PlanStage {
    /// A stage every rank runs (data parallel, or split by the shard plan).
    pub fn all_ranks(name: impl Into<String>) -> Self {
        PlanStage {
            name: name.into(),
            leader_only: false,
        }
    }

    /// A stage rank 0 runs alone.
    pub fn leader(name: impl Into<String>) -> Self {
        PlanStage {
            name: name.into(),
            leader_only: true,
        }
    }
}

/// What a worker reports after a finished step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// The step just finished (global step, the same on every rank).
    pub step: u64,
    /// This worker's loss at that step.
    pub loss: f64,
    /// Samples per second this worker processed.
    pub samples_per_second: f64,
    /// Share of step time spent waiting on data, 0..1.
    pub data_wait_share: f64,
}

/// A stage's figures on its validation set after a step: means over every
/// rank's held-out samples (the same on every rank). Each stage sets what
/// it measures: the dVAE its reconstruction, the transformer its losses.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ValidationReport {
    /// Steps finished when evaluated.
    pub step: u64,
    /// Held-out samples evaluated, over every rank.
    pub samples: u64,
    /// dVAE: reconstruction loss per image dimension through argmax tokens.
    pub recon: Option<f64>,
    /// dVAE: PSNR (dB) of the images decoded from argmax tokens.
    pub psnr_db: Option<f64>,
    /// dVAE: distinct codes over the validation set.
    pub codes_used: Option<u32>,
    /// dVAE: perplexity of the code histogram over the validation set.
    pub code_perplexity: Option<f64>,
    /// Transformer: nats per caption token.
    pub text_loss: Option<f64>,
    /// Transformer: nats per image token.
    pub image_loss: Option<f64>,
    /// Reranker: contrastive loss of the whole validation set, nats.
    pub rerank_loss: Option<f64>,
    /// Reranker: share of held-out images whose own caption ranks first.
    pub rerank_top1: Option<f64>,
}

impl From<ValidationReport> for proto::Validation {
    fn from(v: ValidationReport) -> Self {
        proto::Validation {
            step: v.step,
            samples: v.samples,
            recon: v.recon,
            psnr_db: v.psnr_db,
            codes_used: v.codes_used,
            code_perplexity: v.code_perplexity,
            text_loss: v.text_loss,
            image_loss: v.image_loss,
            rerank_loss: v.rerank_loss,
            rerank_top1: v.rerank_top1,
        }
    }
}

impl From<proto::Validation> for ValidationReport {
    fn from(v: proto::Validation) -> Self {
        ValidationReport {
            step: v.step,
            samples: v.samples,
            recon: v.recon,
            psnr_db: v.psnr_db,
            codes_used: v.codes_used,
            code_perplexity: v.code_perplexity,
            text_loss: v.text_loss,
            image_loss: v.image_loss,
            rerank_loss: v.rerank_loss,
            rerank_top1: v.rerank_top1,
        }
    }
}

/// What the coordinator tells a worker to do at its next step boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    /// Carry on training.
    Continue,
    /// Leave the collective at the next step boundary and join again
    /// ([`Membership::join`]); then resume from the newest checkpoint.
    Reform {
        /// Why (which worker failed, and how).
        reason: String,
    },
    /// The job is over, finished or aborted: stop and exit.
    Stop {
        /// Why (finished at step N, the restart budget is spent, the
        /// coordinator is unreachable...).
        reason: String,
    },
}
