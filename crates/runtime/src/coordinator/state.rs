//! The coordinator's state machine, behind one mutex: rendezvous, members,
//! heartbeats, failures, the restart budget and the job's end.
//!
//! It does no I/O but logging: time comes in as `now`, Join replies leave
//! through oneshot channels, and the gRPC service, the tick loop and the
//! status page only call in. The life of a job:
//!
//! ```text
//! Rendezvous(gen 0) --min joined + last call, or max--> Running(gen 1)
//! Running --heartbeat timeout | Leave(failure) | member joins again-->
//!     Rendezvous (survivors told REFORM; restart budget spent by one)
//!     --every live survivor joined again (+ newcomers, up to max)--> Running(gen 2) ...
//! Running --StageDone from every member--> next stage of the plan
//! Running --all members Leave(success)--> Ended(finished)
//! any --budget spent | rendezvous_timeout | NCCL id failure--> Ended(failed)
//! ```

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::oneshot;
use tonic::Status;

use super::persist::JobState;
use super::{
    CoordinatorConfig, Failure, JobEnd, JobOutcome, JobPhase, JobStatus, NcclIdFn, Reformation,
    StageState, StageStatus, WaitingWorker, WorkerStatus, WorkerSupply,
};
use crate::proto::{self, Instruction};
use crate::worker::{MemoryKind, UsageReport};
use crate::{Backend, PROTOCOL_VERSION, ValidationReport};

pub(super) type JoinResult = Result<proto::JoinReply, Status>;

/// Who a worker is, as it said when joining.
#[derive(Debug, Clone)]
struct Identity {
    worker_id: String,
    host: String,
    slot: String,
    data_addr: String,
    pid: u32,
}

impl Identity {
    fn describe(&self) -> String {
        format!(
            "worker {} ({} {}, pid {}, data {})",
            self.worker_id, self.host, self.slot, self.pid, self.data_addr
        )
    }
}

/// A Join call waiting for its group.
struct Pending {
    seq: u64,
    who: Identity,
    since: Instant,
    reply: oneshot::Sender<JoinResult>,
}

/// A member of the current group (or, during a re-formation, of the last).
struct Member {
    who: Identity,
    rank: u32,
    last_seen: Instant,
    step: Option<u64>,
    /// When `step` last moved on (or the member joined or changed stage):
    /// a heartbeating member whose step stands still is hung.
    progressed: Instant,
    metrics: Option<proto::StepMetrics>,
    state: MemberState,
    /// The plan index of the stage it is in: the stages before it it
    /// reported done.
    stage: usize,
}

