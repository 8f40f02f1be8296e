//! The coordinator: a tonic server that forms the group of workers, watches
//! their heartbeats, re-forms the group when one fails (within a restart
//! budget) and decides when the job is over. It holds no tensors and does
//! not depend on CUDA: the NCCL unique id of each generation comes from a
//! callback the caller injects.
//!
//! ```no_run
//! # use dalle_runtime::{Coordinator, CoordinatorConfig, Token};
//! let token = Token::random();
//! let mut config = CoordinatorConfig::new(token.clone(), "[run]\n".into());
//! config.min_workers = 2;
//! config.max_workers = 2;
//! let coordinator = Coordinator::start(config, |_generation| Ok(Vec::new()))?;
//! println!("workers join {}", coordinator.url());
//! let outcome = coordinator.wait()?;
//! println!("finished at step {}", outcome.final_step);
//! # Ok::<(), dalle_runtime::RuntimeError>(())
//! ```

pub mod json;
mod persist;
mod service;
mod state;
mod status;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::auth::CheckToken;
use crate::proto::coordinator_server::CoordinatorServer;
use crate::{Backend, PlanStage, RuntimeError, ServerTls, Token, ValidationReport};
use state::State;

pub use persist::{JobStateStore, StateStore};

/// Makes the NCCL unique id of a generation (its argument); `Err` ends the
/// job with that text. Only called for [`Backend::Nccl`].
pub type NcclIdFn = Arc<dyn Fn(u64) -> Result<Vec<u8>, String> + Send + Sync>;

/// Everything the coordinator needs; [`CoordinatorConfig::new`] fills in
/// defaults. `Debug` does not show the token.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Where the gRPC service listens; port 0 picks a free one
    /// ([`CoordinatorHandle::local_addr`] tells which).
    pub listen: SocketAddr,
    /// A group forms once this many workers joined (and the last call passed).
    pub min_workers: u32,
    /// A group takes at most this many; more wait for the next re-formation.
    pub max_workers: u32,
    /// After `min_workers` joined the first group, how long to wait for more.
    pub last_call: Duration,
    /// How often workers heartbeat (sent to them in the Join reply).
    pub heartbeat_interval: Duration,
    /// A worker silent this long is dropped and the group re-forms.
    pub heartbeat_timeout: Duration,
    /// A member whose step stands still this long, heartbeats or not, is
    /// dropped as hung (stuck in a collective or a device call); `None`
    /// never. It must cover the slowest step plus a checkpoint save and a
    /// held-out evaluation.
    pub progress_timeout: Option<Duration>,
    /// Re-formations allowed; one more failure ends the job with an error.
    pub max_restarts: u32,
    /// A rendezvous (first or after a failure) that forms no group within
    /// this ends the job; `None` waits for ever.
    pub rendezvous_timeout: Option<Duration>,
    /// One job-level log line per this many steps.
    pub log_every: u64,
    /// The job token every RPC must carry.
    pub token: Token,
    /// The job's config as TOML, handed to every worker.
    pub job_toml: String,
    /// The collective the workers use.
    pub backend: Backend,
    /// Where the job state is saved at every change, so that a coordinator
    /// started again takes the job over (see [`JobStateStore`]); `None`:
    /// in memory only.
    pub state_store: Option<StateStore>,
    /// Take over the job saved in `state_store` when it is this job (the
    /// same config) and has not ended; `false` always starts a new job.
    pub take_over: bool,
    /// Where the HTTP status page listens (`GET /`, `GET /metrics`), if at all.
    pub status_listen: Option<SocketAddr>,
    /// When set, the status page and `/metrics` answer only requests with
    /// `Authorization: Bearer <token>` (Prometheus sends it with
    /// `authorization: {credentials_file: …}`); others get 401.
    pub status_token: Option<Token>,
    /// Serve gRPC over TLS with this certificate (workers then use
    /// `https://`); `None`: plain HTTP/2.
    pub tls: Option<ServerTls>,
    /// The job's stages, in order, handed to every group; a re-formed group
    /// starts at the first stage not complete. Empty: the workers need no
    /// plan (the job ends when every member leaves finished, as always).
    pub plan: Vec<PlanStage>,
}

