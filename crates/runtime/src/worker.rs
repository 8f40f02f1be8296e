//! The worker's side of the coordinator, as a blocking API for the
//! synchronous training loop (it owns a small tokio runtime).
//!
//! ```no_run
//! # use std::time::{Duration, Instant};
//! # use dalle_runtime::{Departure, Heartbeats, Instruction, JoinInfo, Membership, StepReport, Token};
//! # fn train_step(_: u64) -> f64 { 0.0 }
//! # let secret = String::from("the job's token");
//! let token = Token::new(secret)?;
//! let info = JoinInfo::this_process("cpu:0", "10.0.0.2:29600");
//! let mut membership = Membership::new("http://10.0.0.1:29500", &token, info)?;
//! let deadline = || Instant::now() + Duration::from_secs(300);
//! let mut assignment = membership.join(deadline())?;
//! let mut heartbeats = Heartbeats::start(&membership, &assignment);
//! let mut step = 0;
//! loop {
//!     // ... build the collective from `assignment`, restore the newest checkpoint ...
//!     match heartbeats.instruction() {
//!         Instruction::Continue => {}
//!         Instruction::Reform { reason } => {
//!             // Leave the collective, then join again while the old
//!             // heartbeats still say this worker is alive.
//!             assignment = membership.join(deadline())?;
//!             heartbeats = Heartbeats::start(&membership, &assignment);
//!             continue;
//!         }
//!         Instruction::Stop { reason } => break,
//!     }
//!     let loss = train_step(step);
//!     step += 1;
//!     heartbeats.report(StepReport { step, loss, samples_per_second: 0.0, data_wait_share: 0.0 });
//!     # if step == 10 { break; }
//! }
//! membership.leave(&assignment, step, Departure::Finished)?;
//! # Ok::<(), dalle_runtime::RuntimeError>(())
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::auth::AttachToken;
use crate::proto::{self, coordinator_client::CoordinatorClient};
use crate::{
    Backend, ClientTls, Instruction, PROTOCOL_VERSION, PlanStage, RuntimeError, StepReport, Token,
    ValidationReport,
};

type Client = CoordinatorClient<InterceptedService<Channel, AttachToken>>;

/// What a worker's memory figures count (see [`UsageReport`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryKind {
    /// Not measured.
    #[default]
    Unknown,
    /// GPU memory in use on the worker's device, as the CUDA driver reports
    /// it (total - free: the whole device).
    CudaDevice,
    /// The process's resident set on the host (VmRSS, peak VmHWM).
    ProcessRss,
}

impl MemoryKind {
    /// Its name as the status page, `/metrics` and the JSON status give it.
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryKind::Unknown => "unknown",
            MemoryKind::CudaDevice => "cuda_device",
            MemoryKind::ProcessRss => "process_rss",
        }
    }
}

impl From<MemoryKind> for proto::MemoryKind {
    fn from(kind: MemoryKind) -> Self {
        match kind {
            MemoryKind::Unknown => proto::MemoryKind::Unspecified,
            MemoryKind::CudaDevice => proto::MemoryKind::CudaDevice,
            MemoryKind::ProcessRss => proto::MemoryKind::ProcessRss,
        }
    }
}

impl From<proto::MemoryKind> for MemoryKind {
    fn from(kind: proto::MemoryKind) -> Self {
        match kind {
            proto::MemoryKind::Unspecified => MemoryKind::Unknown,
            proto::MemoryKind::CudaDevice => MemoryKind::CudaDevice,
            proto::MemoryKind::ProcessRss => MemoryKind::ProcessRss,
        }
    }
}

/// An operator's figures of a worker, beside its [`StepReport`]: memory,
/// model FLOP/s and MFU, its last checkpoint save. Each is `None` where it
/// was not measured; the heartbeats carry the latest with every step report.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct UsageReport {
    /// Memory in use, in bytes, of the kind `memory_kind`.
    pub memory_bytes: Option<u64>,
    /// The most memory in use so far, in bytes.
    pub memory_peak_bytes: Option<u64>,
    /// What the memory figures count.
    pub memory_kind: MemoryKind,
    /// Model TFLOP/s of the worker's device over its last log window.
    pub model_tflops: Option<f64>,
    /// Model FLOPs utilisation (0..1) over its last log window.
    pub mfu: Option<f64>,
    /// Seconds the last committed checkpoint save took.
    pub checkpoint_seconds: Option<f64>,
    /// Bytes this worker wrote in it.
    pub checkpoint_bytes: Option<u64>,
}