impl Member {
    fn describe(&self) -> String {
        format!(
            "worker {} (rank {}, {} {}, pid {}, data {})",
            self.who.worker_id,
            self.rank,
            self.who.host,
            self.who.slot,
            self.who.pid,
            self.who.data_addr
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MemberState {
    /// Training, or (during a re-formation) a survivor expected back.
    Active,
    /// Left with success at this step.
    Finished { step: u64 },
    /// Missed its heartbeats or left with a failure.
    Failed,
    /// Told STOP after the job ended.
    Stopped,
}

impl MemberState {
    fn as_str(self) -> &'static str {
        match self {
            MemberState::Active => "active",
            MemberState::Finished { .. } => "finished",
            MemberState::Failed => "failed",
            MemberState::Stopped => "stopped",
        }
    }
}

/// Re-formations the status keeps (the newest).
const REFORMATIONS_KEPT: usize = 16;

/// One re-formation, as the state keeps it.
#[derive(Debug, Clone)]
struct ReformationRecord {
    from_generation: u64,
    restart: Option<u32>,
    reason: String,
    at: SystemTime,
    since: Instant,
    /// Generation, world size and when it formed.
    formed: Option<(u64, u32, Instant)>,
}

/// A member's usage figures from its heartbeat's metrics; `None` when it
/// sent none.
fn usage_of(m: &proto::StepMetrics) -> Option<UsageReport> {
    let usage = UsageReport {
        memory_bytes: m.memory_bytes,
        memory_peak_bytes: m.memory_peak_bytes,
        memory_kind: proto::MemoryKind::try_from(m.memory_kind)
            .map(MemoryKind::from)
            .unwrap_or_default(),
        model_tflops: m.model_tflops,
        mfu: m.mfu,
        checkpoint_seconds: m.checkpoint_seconds,
        checkpoint_bytes: m.checkpoint_bytes,
    };
    (usage != UsageReport::default()).then_some(usage)
}

enum Phase {
    /// Waiting for joins; `last_call_until` runs once `min_workers` joined.
    Rendezvous {
        since: Instant,
        last_call_until: Option<Instant>,
        /// When the wait was last logged: a long one is never silent.
        logged: Instant,
    },
    Running,
    Ended,
}

pub(super) struct State {
    config: Arc<CoordinatorConfig>,
    nccl_id: NcclIdFn,
    phase: Phase,
    /// Of the group now running (or last run); 0 before the first.
    generation: u64,
    restarts: u32,
    members: Vec<Member>,
    pending: Vec<Pending>,
    /// Why the group is re-forming (told to survivors with REFORM).
    cause: Option<String>,
    next_worker: u64,
    next_seq: u64,
    next_log_step: u64,
    end: Option<JobEnd>,
    published: bool,
    /// Stages of the plan every member finished.
    completed: usize,
    /// When each stage started, and how long each complete one took.
    stage_started: Vec<Option<Instant>>,
    stage_took: Vec<Option<Duration>>,
    /// Stages whose training some member reported a step of: the job's
    /// resume policy was applied to them, and a re-formed group resumes
    /// their newest checkpoint instead of applying it again.
    stage_stepped: Vec<bool>,
    /// Each stage's latest held-out figures, as its members last reported
    /// them (kept after the stage ends).
    validation: Vec<Option<ValidationReport>>,
    /// The workers that can still come, when the caller knows (see
    /// [`super::CoordinatorHandle::limit_workers`]).
    supply: Option<WorkerSupply>,
    /// The job's identity (its config's digest and epoch) as saved for a
    /// coordinator that takes over.
    identity: JobState,
    /// The latest re-formations, oldest first.
    reformations: VecDeque<ReformationRecord>,
}

impl State {
    pub(super) fn new(config: Arc<CoordinatorConfig>, nccl_id: NcclIdFn, now: Instant) -> Self {
        State {
            nccl_id,
            phase: Phase::Rendezvous {
                since: now,
                last_call_until: None,
                logged: now,
            },
            generation: 0,
            restarts: 0,
            members: Vec::new(),
            pending: Vec::new(),
            cause: None,
            next_worker: 0,
            next_seq: 0,
            next_log_step: 0,
            end: None,
            published: false,
            completed: 0,
            stage_started: vec![None; config.plan.len()],
            stage_took: vec![None; config.plan.len()],
            stage_stepped: vec![false; config.plan.len()],
            validation: vec![None; config.plan.len()],
            supply: None,
            identity: JobState::new(&config.job_toml),
            reformations: VecDeque::new(),
            config,
        }
    }

    /// Registers a Join; the returned receiver gets the reply when the group
    /// forms. Refusals come back at once.
    pub(super) fn join(
        &mut self,
        request: proto::JoinRequest,
        now: Instant,
    ) -> Result<(u64, oneshot::Receiver<JoinResult>), Status> {
        if request.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "protocol version mismatch: the worker on {} speaks dalle.v1 protocol version {}, \
                 this coordinator speaks version {PROTOCOL_VERSION}; run the same dalle-rs release on both",
                request.host, request.protocol_version
            )));
        }
        if request.host.is_empty() || request.slot.is_empty() {
            return Err(Status::invalid_argument(
                "Join needs the worker's host and slot (e.g. \"cuda:0\" or \"cpu:3\")",
            ));
        }
        if self.config.backend == Backend::TcpRing && !looks_like_host_port(&request.data_addr) {
            return Err(Status::invalid_argument(format!(
                "data_addr {:?} of the worker on {} {} is not host:port; the tcp-ring backend needs \
                 the address where the worker listens for its ring neighbours",
                request.data_addr, request.host, request.slot
            )));
        }
        let worker_id = if request.worker_id.is_empty() {
            self.next_worker += 1;
            format!("w{}", self.next_worker)
        } else {
            request.worker_id
        };
        let who = Identity {
            worker_id,
            host: request.host,
            slot: request.slot,
            data_addr: request.data_addr,
            pid: request.pid,
        };
        let running = matches!(self.phase, Phase::Running);
        let mut broken = None;
        if let Some(member) = self
            .members
            .iter_mut()
            .find(|m| m.who.worker_id == who.worker_id)
        {
            member.last_seen = now;
            if running && member.state == MemberState::Active {
                // A member that joins again has left its collective: the
                // group is broken whatever the heartbeats say.
                broken = Some(format!(
                    "{} joined again: its collective is broken",
                    member.describe()
                ));
            }
        }
        if let Some(cause) = broken {
            self.fail(now, cause, None);
        }
        if let Some(end) = &self.end {
            return Err(Status::aborted(format!(
                "the job has ended: {}",
                end.reason()
            )));
        }
        // A retry replaces the earlier call (whose caller is gone).
        self.pending.retain(|p| p.who.worker_id != who.worker_id);
        self.next_seq += 1;
        let seq = self.next_seq;
        let (reply, receiver) = oneshot::channel();
        let description = who.describe();
        self.pending.push(Pending {
            seq,
            who,
            since: now,
            reply,
        });
        tracing::info!("{description} asks to join ({})", self.rendezvous_state());
        self.advance(now);
        Ok((seq, receiver))
    }

    /// Takes back a Join whose wait ran out: `Some(what the rendezvous was
    /// waiting for)`, or `None` when it is no longer pending (answered or
    /// superseded meanwhile).
    pub(super) fn withdraw(&mut self, seq: u64) -> Option<String> {
        let at = self.pending.iter().position(|p| p.seq == seq)?;
        let state = self.rendezvous_state();
        let gone = self.pending.remove(at);
        tracing::info!("{} stopped waiting to join: {state}", gone.who.describe());
        Some(state)
    }

    pub(super) fn heartbeat(
        &mut self,
        request: proto::HeartbeatRequest,
        now: Instant,
    ) -> proto::HeartbeatReply {
        let generation = self.generation;
        let reply = |instruction: Instruction, reason: String| proto::HeartbeatReply {
            instruction: instruction as i32,
            reason,
            generation,
        };
        let ended = self.end.as_ref().map(JobEnd::reason);
        let Some(member) = self
            .members
            .iter_mut()
            .find(|m| m.who.worker_id == request.worker_id)
        else {
            return match ended {
                Some(reason) => reply(Instruction::Stop, reason),
                None => reply(
                    Instruction::Reform,
                    format!(
                        "worker {} is not a member of generation {generation}: join again",
                        request.worker_id
                    ),
                ),
            };
        };
        member.last_seen = now;
        if let Some(reason) = ended {
            if member.state == MemberState::Active {
                member.state = MemberState::Stopped;
            }
            return reply(Instruction::Stop, reason);
        }
        if let MemberState::Finished { step } = member.state {
            return reply(
                Instruction::Stop,
                format!("worker {} finished at step {step}", request.worker_id),
            );
        }
        match self.phase {
            Phase::Rendezvous { .. } => reply(
                Instruction::Reform,
                self.cause
                    .clone()
                    .unwrap_or_else(|| "the group is re-forming".into()),
            ),
            Phase::Running if request.generation != generation => reply(
                Instruction::Reform,
                format!(
                    "generation {} is over; the group is at generation {generation}",
                    request.generation
                ),
            ),
            Phase::Running if member.state == MemberState::Failed => reply(
                Instruction::Reform,
                format!(
                    "worker {} was dropped from generation {generation}: join again",
                    request.worker_id
                ),
            ),
            Phase::Running | Phase::Ended => {
                // Figures of a stage the member has left (a heartbeat sent
                // before its StageDone) would pass for the next stage's.
                if request.stage as usize == member.stage {
                    let held_out = request.metrics.as_ref().and_then(|m| m.validation);
                    if request.step.is_some()
                        && let Some(stepped) = self.stage_stepped.get_mut(member.stage)
                    {
                        *stepped = true;
                    }
                    if request.step != member.step {
                        member.progressed = now;
                    }
                    member.step = request.step;
                    member.metrics = request.metrics;
                    if let (Some(figures), Some(slot)) =
                        (held_out, self.validation.get_mut(request.stage as usize))
                    {
                        *slot = Some(figures.into());
                    }
                    self.log_progress();
                }
                reply(Instruction::Continue, String::new())
            }
        }
    }

    /// A member finished a stage of the plan; the stage is complete once
    /// every member of the group (active or finished) did.
    pub(super) fn stage_done(
        &mut self,
        request: proto::StageDoneRequest,
        now: Instant,
    ) -> Result<proto::StageDoneReply, Status> {
        let stage = request.stage as usize;
        let Some(name) = self.config.plan.get(stage).map(|s| s.name.clone()) else {
            return Err(Status::out_of_range(format!(
                "worker {} reports stage {stage} done, but the plan has {} stage(s)",
                request.worker_id,
                self.config.plan.len()
            )));
        };
        let generation = self.generation;
        let Some(member) = self
            .members
            .iter_mut()
            .find(|m| m.who.worker_id == request.worker_id)
        else {
            return Err(Status::not_found(format!(
                "worker {} is not a member of generation {generation}",
                request.worker_id
            )));
        };
        member.last_seen = now;
        if stage < member.stage {
            // Said before (a retried call): nothing new.
            return Ok(proto::StageDoneReply {
                completed_stages: self.completed as u32,
            });
        }
        if request.generation != generation {
            return Err(Status::aborted(format!(
                "{} reports stage {stage} ({name}) done for generation {}, which is over: the \
                 group is at generation {generation}; join again",
                member.describe(),
                request.generation
            )));
        }
        if stage != member.stage {
            return Err(Status::failed_precondition(format!(
                "{} reports stage {stage} ({name}) of generation {} done, but it is in stage {} \
                 of generation {generation}",
                member.describe(),
                request.generation,
                member.stage
            )));
        }
        member.stage += 1;
        member.step = None;
        member.progressed = now;
        member.metrics = None;
        tracing::info!("{} finished stage {name}", member.describe());
        self.advance_plan(now);
        Ok(proto::StageDoneReply {
            completed_stages: self.completed as u32,
        })
    }

    /// Marks complete every stage all members of the group are past.
    fn advance_plan(&mut self, now: Instant) {
        let Some(reached) = self
            .members
            .iter()
            .filter(|m| matches!(m.state, MemberState::Active | MemberState::Finished { .. }))
            .map(|m| m.stage)
            .min()
        else {
            return;
        };
        let total = self.config.plan.len();
        while self.completed < reached.min(total) {
            let index = self.completed;
            let took = self.stage_started[index].map(|t| now.saturating_duration_since(t));
            self.stage_took[index] = took;
            tracing::info!(
                "stage {}/{total} {} complete{} (generation {})",
                index + 1,
                self.config.plan[index].name,
                took.map(|t| format!(" in {:.1} s", t.as_secs_f64()))
                    .unwrap_or_default(),
                self.generation
            );
            self.completed += 1;
            self.start_stage(now);
        }
    }

    /// The stage at `completed` starts now (unless it started before a
    /// re-formation) and the job-level lines count its steps afresh.
    fn start_stage(&mut self, now: Instant) {
        if let Some(started) = self.stage_started.get_mut(self.completed) {
            started.get_or_insert(now);
        }
        self.next_log_step = 0;
    }

    pub(super) fn leave(&mut self, request: proto::LeaveRequest, now: Instant) {
        let Some(member) = self
            .members
            .iter_mut()
            .find(|m| m.who.worker_id == request.worker_id)
        else {
            if let Some(at) = self
                .pending
                .iter()
                .position(|p| p.who.worker_id == request.worker_id)
            {
                let gone = self.pending.remove(at);
                tracing::info!("{} left before it was taken in", gone.who.describe());
            }
            return;
        };
        member.last_seen = now;
        if member.state != MemberState::Active {
            return;
        }
        let description = member.describe();
        if request.success {
            member.state = MemberState::Finished {
                step: request.final_step,
            };
            tracing::info!("{description} finished at step {}", request.final_step);
            self.finish_if_done();
        } else if request.stopped {
            // Preempted or drained: the group re-forms without it, but no
            // restart is spent (a week-long job is preempted many times).
            let cause = format!(
                "{description} stopped at step {}: {}",
                request.final_step, request.error
            );
            let id = request.worker_id;
            self.fail_counted(now, cause, Some(&id), false);
        } else {
            let cause = format!(
                "{description} failed at step {}: {}",
                request.final_step, request.error
            );
            let id = request.worker_id;
            self.fail(now, cause, Some(&id));
        }
    }

    /// The process of a worker on `host` exited (its launcher saw it): a
    /// member fails now rather than after its heartbeat timeout, and a
    /// waiting join is dropped.
    pub(super) fn process_exited(&mut self, host: &str, pid: u32, what: &str, now: Instant) {
        let same = |who: &Identity| who.host == host && who.pid == pid;
        if let Some(at) = self.pending.iter().position(|p| same(&p.who)) {
            let gone = self.pending.remove(at);
            tracing::info!(
                "{} exited while waiting to join: {what}",
                gone.who.describe()
            );
        }
        let Some(member) = self
            .members
            .iter()
            .find(|m| same(&m.who) && m.state == MemberState::Active)
        else {
            return;
        };
        let (id, cause) = (
            member.who.worker_id.clone(),
            format!("{} exited: {what}", member.describe()),
        );
        self.fail(now, cause, Some(&id));
        self.advance(now);
    }

    /// Takes over the job a coordinator before this one ran (its process or
    /// node died): the same epoch, generation, restart budget and worker
    /// ids, and the stages it completed are not run again. The workers of
    /// its last group join this one's first rendezvous.
    pub(super) fn take_over(&mut self, saved: JobState) {
        let plan = self.config.plan.len();
        self.generation = saved.generation;
        self.restarts = saved.restarts;
        self.next_worker = saved.workers_issued;
        self.completed = saved.completed.min(plan);
        for (i, stepped) in saved.stepped.iter().take(plan).enumerate() {
            self.stage_stepped[i] = *stepped;
        }
        let done: Vec<&str> = self.config.plan[..self.completed]
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        tracing::warn!(
            "taking over the job of a coordinator before this one: generation {}, {} of {} \
             restart(s) spent, stage(s) complete: [{}]; its workers join again",
            self.generation,
            self.restarts,
            self.config.max_restarts,
            done.join(", ")
        );
        let reason = format!(
            "a new coordinator took over the job at generation {}",
            self.generation
        );
        self.record_reformation(self.generation, None, reason, Instant::now());
        self.identity = saved;
        self.identity.ended = None;
    }

    /// Keeps a re-formation for the status (the newest few).
    fn record_reformation(
        &mut self,
        from_generation: u64,
        restart: Option<u32>,
        reason: String,
        now: Instant,
    ) {
        if self.reformations.len() == REFORMATIONS_KEPT {
            self.reformations.pop_front();
        }
        self.reformations.push_back(ReformationRecord {
            from_generation,
            restart,
            reason,
            at: SystemTime::now(),
            since: now,
            formed: None,
        });
    }

    /// What a coordinator taking over the job would need, now.
    pub(super) fn job_state(&self) -> JobState {
        JobState {
            generation: self.generation,
            restarts: self.restarts,
            workers_issued: self.next_worker,
            completed: self.completed,
            stepped: self.stage_stepped.clone(),
            ended: self.end.as_ref().map(JobEnd::reason),
            ..self.identity.clone()
        }
    }

    pub(super) fn limit_workers(&mut self, supply: Option<WorkerSupply>, now: Instant) {
        self.supply = supply;
        self.advance(now);
    }

    /// Timeouts, last calls and formations that are due.
    pub(super) fn tick(&mut self, now: Instant) {
        self.advance(now);
    }

    /// The end of the job, once decided and every live member has heard
    /// STOP (or stopped heartbeating); once.
    pub(super) fn take_end(&mut self, now: Instant) -> Option<JobEnd> {
        if self.published {
            return None;
        }
        let end = self.end.as_ref()?;
        let timeout = self.config.heartbeat_timeout;
        let drained = self.members.iter().all(|m| {
            m.state != MemberState::Active || now.saturating_duration_since(m.last_seen) > timeout
        });
        if !drained {
            return None;
        }
        self.published = true;
        Some(end.clone())
    }

    /// Answers every waiting Join: the coordinator is going away.
    pub(super) fn shutdown(&mut self) {
        for pending in self.pending.drain(..) {
            let _ = pending
                .reply
                .send(Err(Status::unavailable("the coordinator is shutting down")));
        }
    }

    pub(super) fn status(&self, now: Instant) -> JobStatus {
        let phase = match (&self.phase, &self.end) {
            (_, Some(JobEnd::Finished(_))) => JobPhase::Finished,
            (_, Some(JobEnd::Failed(_))) => JobPhase::Failed,
            (Phase::Rendezvous { .. }, None) => JobPhase::Rendezvous,
            (_, None) => JobPhase::Running,
        };
        let active = || {
            self.members
                .iter()
                .filter(|m| m.state == MemberState::Active)
        };
        let step = active()
            .filter(|m| m.stage == self.completed)
            .map(|m| m.step)
            .collect::<Option<Vec<_>>>();
        let losses: Vec<f64> = active().filter_map(|m| known_loss(m.metrics)).collect();
        JobStatus {
            phase,
            generation: self.generation,
            world_size: if matches!(self.phase, Phase::Running) {
                self.members.len() as u32
            } else {
                0
            },
            min_workers: self.config.min_workers,
            max_workers: self.config.max_workers,
            restarts: self.restarts,
            max_restarts: self.config.max_restarts,
            step: step.and_then(|s| s.into_iter().min()),
            loss: (!losses.is_empty()).then(|| losses.iter().sum::<f64>() / losses.len() as f64),
            samples_per_second: active()
                .filter_map(|m| m.metrics.map(|x| x.samples_per_second))
                .sum(),
            reason: match &self.end {
                Some(end) => Some(end.reason()),
                None => self.cause.clone(),
            },
            workers: self
                .members
                .iter()
                .map(|m| WorkerStatus {
                    worker_id: m.who.worker_id.clone(),
                    rank: m.rank,
                    host: m.who.host.clone(),
                    slot: m.who.slot.clone(),
                    data_addr: m.who.data_addr.clone(),
                    pid: m.who.pid,
                    state: m.state.as_str(),
                    step: m.step,
                    heartbeat_age: now.saturating_duration_since(m.last_seen),
                    loss: known_loss(m.metrics),
                    samples_per_second: m.metrics.map(|x| x.samples_per_second),
                    data_wait_share: m.metrics.map(|x| x.data_wait_share),
                    stage: m.stage,
                    usage: m.metrics.as_ref().and_then(usage_of),
                })
                .collect(),
            waiting: self
                .pending
                .iter()
                .map(|p| WaitingWorker {
                    worker_id: p.who.worker_id.clone(),
                    host: p.who.host.clone(),
                    slot: p.who.slot.clone(),
                    waiting: now.saturating_duration_since(p.since),
                })
                .collect(),
            stages: self
                .config
                .plan
                .iter()
                .enumerate()
                .map(|(i, stage)| StageStatus {
                    name: stage.name.clone(),
                    leader_only: stage.leader_only,
                    state: match (i < self.completed, self.stage_started[i]) {
                        (true, _) => StageState::Complete,
                        (false, Some(_)) => StageState::Running,
                        (false, None) => StageState::Pending,
                    },
                    elapsed: self.stage_took[i].or_else(|| {
                        self.stage_started[i].map(|t| now.saturating_duration_since(t))
                    }),
                    validation: self.validation[i],
                })
                .collect(),
            reformations: self
                .reformations
                .iter()
                .map(|r| Reformation {
                    from_generation: r.from_generation,
                    restart: r.restart,
                    reason: r.reason.clone(),
                    at: r.at,
                    ago: now.saturating_duration_since(r.since),
                    formed: r.formed.map(|(generation, world, at)| {
                        (generation, world, at.saturating_duration_since(r.since))
                    }),
                })
                .collect(),
        }
    }

    fn advance(&mut self, now: Instant) {
        self.pending.retain(|p| {
            let waiting = !p.reply.is_closed();
            if !waiting {
                tracing::debug!("{} gave up waiting to join", p.who.describe());
            }
            waiting
        });
        let timeout = self.config.heartbeat_timeout;
        if matches!(self.phase, Phase::Running) {
            let late: Vec<(String, String, Duration)> = self
                .members
                .iter()
                .filter(|m| m.state == MemberState::Active)
                .map(|m| (m, now.saturating_duration_since(m.last_seen)))
                .filter(|(_, age)| *age > timeout)
                .map(|(m, age)| (m.who.worker_id.clone(), m.describe(), age))
                .collect();
            for (id, description, age) in late {
                let cause = format!(
                    "{description} missed its heartbeats: none for {} ms (heartbeat_timeout {} ms)",
                    age.as_millis(),
                    timeout.as_millis()
                );
                self.fail(now, cause, Some(&id));
            }
        }
        if matches!(self.phase, Phase::Running) {
            self.drop_the_stalled(now);
        }
        if let Phase::Rendezvous { since, .. } = self.phase {
            let pending = &self.pending;
            for member in self.members.iter_mut() {
                let rejoined = pending
                    .iter()
                    .any(|p| p.who.worker_id == member.who.worker_id);
                let age = now.saturating_duration_since(member.last_seen);
                if member.state == MemberState::Active && !rejoined && age > timeout {
                    member.state = MemberState::Failed;
                    tracing::warn!(
                        "{} dropped from the re-formation: no heartbeat for {} ms",
                        member.describe(),
                        age.as_millis()
                    );
                }
            }
            if let Some(reason) = self.unformable() {
                self.finish(JobEnd::Failed(Failure::Other(reason)));
                return;
            }
            if let Some(limit) = self.config.rendezvous_timeout
                && now.saturating_duration_since(since) > limit
            {
                let reason = format!(
                    "no group formed within rendezvous_timeout ({} ms): {}",
                    limit.as_millis(),
                    self.rendezvous_state()
                );
                self.finish(JobEnd::Failed(Failure::Other(reason)));
                return;
            }
            self.try_form(now);
            self.log_long_wait(now);
        }
    }

    /// Why no group can form any more, if the supply of workers is known and
    /// falls short of `min_workers`.
    fn unformable(&self) -> Option<String> {
        let supply = self.supply.as_ref()?;
        let min = self.config.min_workers;
        if supply.live >= min {
            return None;
        }
        let lost: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.state == MemberState::Failed)
            .map(Member::describe)
            .collect();
        Some(format!(
            "no group can form for generation {}: min_workers is {min} but only {} worker(s) are \
             left ({} joined) and {}; missing: {}",
            self.generation + 1,
            supply.live,
            self.pending.len(),
            supply.why,
            if lost.is_empty() {
                "none of the last group".to_string()
            } else {
                some_of(lost)
            }
        ))
    }

    /// A rendezvous that waits long says so now and then, with what it waits
    /// for.
    fn log_long_wait(&mut self, now: Instant) {
        const EVERY: Duration = Duration::from_secs(30);
        let Phase::Rendezvous { since, logged, .. } = self.phase else {
            return;
        };
        if now.saturating_duration_since(logged) < EVERY {
            return;
        }
        let waited = now.saturating_duration_since(since).as_secs();
        let limit = self
            .config
            .rendezvous_timeout
            .map(|t| format!(" of rendezvous_timeout {} s", t.as_secs()))
            .unwrap_or_default();
        tracing::warn!(
            "still no group after {waited} s{limit}: {}",
            self.rendezvous_state()
        );
        if let Phase::Rendezvous { logged, .. } = &mut self.phase {
            *logged = now;
        }
    }

    /// Fails a member that heartbeats but whose training stands still: stuck
    /// in a collective or a device call, its heartbeat thread alone alive.
    /// Only between steps of a stage: before a stage's first step (loading,
    /// resuming) and in stages without steps there is nothing to measure.
    fn drop_the_stalled(&mut self, now: Instant) {
        let Some(limit) = self.config.progress_timeout else {
            return;
        };
        let stalled: Vec<(String, String)> = self
            .members
            .iter()
            .filter(|m| m.state == MemberState::Active)
            .filter_map(|m| Some((m, m.step?)))
            .filter(|(m, _)| now.saturating_duration_since(m.progressed) > limit)
            .map(|(m, step)| {
                let stood = now.saturating_duration_since(m.progressed);
                (
                    m.who.worker_id.clone(),
                    format!(
                        "{} made no progress: still at step {step} after {} s \
                         (progress_timeout {} s)",
                        m.describe(),
                        stood.as_secs(),
                        limit.as_secs()
                    ),
                )
            })
            .collect();
        for (id, cause) in stalled {
            self.fail(now, cause, Some(&id));
        }
    }

    fn is_survivor(&self, worker_id: &str) -> bool {
        self.members
            .iter()
            .any(|m| m.state == MemberState::Active && m.who.worker_id == worker_id)
    }

    /// Live survivors of the last group that have not joined again yet.
    fn outstanding(&self) -> Vec<&Member> {
        self.members
            .iter()
            .filter(|m| {
                m.state == MemberState::Active
                    && !self
                        .pending
                        .iter()
                        .any(|p| p.who.worker_id == m.who.worker_id)
            })
            .collect()
    }

    fn try_form(&mut self, now: Instant) {
        let outstanding = self.outstanding().len();
        let joined = self.pending.len();
        let reforming = self.generation > 0;
        let (min, max) = (
            self.config.min_workers as usize,
            self.config.max_workers as usize,
        );
        let last_call = self.config.last_call;
        let Phase::Rendezvous {
            last_call_until, ..
        } = &mut self.phase
        else {
            return;
        };
        if joined < min {
            *last_call_until = None;
            return;
        }
        // Every live survivor is waited for: each comes back at its next
        // step boundary, and one that dies stops heartbeating.
        if outstanding > 0 {
            return;
        }
        // Newcomers waited during the run already; a first group gives late
        // starters a last call, and so does a re-formation that restarted
        // workers can still fill up (they are starting now).
        let restarting = self
            .supply
            .as_ref()
            .is_some_and(|s| joined < max.min(s.live as usize));
        let ready = joined >= max
            || (reforming && !restarting)
            || now >= *last_call_until.get_or_insert(now + last_call);
        if ready {
            self.form(now);
        }
    }

    fn form(&mut self, now: Instant) {
        let max = self.config.max_workers as usize;
        // Survivors first, then newcomers in join order; the rest wait for
        // the next re-formation.
        let mut chosen = std::mem::take(&mut self.pending);
        chosen.sort_by_key(|p| (!self.is_survivor(&p.who.worker_id), p.seq));
        if chosen.len() > max {
            self.pending = chosen.split_off(max);
        }
        // Ranks by (host, slot, join order): the same inputs give the same
        // ranks, and a host's workers sit side by side in the ring.
        chosen.sort_by(|a, b| {
            (&a.who.host, slot_order(&a.who.slot), a.seq).cmp(&(
                &b.who.host,
                slot_order(&b.who.slot),
                b.seq,
            ))
        });
        let generation = self.generation + 1;
        let nccl_unique_id = match self.config.backend {
            Backend::TcpRing => Vec::new(),
            Backend::Nccl => match (self.nccl_id)(generation) {
                Ok(id) => id,
                Err(error) => {
                    self.pending.extend(chosen);
                    self.finish(JobEnd::Failed(Failure::Other(format!(
                        "cannot create the NCCL unique id for generation {generation}: {error}"
                    ))));
                    return;
                }
            },
        };
        self.generation = generation;
        let world_size = chosen.len() as u32;
        let ring_peers: Vec<String> = chosen.iter().map(|p| p.who.data_addr.clone()).collect();
        let heartbeat_interval_ms = millis(self.config.heartbeat_interval);
        let heartbeat_timeout_ms = millis(self.config.heartbeat_timeout);
        let first_stage_started = self
            .stage_stepped
            .get(self.completed)
            .copied()
            .unwrap_or(false);
        let ring_secret: [u8; 32] = rand::random();
        let plan: Vec<proto::Stage> = self
            .config
            .plan
            .iter()
            .map(|s| proto::Stage {
                name: s.name.clone(),
                leader_only: s.leader_only,
            })
            .collect();
        let mut members = Vec::with_capacity(chosen.len());
        for (rank, pending) in chosen.into_iter().enumerate() {
            let rank = rank as u32;
            let reply = proto::JoinReply {
                rank,
                world_size,
                generation,
                ring_peers: ring_peers.clone(),
                nccl_unique_id: nccl_unique_id.clone(),
                backend: self.config.backend.as_str().into(),
                worker_id: pending.who.worker_id.clone(),
                job: self.config.job_toml.clone(),
                heartbeat_interval_ms,
                heartbeat_timeout_ms,
                plan: plan.clone(),
                first_stage: self.completed as u32,
                first_stage_started,
                ring_secret: ring_secret.to_vec(),
                job_epoch: self.identity.epoch,
            };
            let member = Member {
                who: pending.who,
                rank,
                last_seen: now,
                step: None,
                progressed: now,
                metrics: None,
                state: MemberState::Active,
                stage: self.completed,
            };
            if pending.reply.send(Ok(reply)).is_err() {
                tracing::warn!(
                    "{} stopped waiting just as generation {generation} formed; it is dropped \
                     when its heartbeats do not come",
                    member.describe()
                );
            }
            members.push(member);
        }
        let roster: Vec<String> = members
            .iter()
            .map(|m| {
                format!(
                    "{}={} {} {}",
                    m.rank, m.who.worker_id, m.who.host, m.who.slot
                )
            })
            .collect();
        tracing::info!(
            "generation {generation} formed: {world_size} worker(s), backend {}, ranks [{}]{}",
            self.config.backend,
            roster.join(", "),
            if self.pending.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} more wait for the next re-formation",
                    self.pending.len()
                )
            }
        );
        if let Some(stage) = self.config.plan.get(self.completed) {
            tracing::info!(
                "generation {generation} starts at stage {}/{} {}",
                self.completed + 1,
                self.config.plan.len(),
                stage.name
            );
        }
        self.members = members;
        self.phase = Phase::Running;
        self.cause = None;
        if let Some(last) = self.reformations.back_mut()
            && last.formed.is_none()
        {
            last.formed = Some((generation, world_size, now));
        }
        self.start_stage(now);
    }

    /// A member failed (or the group broke): re-form within the budget.
    fn fail(&mut self, now: Instant, cause: String, failed: Option<&str>) {
        self.fail_counted(now, cause, failed, true);
    }

    /// [`Self::fail`]; a re-formation that `counts` spends a restart of the
    /// budget (one for a stop that was asked for does not).
    fn fail_counted(&mut self, now: Instant, cause: String, failed: Option<&str>, counts: bool) {
        if let Some(id) = failed
            && let Some(member) = self.members.iter_mut().find(|m| m.who.worker_id == id)
        {
            member.state = MemberState::Failed;
        }
        // The survivors may all be past a stage the failed one never
        // reported: they passed the barrier that ends it, so it did too.
        self.advance_plan(now);
        match self.phase {
            Phase::Running => {}
            Phase::Rendezvous { .. } => {
                tracing::warn!("{cause} (the group is re-forming already)");
                return;
            }
            Phase::Ended => {
                tracing::warn!("{cause} (after the job ended)");
                return;
            }
        }
        if self
            .members
            .iter()
            .any(|m| matches!(m.state, MemberState::Finished { .. }))
        {
            // All ranks run the same steps: one finished means the training
            // is done, whatever happens to the others now.
            tracing::warn!("{cause} (after other workers finished the job)");
            self.finish_if_done();
            return;
        }
        if counts && self.restarts >= self.config.max_restarts {
            self.finish(JobEnd::Failed(Failure::RestartBudget {
                max_restarts: self.config.max_restarts,
                cause,
            }));
            return;
        }
        if counts {
            self.restarts += 1;
            tracing::warn!(
                "{cause}: re-forming the group (restart {} of {})",
                self.restarts,
                self.config.max_restarts
            );
        } else {
            tracing::warn!("{cause}: re-forming the group (no restart spent)");
        }
        self.record_reformation(
            self.generation,
            counts.then_some(self.restarts),
            cause.clone(),
            now,
        );
        self.cause = Some(cause);
        self.phase = Phase::Rendezvous {
            since: now,
            last_call_until: None,
            logged: now,
        };
    }

    fn finish_if_done(&mut self) {
        if !matches!(self.phase, Phase::Running)
            || self.members.iter().any(|m| m.state == MemberState::Active)
        {
            return;
        }
        let finished: Vec<u64> = self
            .members
            .iter()
            .filter_map(|m| match m.state {
                MemberState::Finished { step } => Some(step),
                _ => None,
            })
            .collect();
        let Some(&final_step) = finished.iter().max() else {
            return;
        };
        self.finish(JobEnd::Finished(JobOutcome {
            final_step,
            generation: self.generation,
            world_size: self.members.len() as u32,
            restarts: self.restarts,
        }));
    }

    fn finish(&mut self, end: JobEnd) {
        let reason = end.reason();
        match &end {
            JobEnd::Finished(_) => tracing::info!("the job is over: {reason}"),
            JobEnd::Failed(_) => tracing::error!("the job failed: {reason}"),
        }
        for pending in self.pending.drain(..) {
            // A survivor waiting in Join hears it there.
            if let Some(member) = self
                .members
                .iter_mut()
                .find(|m| m.who.worker_id == pending.who.worker_id)
                && member.state == MemberState::Active
            {
                member.state = MemberState::Stopped;
            }
            let _ = pending
                .reply
                .send(Err(Status::aborted(format!("the job has ended: {reason}"))));
        }
        self.phase = Phase::Ended;
        self.end = Some(end);
    }

    /// One job-level line whenever the slowest member passes a multiple of
    /// `log_every` steps.
    fn log_progress(&mut self) {
        let active: Vec<&Member> = self
            .members
            .iter()
            .filter(|m| m.state == MemberState::Active && m.stage == self.completed)
            .collect();
        let Some(step) = active
            .iter()
            .map(|m| m.step)
            .collect::<Option<Vec<_>>>()
            .and_then(|steps| steps.into_iter().min())
        else {
            return;
        };
        if step < self.next_log_step {
            return;
        }
        let every = self.config.log_every.max(1);
        self.next_log_step = (step / every + 1) * every;
        let metrics: Vec<proto::StepMetrics> = active.iter().filter_map(|m| m.metrics).collect();
        if metrics.is_empty() {
            return;
        }
        let n = metrics.len() as f64;
        let losses: Vec<f64> = metrics
            .iter()
            .filter_map(|&m| known_loss(Some(m)))
            .collect();
        let loss = match losses.len() {
            0 => "not read yet".to_string(),
            k => format!("{:.4}", losses.iter().sum::<f64>() / k as f64),
        };
        let samples_per_second: f64 = metrics.iter().map(|m| m.samples_per_second).sum();
        let wait = metrics.iter().map(|m| m.data_wait_share).sum::<f64>() / n;
        let stage = self
            .config
            .plan
            .get(self.completed)
            .map(|s| format!("{} ", s.name))
            .unwrap_or_default();
        tracing::info!(
            "{stage}step {step}: loss {loss}, {samples_per_second:.1} samples/s across {} workers, \
             data wait {:.0}%, generation {}",
            active.len(),
            wait * 100.0,
            self.generation
        );
    }

    /// What a rendezvous waits for, in words (for timeouts and logs).
    fn rendezvous_state(&self) -> String {
        match &self.phase {
            Phase::Ended => format!(
                "the job has ended: {}",
                self.end.as_ref().map(JobEnd::reason).unwrap_or_default()
            ),
            Phase::Running => format!(
                "generation {} is running with {} worker(s); newcomers are taken in when the group re-forms \
                 ({} waiting)",
                self.generation,
                self.members.len(),
                self.pending.len()
            ),
            Phase::Rendezvous { .. } => {
                let generation = self.generation + 1;
                let outstanding = self.outstanding();
                let (min, joined) = (self.config.min_workers, self.pending.len());
                if !outstanding.is_empty() {
                    let who = some_of(outstanding.iter().map(|m| m.describe()).collect());
                    format!(
                        "rendezvous for generation {generation}: {joined} worker(s) joined, waiting for \
                         survivors to join again: {}",
                        who
                    )
                } else if joined < min as usize {
                    format!(
                        "rendezvous for generation {generation}: {joined} worker(s) joined, min_workers is {min}"
                    )
                } else {
                    format!(
                        "rendezvous for generation {generation}: {joined} worker(s) joined, last call for more \
                         (max_workers {})",
                        self.config.max_workers
                    )
                }
            }
        }
    }
}