impl CoordinatorConfig {
    /// One worker on loopback (port 0), 1 s heartbeats, a 10 s heartbeat
    /// timeout, a 10 min progress timeout, a 5 s last call, 3 restarts, a 10 min rendezvous timeout,
    /// the TCP ring and no status page.
    pub fn new(token: Token, job_toml: String) -> Self {
        CoordinatorConfig {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            min_workers: 1,
            max_workers: 1,
            last_call: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(10),
            progress_timeout: Some(Duration::from_secs(600)),
            max_restarts: 3,
            rendezvous_timeout: Some(Duration::from_secs(600)),
            log_every: 10,
            token,
            job_toml,
            backend: Backend::TcpRing,
            state_store: None,
            take_over: true,
            status_listen: None,
            status_token: None,
            tls: None,
            plan: Vec::new(),
        }
    }

    fn validate(&self) -> Result<(), RuntimeError> {
        let fail = |msg: String| Err(RuntimeError::Config(msg));
        if self.min_workers == 0 {
            return fail("min_workers must be at least 1".into());
        }
        if self.max_workers < self.min_workers {
            return fail(format!(
                "max_workers ({}) is below min_workers ({})",
                self.max_workers, self.min_workers
            ));
        }
        if self.heartbeat_interval.is_zero() {
            return fail("heartbeat_interval must be above 0".into());
        }
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return fail(format!(
                "heartbeat_timeout ({:?}) must exceed heartbeat_interval ({:?}), by a few intervals",
                self.heartbeat_timeout, self.heartbeat_interval
            ));
        }
        if self.heartbeat_timeout > Duration::from_millis(u32::MAX.into()) {
            return fail(format!(
                "heartbeat_timeout {:?} is too long",
                self.heartbeat_timeout
            ));
        }
        let mut names = std::collections::HashSet::new();
        for stage in &self.plan {
            if stage.name.is_empty() || !names.insert(stage.name.as_str()) {
                return fail(format!(
                    "plan: stage names must be present and distinct, {:?} is not",
                    stage.name
                ));
            }
        }
        Ok(())
    }
}

/// The workers that can still take part in a job (see
/// [`CoordinatorHandle::limit_workers`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSupply {
    /// Worker processes alive now (running, or restarted and starting).
    pub live: u32,
    /// Why no others can come, for the error (e.g. "launch's --max-restarts
    /// 3 are spent").
    pub why: String,
}

/// How a job ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobOutcome {
    /// The last step the workers finished.
    pub final_step: u64,
    /// The generation that finished it.
    pub generation: u64,
    /// Its world size.
    pub world_size: u32,
    /// Re-formations on the way.
    pub restarts: u32,
}

/// Where a job stands (for the status page, `/metrics` and tests).
#[derive(Debug, Clone)]
pub struct JobStatus {
    /// What the coordinator is doing.
    pub phase: JobPhase,
    /// Of the group running or last run; 0 before the first.
    pub generation: u64,
    /// Members of the running group; 0 while none runs.
    pub world_size: u32,
    /// The configured bounds.
    pub min_workers: u32,
    /// The configured bounds.
    pub max_workers: u32,
    /// Re-formations so far.
    pub restarts: u32,
    /// The budget.
    pub max_restarts: u32,
    /// The slowest active member's last finished step.
    pub step: Option<u64>,
    /// Mean of the active members' last losses.
    pub loss: Option<f64>,
    /// Sum of the active members' samples/s.
    pub samples_per_second: f64,
    /// Why the group is re-forming, or why the job ended.
    pub reason: Option<String>,
    /// The members of the group running (or last run), by rank.
    pub workers: Vec<WorkerStatus>,
    /// Workers waiting in Join for the next group.
    pub waiting: Vec<WaitingWorker>,
    /// The plan's stages and how far each got.
    pub stages: Vec<StageStatus>,
    /// The latest re-formations of the group (and take-overs by a new
    /// coordinator), oldest first; a bounded list.
    pub reformations: Vec<Reformation>,
}

/// One re-formation of the group: why the group broke, and once it formed
/// again, as what.
#[derive(Debug, Clone, PartialEq)]
pub struct Reformation {
    /// The generation that broke (or that a new coordinator took over).
    pub from_generation: u64,
    /// Which restart of the budget it spent; `None` for a take-over.
    pub restart: Option<u32>,
    /// Why.
    pub reason: String,
    /// When it began.
    pub at: std::time::SystemTime,
    /// Since it began.
    pub ago: Duration,
    /// The generation that formed after it, its world size and how long
    /// the rendezvous took; `None` while re-forming.
    pub formed: Option<(u64, u32, Duration)>,
}

impl JobStatus {
    /// The stage the group is in (the first not complete), if any.
    pub fn current_stage(&self) -> Option<&StageStatus> {
        self.stages.iter().find(|s| s.state != StageState::Complete)
    }
}