/// Beyond the wait it asked for, how long a worker gives the coordinator to
/// answer Join before calling it unresponsive.
const JOIN_GRACE: Duration = Duration::from_secs(5);

/// Who a worker is, for the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinInfo {
    /// Host name (ranks are ordered by host, then slot).
    pub host: String,
    /// The device this worker drives, e.g. "cuda:0" or "cpu:3".
    pub slot: String,
    /// host:port where this worker listens for its ring neighbours
    /// (reachable from the other workers); may be empty for NCCL.
    pub data_addr: String,
    /// This worker's process id.
    pub pid: u32,
}

impl JoinInfo {
    /// This process on this machine (host name from the kernel).
    pub fn this_process(slot: impl Into<String>, data_addr: impl Into<String>) -> Self {
        JoinInfo {
            host: hostname(),
            slot: slot.into(),
            data_addr: data_addr.into(),
            pid: std::process::id(),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// What the coordinator assigned this worker for one generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// This worker's id (kept across re-formations).
    pub worker_id: String,
    /// 0..world_size.
    pub rank: u32,
    /// Workers in the group.
    pub world_size: u32,
    /// 1 for the first group, +1 per re-formation.
    pub generation: u64,
    /// Every member's data address, in rank order.
    pub ring_peers: Vec<String>,
    /// The NCCL unique id (empty for the TCP ring).
    pub nccl_unique_id: Vec<u8>,
    /// The collective to build.
    pub backend: Backend,
    /// The job's config as TOML (the coordinator's).
    pub job_toml: String,
    /// How often to heartbeat.
    pub heartbeat_interval: Duration,
    /// Silence after which the coordinator drops a worker (and a worker
    /// that cannot reach the coordinator stops).
    pub heartbeat_timeout: Duration,
    /// The job's stages, in order (empty when the coordinator has no plan).
    pub plan: Vec<PlanStage>,
    /// Where this group starts in `plan`: the stages before it are complete.
    pub first_stage: usize,
    /// An earlier generation started `first_stage` already: resume the
    /// run's newest committed checkpoint of it, whatever the job's resume
    /// policy said (that policy is for a stage's first start in the job).
    pub first_stage_started: bool,
    /// This generation's ring secret (ring links authenticate with it).
    pub ring_secret: Vec<u8>,
    /// The job's epoch (its coordinator's start, ms since the Unix epoch):
    /// with `generation`, this group's place in the order of groups.
    pub job_epoch: u64,
}

impl Assignment {
    fn from_reply(reply: proto::JoinReply) -> Result<Self, RuntimeError> {
        Ok(Assignment {
            backend: reply.backend.parse()?,
            worker_id: reply.worker_id,
            rank: reply.rank,
            world_size: reply.world_size,
            generation: reply.generation,
            ring_peers: reply.ring_peers,
            nccl_unique_id: reply.nccl_unique_id,
            job_toml: reply.job,
            heartbeat_interval: Duration::from_millis(reply.heartbeat_interval_ms.max(1).into()),
            heartbeat_timeout: Duration::from_millis(reply.heartbeat_timeout_ms.max(1).into()),
            first_stage: reply.first_stage as usize,
            first_stage_started: reply.first_stage_started,
            ring_secret: reply.ring_secret,
            job_epoch: reply.job_epoch,
            plan: reply
                .plan
                .into_iter()
                .map(|s| PlanStage {
                    name: s.name,
                    leader_only: s.leader_only,
                })
                .collect(),
        })
    }
}

/// How a worker leaves the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Departure {
    /// It finished its job.
    Finished,
    /// It gives up, with what went wrong (e.g. "collective broken: peer 2
    /// (10.0.0.3:4567) timed out"); the others re-form without it.
    Failed(String),
    /// It was told to stop (SIGTERM), and did at a step boundary, for this
    /// reason: the others re-form without it, and no restart is spent.
    Stopped(String),
}

/// A worker's connection to its coordinator. Blocking: call it from the
/// training thread, not from async code.
pub struct Membership {
    runtime: Arc<tokio::runtime::Runtime>,
    url: String,
    client: Client,
    info: JoinInfo,
    worker_id: Option<String>,
    /// How long the coordinator may stay unreachable before this worker
    /// gives up; `None`: the heartbeat timeout.
    grace: Option<Duration>,
}

impl Membership {
    /// Keeps trying an unreachable coordinator for `grace` (at least the
    /// heartbeat timeout) before giving up: long enough for a coordinator
    /// to be started again. Meanwhile training pauses at its next step
    /// boundary ([`Heartbeats::wait_for_coordinator`]).
    pub fn set_coordinator_grace(&mut self, grace: Duration) {
        self.grace = Some(grace);
    }

