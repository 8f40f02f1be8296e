//! The status page's JSON route, `GET /status.json`: a [`JobStatus`] for
//! scripts and `dalle status`, durations in seconds and times in
//! milliseconds since the Unix epoch. The types deserialise too, so that a
//! client reads what the route writes; fields are only ever added (with
//! [`FORMAT`] unchanged), and absent optional figures are left out.

use serde::{Deserialize, Serialize};

use super::{JobStatus, Reformation as ReformationStatus, StageStatus, WorkerStatus};
use crate::ValidationReport;

/// The version of this document's layout; bumped only by an incompatible
/// change.
pub const FORMAT: u32 = 1;

/// Where the job stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// [`FORMAT`].
    pub format: u32,
    /// "rendezvous", "running", "finished" or "failed".
    pub phase: String,
    /// Of the group running or last run; 0 before the first.
    pub generation: u64,
    /// Members of the running group; 0 while none runs.
    pub world_size: u32,
    pub min_workers: u32,
    pub max_workers: u32,
    /// Re-formations after failures so far, and the budget.
    pub restarts: u32,
    pub max_restarts: u32,
    /// The slowest active member's last finished step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// Mean of the active members' last losses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Summed over the active members.
    pub samples_per_second: f64,
    /// Why the group is re-forming, or why the job ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The stage the group is in (the first not complete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_stage: Option<String>,
    /// The plan, in order.
    #[serde(default)]
    pub stages: Vec<Stage>,
    /// The members of the group running (or last run), by rank.
    #[serde(default)]
    pub workers: Vec<Worker>,
    /// Workers waiting in Join for the next group.
    #[serde(default)]
    pub waiting: Vec<Waiting>,
    /// The latest re-formations, oldest first.
    #[serde(default)]
    pub reformations: Vec<Reformation>,
}

/// One stage of the plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    pub name: String,
    /// Rank 0 alone runs it.
    pub leader_only: bool,
    /// "pending", "running" or "complete".
    pub state: String,
    /// From its start to its completion, or until now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// Its latest held-out figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<Validation>,
}

/// A stage's latest figures on its validation set (see
/// [`ValidationReport`]).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Validation {
    pub step: u64,
    pub samples: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recon: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psnr_db: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codes_used: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_perplexity: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerank_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerank_top1: Option<f64>,
}

/// One member of the group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Worker {
    pub worker_id: String,
    pub rank: u32,
    pub host: String,
    pub slot: String,
    pub pid: u32,
    /// Its ring address.
    pub data_addr: String,
    /// "active", "finished", "failed" or "stopped".
    pub state: String,
    /// The name of the stage it is in (absent past the plan's end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// Its last finished step in that stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// Since its last heartbeat.
    pub heartbeat_age_seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples_per_second: Option<f64>,
    /// Share of its step time spent waiting on data, 0..1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_wait_share: Option<f64>,
    /// Memory in use, in bytes, of the kind `memory_kind`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// The most memory in use so far, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_peak_bytes: Option<u64>,
    /// "cuda_device" (the GPU's memory in use, the whole device) or
    /// "process_rss" (the process's resident set on the host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_kind: Option<String>,
    /// Model TFLOP/s of its device over its last log window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_tflops: Option<f64>,
    /// Model FLOPs utilisation, 0..1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    /// Its last committed checkpoint save: seconds and bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_bytes: Option<u64>,
}

/// A worker waiting in Join.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Waiting {
    pub worker_id: String,
    pub host: String,
    pub slot: String,
    pub waiting_seconds: f64,
}

/// One re-formation of the group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reformation {
    /// The generation that broke (or that a new coordinator took over).
    pub from_generation: u64,
    /// The restart of the budget it spent; absent for a take-over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<u32>,
    pub reason: String,
    /// When it began, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// Since it began.
    pub seconds_ago: f64,
    /// The generation that formed after it; absent while re-forming.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub formed_generation: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub formed_world_size: Option<u32>,
    /// How long the rendezvous took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rendezvous_seconds: Option<f64>,
}