/// One stage of the plan, as the status page shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct StageStatus {
    /// Its name.
    pub name: String,
    /// Rank 0 alone runs it.
    pub leader_only: bool,
    /// How far it got.
    pub state: StageState,
    /// From its start to its completion (or until now while running);
    /// across re-formations.
    pub elapsed: Option<Duration>,
    /// Its latest figures on the validation set, as its workers reported
    /// them (kept once it is complete).
    pub validation: Option<ValidationReport>,
}

/// How far a stage of the plan got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageState {
    /// Not started yet.
    Pending,
    /// The group is in it (or re-forming to go on with it).
    Running,
    /// Every member finished it.
    Complete,
}

impl StageState {
    /// Lower-case name, as on the status page.
    pub fn as_str(self) -> &'static str {
        match self {
            StageState::Pending => "pending",
            StageState::Running => "running",
            StageState::Complete => "complete",
        }
    }
}

/// What the coordinator is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobPhase {
    /// Waiting for workers to (re-)join.
    Rendezvous,
    /// A group is training.
    Running,
    /// Every member finished.
    Finished,
    /// Ended with an error.
    Failed,
}

impl JobPhase {
    /// Lower-case name, as on the status page.
    pub fn as_str(self) -> &'static str {
        match self {
            JobPhase::Rendezvous => "rendezvous",
            JobPhase::Running => "running",
            JobPhase::Finished => "finished",
            JobPhase::Failed => "failed",
        }
    }
}

/// One member of the group.
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    /// Its id (from the Join reply).
    pub worker_id: String,
    /// Its rank.
    pub rank: u32,
    /// Host, as it said.
    pub host: String,
    /// Device slot, as it said.
    pub slot: String,
    /// Its ring address.
    pub data_addr: String,
    /// Its process id.
    pub pid: u32,
    /// "active", "finished", "failed" or "stopped".
    pub state: &'static str,
    /// Its last finished step.
    pub step: Option<u64>,
    /// Since its last heartbeat.
    pub heartbeat_age: Duration,
    /// Its last loss.
    pub loss: Option<f64>,
    /// Its last samples/s.
    pub samples_per_second: Option<f64>,
    /// Its last data-wait share.
    pub data_wait_share: Option<f64>,
    /// The plan index of the stage it is in.
    pub stage: usize,
    /// Its last memory, FLOP/s and checkpoint figures (with its last step).
    pub usage: Option<crate::worker::UsageReport>,
}

/// A worker waiting in Join.
#[derive(Debug, Clone)]
pub struct WaitingWorker {
    /// Its id.
    pub worker_id: String,
    /// Host, as it said.
    pub host: String,
    /// Slot, as it said.
    pub slot: String,
    /// Since it joined.
    pub waiting: Duration,
}

/// How the job ended, once decided.
#[derive(Debug, Clone)]
enum JobEnd {
    Finished(JobOutcome),
    Failed(Failure),
}

#[derive(Debug, Clone)]
enum Failure {
    RestartBudget { max_restarts: u32, cause: String },
    Other(String),
}

impl JobEnd {
    /// In words, for STOP replies and logs.
    fn reason(&self) -> String {
        match self {
            JobEnd::Finished(o) => format!(
                "the job finished at step {} (generation {}, {} worker(s), {} restart(s))",
                o.final_step, o.generation, o.world_size, o.restarts
            ),
            JobEnd::Failed(failure) => RuntimeError::from(failure.clone()).to_string(),
        }
    }

    fn into_result(self) -> Result<JobOutcome, RuntimeError> {
        match self {
            JobEnd::Finished(outcome) => Ok(outcome),
            JobEnd::Failed(failure) => Err(failure.into()),
        }
    }
}

impl From<Failure> for RuntimeError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::RestartBudget {
                max_restarts,
                cause,
            } => RuntimeError::RestartBudgetExhausted {
                max_restarts,
                cause,
            },
            Failure::Other(reason) => RuntimeError::JobFailed(reason),
        }
    }
}

/// The state and the job's end, shared by the service, the tick loop and
/// the status page.
struct Shared {
    state: Mutex<State>,
    end: watch::Sender<Option<JobEnd>>,
    /// Writes the job state at every change, when there is a store.
    saver: Option<Mutex<persist::Saver>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a state worth reading.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the state and publishes the job's end once it is due.
    fn update<R>(&self, f: impl FnOnce(&mut State, Instant) -> R) -> R {
        let now = Instant::now();
        let mut state = self.lock();
        let result = f(&mut state, now);
        if let Some(end) = state.take_end(now) {
            self.end.send_replace(Some(end));
        }
        if let Some(saver) = &self.saver {
            saver
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .offer(state.job_state());
        }
        result
    }
}