    fn grace(&self, assignment: &Assignment) -> Duration {
        self.grace
            .unwrap_or_default()
            .max(assignment.heartbeat_timeout)
    }

    /// Prepares the connection (nothing is sent yet; the coordinator need
    /// not be up). `coordinator_url` is `http://host:port` (or `host:port`),
    /// or `https://host:port` checked against the system's roots.
    pub fn new(coordinator_url: &str, token: &Token, info: JoinInfo) -> Result<Self, RuntimeError> {
        Self::connect(coordinator_url, token, info, None)
    }

    /// [`Membership::new`] with TLS checked as `tls` says; `tls` needs an
    /// `https://` URL (or a bare `host:port`, which then means https).
    pub fn connect(
        coordinator_url: &str,
        token: &Token,
        info: JoinInfo,
        tls: Option<&ClientTls>,
    ) -> Result<Self, RuntimeError> {
        let bad_url = |reason: String| RuntimeError::Url {
            url: coordinator_url.to_string(),
            reason,
        };
        let url = match (coordinator_url.split_once("://"), tls) {
            (None, None) => format!("http://{coordinator_url}"),
            (None, Some(_)) => format!("https://{coordinator_url}"),
            (Some(("http", _)), Some(_)) => {
                return Err(bad_url(
                    "TLS settings were given for a plain http:// coordinator; use https://".into(),
                ));
            }
            (Some(("http" | "https", _)), _) => coordinator_url.to_string(),
            (Some((scheme, _)), _) => {
                return Err(bad_url(format!(
                    "scheme {scheme}:// is neither http:// nor https://"
                )));
            }
        };
        let mut endpoint =
            Endpoint::from_shared(url.clone()).map_err(|e| bad_url(e.to_string()))?;
        if url.starts_with("https://") {
            let config = tls.cloned().unwrap_or_default().config();
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| RuntimeError::Tls(format!("for coordinator {url}: {e}")))?;
        }
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("dalle-membership")
            .enable_all()
            .build()
            .map_err(|source| RuntimeError::Runtime {
                what: "worker membership",
                source,
            })?;
        let channel = {
            let _entered = runtime.enter();
            endpoint.connect_lazy()
        };
        Ok(Membership {
            runtime: Arc::new(runtime),
            url,
            client: CoordinatorClient::with_interceptor(channel, AttachToken::new(token)),
            info,
            worker_id: None,
            grace: None,
        })
    }

    /// The coordinator's URL.
    pub fn coordinator_url(&self) -> &str {
        &self.url
    }

    /// Joins the next group (first join, or again after REFORM) and blocks
    /// until it forms. Connection failures are retried until `deadline`, so
    /// a worker may start before its coordinator; refusals (token, protocol
    /// version, job over) fail at once.
    pub fn join(&mut self, deadline: Instant) -> Result<Assignment, RuntimeError> {
        let runtime = self.runtime.clone();
        runtime.block_on(self.join_async(deadline))
    }