/// Slots in natural order: "cpu:2" before "cpu:10".
fn slot_order(slot: &str) -> (&str, Option<u64>, &str) {
    match slot.rsplit_once(':') {
        Some((kind, index)) => (kind, index.parse().ok(), slot),
        None => (slot, None, slot),
    }
}

/// At most a few names, then how many more.
fn some_of(names: Vec<String>) -> String {
    const SHOWN: usize = 4;
    let more = names.len().saturating_sub(SHOWN);
    let mut text = names.into_iter().take(SHOWN).collect::<Vec<_>>().join("; ");
    if more > 0 {
        text.push_str(&format!("; and {more} more"));
    }
    text
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

fn looks_like_host_port(addr: &str) -> bool {
    addr.rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

/// A worker's reported loss, if it has one: workers read their losses off
/// the device only at log and checkpoint steps and report NaN before the
/// first such read.
fn known_loss(metrics: Option<proto::StepMetrics>) -> Option<f64> {
    metrics.map(|m| m.loss).filter(|l| l.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Token;

    fn config(min: u32, max: u32) -> Arc<CoordinatorConfig> {
        let mut config = CoordinatorConfig::new(Token::new("t").unwrap(), "[job]\n".into());
        config.min_workers = min;
        config.max_workers = max;
        config.last_call = Duration::from_millis(100);
        config.heartbeat_interval = Duration::from_millis(10);
        config.heartbeat_timeout = Duration::from_millis(50);
        config.max_restarts = 1;
        Arc::new(config)
    }

    fn request(host: &str, slot: &str, port: u16) -> proto::JoinRequest {
        proto::JoinRequest {
            protocol_version: PROTOCOL_VERSION,
            host: host.into(),
            slot: slot.into(),
            data_addr: format!("{host}:{port}"),
            pid: 1,
            worker_id: String::new(),
            wait_ms: 0,
        }
    }

    fn state(min: u32, max: u32, now: Instant) -> State {
        State::new(config(min, max), Arc::new(|_| Ok(Vec::new())), now)
    }

    #[test]
    fn ranks_follow_host_and_slot_not_join_order() {
        let t0 = Instant::now();
        let mut s = state(3, 3, t0);
        let mut rx = Vec::new();
        for (host, slot, port) in [("b", "cpu:0", 1), ("a", "cpu:10", 2), ("a", "cpu:2", 3)] {
            rx.push(s.join(request(host, slot, port), t0).unwrap().1);
        }
        let replies: Vec<proto::JoinReply> = rx
            .into_iter()
            .map(|mut r| r.try_recv().unwrap().unwrap())
            .collect();
        let ranks: Vec<u32> = replies.iter().map(|r| r.rank).collect();
        assert_eq!(ranks, [2, 1, 0]);
        assert_eq!(replies[0].ring_peers, ["a:3", "a:2", "b:1"]);
    }

    #[test]
    fn the_last_call_waits_for_more_after_min_workers() {
        let t0 = Instant::now();
        let mut s = state(1, 3, t0);
        let (_, mut first) = s.join(request("a", "cpu:0", 1), t0).unwrap();
        assert!(
            first.try_recv().is_err(),
            "formed before the last call ended"
        );
        let (_, mut second) = s
            .join(request("a", "cpu:1", 2), t0 + Duration::from_millis(50))
            .unwrap();
        s.tick(t0 + Duration::from_millis(99));
        assert!(second.try_recv().is_err());
        s.tick(t0 + Duration::from_millis(101));
        assert_eq!(first.try_recv().unwrap().unwrap().world_size, 2);
        assert_eq!(second.try_recv().unwrap().unwrap().world_size, 2);
    }

    #[test]
    fn bad_data_addresses_are_refused() {
        let mut s = state(1, 1, Instant::now());
        for addr in ["", "nohost", ":123", "h:notaport"] {
            let mut r = request("a", "cpu:0", 1);
            r.data_addr = addr.into();
            let err = s.join(r, Instant::now()).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{addr:?}");
        }
    }

    fn planned_state(workers: u32, now: Instant) -> State {
        let mut config = (*config(1, workers)).clone();
        config.plan = vec![
            crate::PlanStage::all_ranks("dvae"),
            crate::PlanStage::leader("tokenizer"),
            crate::PlanStage::all_ranks("gpt"),
        ];
        config.max_restarts = 3;
        State::new(Arc::new(config), Arc::new(|_| Ok(Vec::new())), now)
    }

    fn form_group(s: &mut State, n: u16, now: Instant) -> Vec<proto::JoinReply> {
        let receivers: Vec<_> = (0..n)
            .map(|i| {
                s.join(request("a", &format!("cpu:{i}"), i + 1), now)
                    .unwrap()
                    .1
            })
            .collect();
        receivers
            .into_iter()
            .map(|mut r| r.try_recv().unwrap().unwrap())
            .collect()
    }

    fn done(s: &mut State, reply: &proto::JoinReply, stage: u32, now: Instant) -> u32 {
        s.stage_done(
            proto::StageDoneRequest {
                worker_id: reply.worker_id.clone(),
                generation: reply.generation,
                stage,
            },
            now,
        )
        .unwrap()
        .completed_stages
    }

    fn beat(s: &mut State, reply: &proto::JoinReply, stage: u32, step: u64, now: Instant) {
        let answer = s.heartbeat(
            proto::HeartbeatRequest {
                worker_id: reply.worker_id.clone(),
                generation: reply.generation,
                step: Some(step),
                metrics: Some(proto::StepMetrics {
                    loss: 1.0,
                    samples_per_second: 1.0,
                    data_wait_share: 0.0,
                    validation: None,
                    ..Default::default()
                }),
                stage,
            },
            now,
        );
        assert_eq!(
            answer.instruction,
            Instruction::Continue as i32,
            "{answer:?}"
        );
    }

    #[test]
    fn a_stage_is_complete_once_every_member_reported_it() {
        let t0 = Instant::now();
        let mut s = planned_state(2, t0);
        let group = form_group(&mut s, 2, t0);
        assert_eq!(group[0].plan.len(), 3);
        assert!(group[1].plan[1].leader_only && !group[1].plan[0].leader_only);
        assert_eq!(group[0].first_stage, 0);

        assert_eq!(
            done(&mut s, &group[0], 0, t0),
            0,
            "one of two is not enough"
        );
        let status = s.status(t0);
        assert_eq!(status.stages[0].state, StageState::Running);
        assert_eq!(status.workers[0].stage, 1);
        assert_eq!(done(&mut s, &group[1], 0, t0), 1);
        // Said again (a retried call): accepted, nothing changes.
        assert_eq!(done(&mut s, &group[1], 0, t0), 1);
        let status = s.status(t0);
        assert_eq!(
            status.stages.iter().map(|x| x.state).collect::<Vec<_>>(),
            [
                StageState::Complete,
                StageState::Running,
                StageState::Pending
            ]
        );
        assert_eq!(status.current_stage().unwrap().name, "tokenizer");
    }

    #[test]
    fn a_worker_cannot_skip_a_stage_or_report_one_the_plan_lacks() {
        let t0 = Instant::now();
        let mut s = planned_state(1, t0);
        let group = form_group(&mut s, 1, t0);
        let mut request = proto::StageDoneRequest {
            worker_id: group[0].worker_id.clone(),
            generation: 1,
            stage: 2,
        };
        let skipped = s.stage_done(request.clone(), t0).unwrap_err();
        assert_eq!(skipped.code(), tonic::Code::FailedPrecondition);
        assert!(
            skipped.message().contains("in stage 0"),
            "{}",
            skipped.message()
        );
        request.stage = 3;
        let beyond = s.stage_done(request.clone(), t0).unwrap_err();
        assert_eq!(beyond.code(), tonic::Code::OutOfRange);
        request.stage = 0;
        request.generation = 0;
        let over = s.stage_done(request.clone(), t0).unwrap_err();
        assert_eq!(over.code(), tonic::Code::Aborted, "{over:?}");
        request.generation = 1;
        request.worker_id = "w99".into();
        assert_eq!(
            s.stage_done(request, t0).unwrap_err().code(),
            tonic::Code::NotFound
        );
    }

    #[test]
    fn a_reformed_group_starts_at_the_first_stage_not_complete() {
        let t0 = Instant::now();
        let mut s = planned_state(3, t0);
        let group = form_group(&mut s, 3, t0);
        for member in &group {
            done(&mut s, member, 0, t0);
        }
        // Rank 0 and 1 finish the tokenizer stage; rank 2 dies before it
        // reports. The survivors passed the barrier that ends the stage,
        // so the stage is complete without it.
        done(&mut s, &group[0], 1, t0);
        done(&mut s, &group[1], 1, t0);
        assert_eq!(s.completed, 1);
        let t1 = t0 + Duration::from_millis(40);
        beat(&mut s, &group[0], 2, 5, t1);
        beat(&mut s, &group[1], 2, 5, t1);
        s.tick(t0 + Duration::from_millis(60));
        assert_eq!(
            s.completed, 2,
            "the dead member's silence completes the stage"
        );

        let rejoin = |s: &mut State, reply: &proto::JoinReply| {
            let mut r = request("a", &format!("cpu:{}", reply.rank), reply.rank as u16 + 1);
            r.worker_id = reply.worker_id.clone();
            s.join(r, t1).unwrap().1
        };
        let mut receivers = [rejoin(&mut s, &group[0]), rejoin(&mut s, &group[1])];
        let replies: Vec<proto::JoinReply> = receivers
            .iter_mut()
            .map(|r| r.try_recv().unwrap().unwrap())
            .collect();
        assert_eq!(replies[0].generation, 2);
        assert_eq!(replies[0].world_size, 2);
        assert!(replies.iter().all(|r| r.first_stage == 2), "{replies:?}");
        let status = s.status(t1);
        assert_eq!(status.current_stage().unwrap().name, "gpt");
        assert_eq!(status.workers[0].stage, 2);
    }

    #[test]
    fn figures_of_a_stage_already_left_are_not_counted() {
        let t0 = Instant::now();
        let mut s = planned_state(1, t0);
        let group = form_group(&mut s, 1, t0);
        beat(&mut s, &group[0], 0, 600, t0);
        assert_eq!(s.status(t0).step, Some(600));
        done(&mut s, &group[0], 0, t0);
        // A heartbeat sent before StageDone arrives after it.
        beat(&mut s, &group[0], 0, 600, t0);
        assert_eq!(
            s.status(t0).step,
            None,
            "the dVAE's step is not the tokenizer's"
        );
        done(&mut s, &group[0], 1, t0);
        beat(&mut s, &group[0], 2, 3, t0);
        assert_eq!(s.status(t0).step, Some(3));
    }

    #[test]
    fn a_worker_process_that_exits_fails_at_once_not_after_its_timeout() {
        let t0 = Instant::now();
        let mut s = planned_state(2, t0);
        let group = form_group(&mut s, 2, t0);
        // Both requests said pid 1: give rank 1 a pid of its own.
        s.members[1].who.pid = 42;
        s.process_exited("elsewhere", 42, "signal: 9 (SIGKILL)", t0);
        assert!(matches!(s.phase, Phase::Running), "another host's pid 42");
        s.process_exited("a", 42, "signal: 9 (SIGKILL)", t0);
        assert!(matches!(s.phase, Phase::Rendezvous { .. }));
        let cause = s.status(t0).reason.unwrap();
        assert!(cause.contains("exited: signal: 9"), "{cause}");
        // The survivor joins again and the group forms at once: nobody
        // waits for the dead worker's heartbeat timeout.
        let mut r = request("a", "cpu:0", 1);
        r.worker_id = group[0].worker_id.clone();
        let mut rx = s.join(r, t0).unwrap().1;
        let reply = rx.try_recv().unwrap().unwrap();
        assert_eq!((reply.generation, reply.world_size), (2, 1));
    }

    fn supply(live: u32) -> Option<WorkerSupply> {
        Some(WorkerSupply {
            live,
            why: "the launcher's restarts are spent".into(),
        })
    }

    #[test]
    fn a_rendezvous_short_of_min_workers_fails_at_once_when_no_more_can_come() {
        let t0 = Instant::now();
        let mut s = state(2, 2, t0);
        s.limit_workers(supply(2), t0);
        let group = form_group(&mut s, 2, t0);
        s.members[1].who.pid = 42;
        s.process_exited("a", 42, "signal: 9 (SIGKILL)", t0);
        // A restart is on its way: the rendezvous waits for it.
        s.tick(t0);
        assert!(matches!(s.phase, Phase::Rendezvous { .. }));
        // None is: min_workers cannot be met, and the job says so now.
        s.limit_workers(supply(1), t0);
        let end = s.end.as_ref().map(JobEnd::reason).expect("the job goes on");
        assert!(end.contains("min_workers is 2"), "{end}");
        assert!(end.contains("restarts are spent"), "{end}");
        assert!(
            end.contains(&format!("missing: worker {}", group[1].worker_id)),
            "{end}"
        );
    }

    #[test]
    fn a_reformation_waits_a_last_call_for_restarted_workers() {
        let t0 = Instant::now();
        let mut s = state(1, 2, t0);
        s.limit_workers(supply(2), t0);
        let group = form_group(&mut s, 2, t0);
        s.members[1].who.pid = 42;
        s.process_exited("a", 42, "signal: 9 (SIGKILL)", t0);
        // The survivor is back; min_workers is met, but a restarted worker
        // is starting: the last call waits for it.
        let mut back = request("a", "cpu:0", 1);
        back.worker_id = group[0].worker_id.clone();
        let mut survivor = s.join(back, t0).unwrap().1;
        assert!(survivor.try_recv().is_err(), "formed without the restart");
        let mut restarted = s
            .join(request("a", "cpu:1", 2), t0 + Duration::from_millis(50))
            .unwrap()
            .1;
        let (a, b) = (
            survivor.try_recv().unwrap().unwrap(),
            restarted.try_recv().unwrap().unwrap(),
        );
        assert_eq!((a.generation, a.world_size, b.world_size), (2, 2, 2));
    }

    #[test]
    fn a_reformed_group_resumes_a_stage_an_earlier_generation_trained_in() {
        let t0 = Instant::now();
        let mut s = planned_state(2, t0);
        let group = form_group(&mut s, 2, t0);
        assert!(!group[0].first_stage_started);
        assert_eq!(group[0].ring_secret.len(), 32);
        beat(&mut s, &group[0], 0, 5, t0);
        s.members[1].who.pid = 42;
        s.process_exited("a", 42, "signal: 9 (SIGKILL)", t0);
        let mut back = request("a", "cpu:0", 1);
        back.worker_id = group[0].worker_id.clone();
        let reply = s.join(back, t0).unwrap().1.try_recv().unwrap().unwrap();
        assert_eq!((reply.generation, reply.first_stage), (2, 0));
        assert!(
            reply.first_stage_started,
            "the resume policy would apply again"
        );
        assert_ne!(
            reply.ring_secret, group[0].ring_secret,
            "a secret per generation"
        );
    }
}