/// Starts coordinators.
pub struct Coordinator;

impl Coordinator {
    /// Starts a coordinator on a tokio runtime of its own (for synchronous
    /// callers such as `dalle launch`). Listening happens before this
    /// returns, so workers may connect at once.
    pub fn start<F>(
        config: CoordinatorConfig,
        nccl_id: F,
    ) -> Result<CoordinatorHandle, RuntimeError>
    where
        F: Fn(u64) -> Result<Vec<u8>, String> + Send + Sync + 'static,
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("dalle-coordinator")
            .enable_all()
            .build()
            .map_err(|source| RuntimeError::Runtime {
                what: "coordinator",
                source,
            })?;
        let handle = runtime.handle().clone();
        Self::launch(&handle, config, Arc::new(nccl_id), Some(runtime))
    }

    /// Starts a coordinator on the given runtime.
    pub fn start_on<F>(
        runtime: &tokio::runtime::Handle,
        config: CoordinatorConfig,
        nccl_id: F,
    ) -> Result<CoordinatorHandle, RuntimeError>
    where
        F: Fn(u64) -> Result<Vec<u8>, String> + Send + Sync + 'static,
    {
        Self::launch(runtime, config, Arc::new(nccl_id), None)
    }

    fn launch(
        runtime: &tokio::runtime::Handle,
        config: CoordinatorConfig,
        nccl_id: NcclIdFn,
        owned: Option<tokio::runtime::Runtime>,
    ) -> Result<CoordinatorHandle, RuntimeError> {
        config.validate()?;
        let taken_over = match &config.state_store {
            Some(store) if config.take_over => {
                persist::JobState::take_over(store.0.as_ref(), &config.job_toml)
                    .map_err(RuntimeError::Config)?
            }
            _ => None,
        };
        let config = Arc::new(config);
        let _entered = runtime.enter();
        let (listener, local_addr) = bind(config.listen, "coordinator")?;
        let status = config
            .status_listen
            .map(|addr| bind(addr, "status page"))
            .transpose()?;

        let mut state = State::new(config.clone(), nccl_id, Instant::now());
        if let Some(saved) = taken_over {
            state.take_over(saved);
        }
        let shared = Arc::new(Shared {
            saver: config.state_store.clone().map(|store| {
                let mut saver = persist::Saver::start(store);
                saver.offer(state.job_state());
                Mutex::new(saver)
            }),
            state: Mutex::new(state),
            end: watch::channel(None).0,
        });
        let (shutdown, _) = watch::channel(false);

        let service = CoordinatorServer::with_interceptor(
            service::Service::new(shared.clone()),
            CheckToken(config.token.clone()),
        );
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = &config.tls {
            server = server.tls_config(tls.config()).map_err(|e| {
                RuntimeError::Tls(format!(
                    "the coordinator cannot use the certificate and key in {}: {e}",
                    tls.origin()
                ))
            })?;
        }
        let mut stop = shutdown.subscribe();
        runtime.spawn(async move {
            let signal = async move { stopped(&mut stop).await };
            let served = server
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, signal)
                .await;
            if let Err(error) = served {
                tracing::error!("the coordinator's gRPC server at {local_addr} stopped: {error}");
            }
        });

        // Timeouts and last calls need a clock even when nobody calls.
        let tick = (config.heartbeat_interval / 2)
            .clamp(Duration::from_millis(5), Duration::from_millis(250));
        let (ticking, mut stop) = (shared.clone(), shutdown.subscribe());
        runtime.spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = interval.tick() => ticking.update(|state, now| state.tick(now)),
                    _ = stopped(&mut stop) => break,
                }
            }
        });

        let status_addr = status.map(|(listener, addr)| {
            runtime.spawn(status::serve(
                listener,
                shared.clone(),
                config.status_token.clone(),
                shutdown.subscribe(),
            ));
            addr
        });
        tracing::info!(
            "coordinator listening on {local_addr}{} for {}..{} worker(s), backend {}{}",
            if config.tls.is_some() { " (TLS)" } else { "" },
            config.min_workers,
            config.max_workers,
            config.backend,
            status_addr
                .map(|a| format!(", status page on http://{a}/"))
                .unwrap_or_default()
        );
        Ok(CoordinatorHandle {
            scheme: if config.tls.is_some() {
                "https"
            } else {
                "http"
            },
            local_addr,
            status_addr,
            shared,
            shutdown,
            runtime: owned,
        })
    }
}