    async fn join_async(&mut self, deadline: Instant) -> Result<Assignment, RuntimeError> {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(20);
        let mut last_error = None;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let timed_out = |detail: String| RuntimeError::JoinTimeout {
                coordinator: self.url.clone(),
                waited: started.elapsed(),
                detail,
            };
            if remaining.is_zero() {
                return Err(timed_out(last_error.unwrap_or_else(|| {
                    "the deadline passed before the first try".into()
                })));
            }
            let request = proto::JoinRequest {
                protocol_version: PROTOCOL_VERSION,
                host: self.info.host.clone(),
                slot: self.info.slot.clone(),
                data_addr: self.info.data_addr.clone(),
                pid: self.info.pid,
                worker_id: self.worker_id.clone().unwrap_or_default(),
                wait_ms: u32::try_from(remaining.as_millis())
                    .unwrap_or(u32::MAX)
                    .max(1),
            };
            let mut client = self.client.clone();
            let answer = tokio::time::timeout(remaining + JOIN_GRACE, client.join(request)).await;
            let status = match answer {
                Ok(Ok(reply)) => {
                    let assignment = Assignment::from_reply(reply.into_inner())?;
                    self.worker_id = Some(assignment.worker_id.clone());
                    tracing::info!(
                        "joined generation {} as rank {} of {} (worker {}, backend {})",
                        assignment.generation,
                        assignment.rank,
                        assignment.world_size,
                        assignment.worker_id,
                        assignment.backend
                    );
                    return Ok(assignment);
                }
                Ok(Err(status)) => status,
                Err(_) => {
                    return Err(timed_out(format!(
                        "the coordinator accepted the call but did not answer {} after the deadline",
                        humanize(JOIN_GRACE)
                    )));
                }
            };
            match status.code() {
                Code::DeadlineExceeded => return Err(timed_out(status.message().to_string())),
                Code::Unavailable | Code::Unknown | Code::Cancelled => {
                    // A certificate this worker does not trust stays so:
                    // no point retrying until the deadline.
                    if let Some(why) = tls_failure(&status) {
                        return Err(RuntimeError::Tls(format!(
                            "the handshake with coordinator {} failed: {why} (check --tls-ca and \
                             --tls-domain against the coordinator's certificate)",
                            self.url
                        )));
                    }
                    let detail = describe(&status);
                    tracing::debug!("coordinator {} not reachable yet: {detail}", self.url);
                    last_error = Some(format!("last try: {detail}"));
                    let pause = backoff.min(deadline.saturating_duration_since(Instant::now()));
                    tokio::time::sleep(pause).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                code => {
                    return Err(RuntimeError::Refused {
                        coordinator: self.url.clone(),
                        rpc: "Join",
                        code,
                        message: status.message().to_string(),
                    });
                }
            }
        }
    }

    /// Tells the coordinator this worker is done: finished (every member
    /// finishing ends the job) or failed (the others re-form).
    pub fn leave(
        &self,
        assignment: &Assignment,
        final_step: u64,
        departure: Departure,
    ) -> Result<(), RuntimeError> {
        let (success, error, stopped) = match departure {
            Departure::Finished => (true, String::new(), false),
            Departure::Failed(error) => (false, error, false),
            Departure::Stopped(reason) => (false, reason, true),
        };
        let request = proto::LeaveRequest {
            worker_id: assignment.worker_id.clone(),
            generation: assignment.generation,
            final_step,
            success,
            error,
            stopped,
        };
        let mut client = self.client.clone();
        let patience = assignment.heartbeat_timeout.max(Duration::from_secs(5));
        // The timer must be made inside the runtime.
        let answer = self
            .runtime
            .block_on(async { tokio::time::timeout(patience, client.leave(request)).await });
        match answer {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(rpc_error(&self.url, "Leave", &status)),
            Err(_) => Err(RuntimeError::Unreachable {
                coordinator: self.url.clone(),
                rpc: "Leave",
                detail: format!("no answer within {}", humanize(patience)),
            }),
        }
    }
}

impl Membership {
    /// Tells the coordinator that the worker process `pid` on this
    /// membership's host (its [`JoinInfo`]'s) exited, `what` saying how
    /// (its exit status): from the agent that started it (`dalle node`), so
    /// that the group re-forms now instead of after the heartbeat timeout.
    /// One try, bounded like [`Membership::leave`]; the heartbeat timeout
    /// still covers an exit that was not heard.
    pub fn report_exit(&self, pid: u32, what: &str) -> Result<(), RuntimeError> {
        let request = proto::ProcessExitedRequest {
            host: self.info.host.clone(),
            pid,
            what: what.to_string(),
        };
        let mut client = self.client.clone();
        let patience = Duration::from_secs(5);
        // The timer must be made inside the runtime.
        let answer = self.runtime.block_on(async {
            tokio::time::timeout(patience, client.process_exited(request)).await
        });
        match answer {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(rpc_error(&self.url, "ProcessExited", &status)),
            Err(_) => Err(RuntimeError::Unreachable {
                coordinator: self.url.clone(),
                rpc: "ProcessExited",
                detail: format!("no answer within {}", humanize(patience)),
            }),
        }
    }
}