impl From<&JobStatus> for Status {
    fn from(status: &JobStatus) -> Self {
        Status {
            format: FORMAT,
            phase: status.phase.as_str().into(),
            generation: status.generation,
            world_size: status.world_size,
            min_workers: status.min_workers,
            max_workers: status.max_workers,
            restarts: status.restarts,
            max_restarts: status.max_restarts,
            step: status.step,
            loss: status.loss.filter(|l| l.is_finite()),
            samples_per_second: finite(status.samples_per_second),
            reason: status.reason.clone(),
            current_stage: status.current_stage().map(|s| s.name.clone()),
            stages: status.stages.iter().map(stage).collect(),
            workers: status.workers.iter().map(|w| worker(status, w)).collect(),
            waiting: status
                .waiting
                .iter()
                .map(|w| Waiting {
                    worker_id: w.worker_id.clone(),
                    host: w.host.clone(),
                    slot: w.slot.clone(),
                    waiting_seconds: w.waiting.as_secs_f64(),
                })
                .collect(),
            reformations: status.reformations.iter().map(reformation).collect(),
        }
    }
}

/// JSON has no NaN nor infinities: a figure that is not finite is left out.
fn finite(x: f64) -> f64 {
    if x.is_finite() { x } else { 0.0 }
}

fn some_finite(x: Option<f64>) -> Option<f64> {
    x.filter(|x| x.is_finite())
}

fn stage(s: &StageStatus) -> Stage {
    Stage {
        name: s.name.clone(),
        leader_only: s.leader_only,
        state: s.state.as_str().into(),
        seconds: s.elapsed.map(|t| t.as_secs_f64()),
        validation: s.validation.map(|v| validation(&v)),
    }
}

fn validation(v: &ValidationReport) -> Validation {
    Validation {
        step: v.step,
        samples: v.samples,
        recon: some_finite(v.recon),
        psnr_db: some_finite(v.psnr_db),
        codes_used: v.codes_used,
        code_perplexity: some_finite(v.code_perplexity),
        text_loss: some_finite(v.text_loss),
        image_loss: some_finite(v.image_loss),
        rerank_loss: some_finite(v.rerank_loss),
        rerank_top1: some_finite(v.rerank_top1),
    }
}

fn worker(status: &JobStatus, w: &WorkerStatus) -> Worker {
    let usage = w.usage.unwrap_or_default();
    let measured = usage.memory_bytes.is_some() || usage.memory_peak_bytes.is_some();
    Worker {
        worker_id: w.worker_id.clone(),
        rank: w.rank,
        host: w.host.clone(),
        slot: w.slot.clone(),
        pid: w.pid,
        data_addr: w.data_addr.clone(),
        state: w.state.into(),
        stage: status.stages.get(w.stage).map(|s| s.name.clone()),
        step: w.step,
        heartbeat_age_seconds: w.heartbeat_age.as_secs_f64(),
        loss: some_finite(w.loss),
        samples_per_second: some_finite(w.samples_per_second),
        data_wait_share: some_finite(w.data_wait_share),
        memory_bytes: usage.memory_bytes,
        memory_peak_bytes: usage.memory_peak_bytes,
        memory_kind: measured.then(|| usage.memory_kind.as_str().into()),
        model_tflops: some_finite(usage.model_tflops),
        mfu: some_finite(usage.mfu),
        checkpoint_seconds: some_finite(usage.checkpoint_seconds),
        checkpoint_bytes: usage.checkpoint_bytes,
    }
}

fn reformation(r: &ReformationStatus) -> Reformation {
    Reformation {
        from_generation: r.from_generation,
        restart: r.restart,
        reason: r.reason.clone(),
        at_unix_ms: r
            .at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.as_millis() as u64),
        seconds_ago: r.ago.as_secs_f64(),
        formed_generation: r.formed.map(|(g, _, _)| g),
        formed_world_size: r.formed.map(|(_, n, _)| n),
        rendezvous_seconds: r.formed.map(|(_, _, t)| t.as_secs_f64()),
    }
}

/// The JSON document of `status`.
pub fn render(status: &JobStatus) -> String {
    let mut text =
        serde_json::to_string_pretty(&Status::from(status)).expect("the status serialises");
    text.push('\n');
    text
}