/// Resolves once the coordinator is shutting down.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await.
    let _ = shutdown.wait_for(|s| *s).await;
}

fn bind(
    addr: SocketAddr,
    what: &'static str,
) -> Result<(tokio::net::TcpListener, SocketAddr), RuntimeError> {
    let error = |source| RuntimeError::Bind { what, addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(error)?;
    listener.set_nonblocking(true).map_err(error)?;
    let local = listener.local_addr().map_err(error)?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(error)?;
    Ok((listener, local))
}

/// A running coordinator. Dropping it shuts it down.
pub struct CoordinatorHandle {
    /// `https` when serving TLS.
    scheme: &'static str,
    local_addr: SocketAddr,
    status_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl CoordinatorHandle {
    /// Where the gRPC service listens (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The URL for workers on this machine: `http://<addr>` (`https://`
    /// with TLS), with loopback for an unspecified listen address.
    pub fn url(&self) -> String {
        let mut addr = self.local_addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            });
        }
        format!("{}://{addr}", self.scheme)
    }

    /// Where the status page listens, if configured.
    pub fn status_addr(&self) -> Option<SocketAddr> {
        self.status_addr
    }

    /// Tells the coordinator that the worker process `pid` on `host` exited
    /// (`what`: its exit status), e.g. from the launcher that started it:
    /// the group re-forms now instead of after the heartbeat timeout.
    pub fn worker_exited(&self, host: &str, pid: u32, what: &str) {
        self.shared
            .update(|state, now| state.process_exited(host, pid, what, now));
    }

    /// Bounds the workers that can still take part: `Some(n)` when nobody
    /// but the caller's `n` live worker processes can join (a launcher on
    /// loopback, say, whose restarts are what is left), with `why` saying
    /// where more would have come from. A rendezvous that needs more than
    /// that fails at once, naming `min_workers` and who is missing, instead
    /// of waiting out its timeout; one that can grow to `n` gives the
    /// restarted ones a last call. `None`: workers may come from anywhere.
    pub fn limit_workers(&self, supply: Option<WorkerSupply>) {
        self.shared
            .update(|state, now| state.limit_workers(supply, now));
    }

    /// Where the job stands now.
    pub fn status(&self) -> JobStatus {
        self.shared.lock().status(Instant::now())
    }

    /// Blocks until the job ends: `Ok` once every member finished, the
    /// error (restart budget spent, no group formed...) otherwise. It
    /// returns once every live member has been told STOP, so shutting down
    /// right after leaves nobody hanging. Not for async contexts: use
    /// [`CoordinatorHandle::wait_async`] there.
    pub fn wait(&self) -> Result<JobOutcome, RuntimeError> {
        futures::executor::block_on(self.wait_async())
    }

    /// [`CoordinatorHandle::wait`] for async callers.
    pub async fn wait_async(&self) -> Result<JobOutcome, RuntimeError> {
        let mut end = self.shared.end.subscribe();
        let mut shutdown = self.shutdown.subscribe();
        tokio::select! {
            decided = end.wait_for(Option::is_some) => match decided {
                Ok(end) => end.clone().expect("waited for Some").into_result(),
                Err(_) => Err(RuntimeError::Shutdown(self.local_addr)),
            },
            _ = stopped(&mut shutdown) => Err(RuntimeError::Shutdown(self.local_addr)),
        }
    }

    /// Stops serving: waiting joins are answered `Unavailable`, the server
    /// and the status page close.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shutdown.send_replace(true);
        self.shared.lock().shutdown();
        if let Some(saver) = &self.shared.saver {
            saver.lock().unwrap_or_else(|e| e.into_inner()).flush();
        }
        if let Some(runtime) = self.runtime.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                runtime.shutdown_background();
            } else {
                runtime.shutdown_timeout(Duration::from_secs(2));
            }
        }
    }
}

impl Drop for CoordinatorHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for CoordinatorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorHandle")
            .field("local_addr", &self.local_addr)
            .field("status_addr", &self.status_addr)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_token() {
        let config = CoordinatorConfig::new(Token::new("sup3r-s3cret").unwrap(), "x = 1".into());
        let shown = format!("{config:?}");
        assert!(!shown.contains("sup3r-s3cret"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn nonsense_configs_are_refused_naming_the_setting() {
        let base = CoordinatorConfig::new(Token::random(), String::new());
        let mut c = base.clone();
        c.max_workers = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("max_workers")
        );
        let mut c = base.clone();
        c.heartbeat_timeout = c.heartbeat_interval;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("heartbeat_timeout")
        );
        let mut c = base;
        c.min_workers = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("min_workers")
        );
    }
}