impl Membership {
    /// Tells the coordinator this worker finished stage `stage` of the plan
    /// (after the barrier that ends it); returns how many stages are
    /// complete now.
    pub fn stage_done(&self, assignment: &Assignment, stage: usize) -> Result<usize, RuntimeError> {
        let request = proto::StageDoneRequest {
            worker_id: assignment.worker_id.clone(),
            generation: assignment.generation,
            stage: stage as u32,
        };
        let patience = assignment.heartbeat_timeout.max(Duration::from_secs(5));
        // An unreachable coordinator may be starting again: keep trying for
        // the grace period.
        let deadline = Instant::now() + self.grace(assignment);
        loop {
            let mut client = self.client.clone();
            let request = request.clone();
            let answer = self.runtime.block_on(async {
                tokio::time::timeout(patience, client.stage_done(request)).await
            });
            let error = match answer {
                Ok(Ok(reply)) => return Ok(reply.into_inner().completed_stages as usize),
                Ok(Err(status)) => rpc_error(&self.url, "StageDone", &status),
                Err(_) => RuntimeError::Unreachable {
                    coordinator: self.url.clone(),
                    rpc: "StageDone",
                    detail: format!("no answer within {}", humanize(patience)),
                },
            };
            if !matches!(error, RuntimeError::Unreachable { .. }) || Instant::now() >= deadline {
                return Err(error);
            }
            tracing::warn!("{error}: trying again");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("url", &self.url)
            .field("info", &self.info)
            .field("worker_id", &self.worker_id)
            .finish_non_exhaustive()
    }
}

/// Heartbeats of one generation, sent in the background every
/// `heartbeat_interval` with the latest [`StepReport`] (and the stage's
/// latest [`ValidationReport`]); the coordinator's answer becomes
/// [`Heartbeats::instruction`]. Dropping it stops them.
pub struct Heartbeats {
    reports: watch::Sender<Progress>,
    /// Sends a heartbeat now instead of at the next tick.
    beat_now: Arc<tokio::sync::Notify>,
    /// Set while the coordinator has not answered for a heartbeat timeout
    /// (it may be starting again): training waits at its step boundary.
    lost: Arc<std::sync::atomic::AtomicBool>,
    instruction: watch::Receiver<Instruction>,
    task: tokio::task::JoinHandle<()>,
    /// Tasks of [`Heartbeats::on_leave_group`].
    watchers: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    // Keeps the runtime the task runs on alive.
    _runtime: Arc<tokio::runtime::Runtime>,
}

impl Heartbeats {
    /// Starts heartbeating for `assignment` (its worker id and generation).
    pub fn start(membership: &Membership, assignment: &Assignment) -> Self {
        let (reports, reports_rx) = watch::channel(Progress {
            stage: assignment.first_stage,
            report: None,
            validation: None,
            usage: UsageReport::default(),
        });
        let (instruction_tx, instruction) = watch::channel(Instruction::Continue);
        let beat_now = Arc::new(tokio::sync::Notify::new());
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let beat = Beat {
            beat_now: beat_now.clone(),
            lost: lost.clone(),
            grace: membership.grace(assignment),
            client: membership.client.clone(),
            url: membership.url.clone(),
            worker_id: assignment.worker_id.clone(),
            generation: assignment.generation,
            interval: assignment.heartbeat_interval,
            timeout: assignment.heartbeat_timeout,
        };
        let task = membership
            .runtime
            .spawn(beat.run(reports_rx, instruction_tx));
        Heartbeats {
            reports,
            beat_now,
            lost,
            instruction,
            task,
            watchers: Default::default(),
            _runtime: membership.runtime.clone(),
        }
    }

    /// Hands the latest step's figures to the next heartbeat; never blocks.
    /// A stage's first step is sent at once: it tells the coordinator that
    /// the stage trained (its resume policy was applied), which a re-formed
    /// group must know even when the group breaks before the next tick.
    pub fn report(&self, report: StepReport) {
        let mut first = false;
        self.reports.send_modify(|p| {
            first = p.report.is_none();
            p.report = Some(report);
        });
        if first {
            self.beat_now.notify_one();
        }
    }

    /// Hands the worker's latest [`UsageReport`] to the heartbeats, which
    /// carry it with the step figures (from the next step report on, and
    /// across stages); never blocks.
    pub fn report_usage(&self, usage: UsageReport) {
        self.reports.send_modify(|p| p.usage = usage);
    }

    /// Hands the stage's latest held-out figures to the heartbeats, which
    /// carry them (with the step figures) until the stage ends; never
    /// blocks.
    pub fn report_validation(&self, validation: ValidationReport) {
        self.reports
            .send_modify(|p| p.validation = Some(validation));
    }

    /// This worker starts stage `stage` of the plan: the next heartbeats
    /// carry it, and no figures until its first step.
    pub fn enter_stage(&self, stage: usize) {
        self.reports.send_modify(|p| {
            *p = Progress {
                stage,
                report: None,
                validation: None,
                // Memory and the last checkpoint belong to the process, the
                // model's FLOP/s to the stage that measured them.
                usage: UsageReport {
                    model_tflops: None,
                    mfu: None,
                    ..p.usage
                },
            }
        });
    }

    /// Blocks while the coordinator is unreachable (past a heartbeat
    /// timeout, within the grace period): a step boundary is where a worker
    /// waits for a coordinator that is starting again. Returns at once when
    /// it answers, or when the instruction is no longer to continue.
    pub fn wait_for_coordinator(&self) {
        use std::sync::atomic::Ordering;
        let mut said = false;
        while self.lost.load(Ordering::Relaxed)
            && matches!(self.instruction(), Instruction::Continue)
        {
            if !said {
                tracing::warn!("the coordinator does not answer: waiting at this step boundary");
                said = true;
            }
            // The heartbeat thread clears the flag when an answer comes.
            std::thread::sleep(Duration::from_millis(50));
        }
        if said {
            tracing::info!("the coordinator answers again");
        }
    }

    /// What to do at this step boundary. REFORM and STOP stay once heard
    /// (STOP wins); STOP also comes when the coordinator stays unreachable
    /// for the heartbeat timeout or refuses the heartbeats.
    pub fn instruction(&self) -> Instruction {
        self.instruction.borrow().clone()
    }

    /// Calls `f` once, from the heartbeat thread, as soon as the coordinator
    /// says REFORM or STOP: e.g. to interrupt a collective blocked on a hung
    /// peer, which would otherwise never reach its step boundary.
    pub fn on_leave_group(&self, f: impl FnOnce(&Instruction) + Send + 'static) {
        let mut instruction = self.instruction.clone();
        let watcher = self._runtime.spawn(async move {
            let told = instruction
                .wait_for(|i| !matches!(i, Instruction::Continue))
                .await
                .map(|i| i.clone());
            if let Ok(told) = told {
                f(&told);
            }
        });
        self.watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(watcher);
    }

    /// Stops heartbeating (as dropping does).
    pub fn stop(self) {}
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.task.abort();
        for watcher in self.watchers.get_mut().unwrap_or_else(|e| e.into_inner()) {
            watcher.abort();
        }
    }
}

impl std::fmt::Debug for Heartbeats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heartbeats")
            .field("instruction", &*self.instruction.borrow())
            .finish_non_exhaustive()
    }
}

/// What the heartbeats carry: the stage this worker is in, its latest step
/// there and its latest evaluation there, and its latest usage figures.
#[derive(Debug, Clone, Copy)]
struct Progress {
    stage: usize,
    report: Option<StepReport>,
    validation: Option<ValidationReport>,
    usage: UsageReport,
}

struct Beat {
    beat_now: Arc<tokio::sync::Notify>,
    lost: Arc<std::sync::atomic::AtomicBool>,
    /// Unanswered this long, the coordinator is given up (STOP).
    grace: Duration,
    client: Client,
    url: String,
    worker_id: String,
    generation: u64,
    interval: Duration,
    timeout: Duration,
}

impl Beat {
    async fn run(
        mut self,
        reports: watch::Receiver<Progress>,
        instruction: watch::Sender<Instruction>,
    ) {
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_answer = Instant::now();
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = self.beat_now.notified() => {}
            }
            let Progress {
                stage,
                report,
                validation,
                usage,
            } = *reports.borrow();
            let request = proto::HeartbeatRequest {
                stage: stage as u32,
                worker_id: self.worker_id.clone(),
                generation: self.generation,
                step: report.map(|r| r.step),
                metrics: report.map(|r| proto::StepMetrics {
                    loss: r.loss,
                    samples_per_second: r.samples_per_second,
                    data_wait_share: r.data_wait_share,
                    validation: validation.map(Into::into),
                    memory_bytes: usage.memory_bytes,
                    memory_peak_bytes: usage.memory_peak_bytes,
                    memory_kind: proto::MemoryKind::from(usage.memory_kind) as i32,
                    model_tflops: usage.model_tflops,
                    mfu: usage.mfu,
                    checkpoint_seconds: usage.checkpoint_seconds,
                    checkpoint_bytes: usage.checkpoint_bytes,
                }),
            };
            let answer = tokio::time::timeout(self.timeout, self.client.heartbeat(request)).await;
            let heard = match answer {
                Ok(Ok(reply)) => {
                    last_answer = Instant::now();
                    self.lost.store(false, std::sync::atomic::Ordering::Relaxed);
                    let reply = reply.into_inner();
                    match proto::Instruction::try_from(reply.instruction) {
                        Ok(proto::Instruction::Reform) => Some(Instruction::Reform {
                            reason: reply.reason,
                        }),
                        Ok(proto::Instruction::Stop) => Some(Instruction::Stop {
                            reason: reply.reason,
                        }),
                        _ => None,
                    }
                }
                Ok(Err(status))
                    if !matches!(
                        status.code(),
                        Code::Unavailable
                            | Code::Unknown
                            | Code::Cancelled
                            | Code::DeadlineExceeded
                    ) =>
                {
                    Some(Instruction::Stop {
                        reason: rpc_error(&self.url, "Heartbeat", &status).to_string(),
                    })
                }
                failed => {
                    let detail = match failed {
                        Ok(Err(status)) => describe(&status),
                        _ => format!("no answer within {}", humanize(self.timeout)),
                    };
                    let silent = last_answer.elapsed();
                    if silent >= self.timeout && silent < self.grace {
                        if !self.lost.swap(true, std::sync::atomic::Ordering::Relaxed) {
                            tracing::warn!(
                                "the coordinator {} has not answered for {} ({detail}): \
                                 trying it for up to {} in all",
                                self.url,
                                humanize(silent),
                                humanize(self.grace)
                            );
                        }
                        None
                    } else if silent >= self.grace {
                        Some(Instruction::Stop {
                            reason: format!(
                                "lost the coordinator {}: no heartbeat answered for {} ({detail})",
                                self.url,
                                humanize(silent)
                            ),
                        })
                    } else {
                        tracing::debug!("heartbeat to {} failed: {detail}", self.url);
                        None
                    }
                }
            };
            let Some(heard) = heard else { continue };
            let stop = matches!(heard, Instruction::Stop { .. });
            instruction.send_if_modified(|current| {
                // STOP stays; REFORM stays until STOP.
                let news = !matches!(
                    (&*current, &heard),
                    (Instruction::Stop { .. }, _)
                        | (Instruction::Reform { .. }, Instruction::Reform { .. })
                );
                if news {
                    tracing::warn!(
                        "worker {} (generation {}): the coordinator says {heard:?}",
                        self.worker_id,
                        self.generation
                    );
                    *current = heard.clone();
                }
                news
            });
            if stop {
                break;
            }
        }
    }
}

fn rpc_error(url: &str, rpc: &'static str, status: &tonic::Status) -> RuntimeError {
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => {
            RuntimeError::Unreachable {
                coordinator: url.to_string(),
                rpc,
                detail: describe(status),
            }
        }
        code => RuntimeError::Refused {
            coordinator: url.to_string(),
            rpc,
            code,
            message: status.message().to_string(),
        },
    }
}

/// The TLS error behind a failed call, if a handshake failed.
fn tls_failure(status: &tonic::Status) -> Option<String> {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        // io::Error's source skips the error it wraps: look inside.
        if let Some(tls) = error
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls.to_string());
        }
        source = error.source();
    }
    None
}

/// A status' message with the chain of its sources (the transport's reason).
fn describe(status: &tonic::Status) -> String {
    let mut text = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        let more = error.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = error.source();
    }
    text
}

fn humanize(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}
