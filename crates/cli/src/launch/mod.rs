//! `dalle launch --nproc N`: the whole job on this machine, like torchrun's
//! standalone mode: a coordinator in this process and N `dalle worker`
//! processes (one per GPU, or N CPU slots), which train every stage
//! data-parallel. Workers on other machines can join the same coordinator
//! with `dalle worker --coordinator URL` (listen on a reachable address);
//! `--nproc 0` runs the coordinator alone, for a job whose workers all run
//! elsewhere (one `dalle worker` per GPU on every node).

mod job_state;
pub(crate) mod slots;
pub(crate) mod workers;

use anyhow::{Context, Result, bail};
use dalle_runtime::coordinator::JobPhase;
use dalle_runtime::{
    Backend, Coordinator, CoordinatorConfig, CoordinatorHandle, JobOutcome, Token, WorkerSupply,
};
use dalle_train::config::JobConfig;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use workers::LocalWorkers;

#[derive(clap::Args)]
pub struct LaunchArgs {
    /// Worker processes to start here (0: the coordinator alone; give
    /// --min-workers).
    #[arg(long, default_value_t = 1)]
    pub nproc: u32,
    /// Workers needed to start (default: nproc).
    #[arg(long)]
    pub min_workers: Option<u32>,
    /// Workers taken at most (default: nproc, or min-workers when more);
    /// more may join from elsewhere.
    #[arg(long)]
    pub max_workers: Option<u32>,
    /// The coordinator's gRPC address (0.0.0.0:PORT to take remote workers).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// The address workers on other machines reach this machine's workers
    /// at (their ring links); default: 127.0.0.1 when --listen is on
    /// loopback, else this host's name.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Serve the job's status page and Prometheus metrics here.
    #[arg(long)]
    pub status: Option<SocketAddr>,
    /// Group re-formations allowed before the job fails; also the local
    /// workers restarted at most (one that dies is started again, so that
    /// the group re-forms at full size).
    #[arg(long, default_value_t = 3)]
    pub max_restarts: u32,
    /// Silence after which a worker is dropped.
    #[arg(long, default_value_t = 30)]
    pub heartbeat_timeout_secs: u64,
    /// A worker whose training step stands still this long is dropped as
    /// hung, heartbeats or not (0: never). It must cover the slowest step
    /// with a checkpoint save and a held-out evaluation; a stage's first
    /// step (loading, resuming) and stages without steps are not timed.
    #[arg(long, default_value_t = 600)]
    pub progress_timeout_secs: u64,
    /// The job token workers must present (default: a random one, handed
    /// to the local workers through their environment). Prefer the
    /// environment or --token-file: a command line shows in `ps`.
    #[arg(long, env = "DALLE_JOB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the job token from this file (its first line); it wins over
    /// --token and DALLE_JOB_TOKEN.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Serve the status page and /metrics only to requests carrying
    /// `Authorization: Bearer <token>`, the token being this file's first
    /// line (Prometheus: `authorization: {credentials_file: …}`).
    #[arg(long, requires = "status")]
    pub status_token_file: Option<PathBuf>,
    /// Serve the coordinator over TLS with this certificate chain (PEM);
    /// needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The CA the local workers trust (default: --tls-cert itself, right
    /// for a self-signed certificate).
    #[arg(long, requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// The name the local workers check the certificate for (default: the
    /// host of the coordinator's URL, 127.0.0.1).
    #[arg(long, requires = "tls_cert")]
    pub tls_domain: Option<String>,
    /// Start even if `dalle plan` says a stage does not fit this machine's
    /// devices.
    #[arg(long)]
    pub no_plan_check: bool,
    /// On SIGTERM (or SIGINT) the local workers stop at their next step
    /// boundary and launch exits 75 once they have; those still running
    /// this long after are killed (exit 1). A second signal kills at once.
    #[arg(long, default_value_t = 60)]
    pub stop_grace_secs: u64,
}

pub fn run(args: LaunchArgs, job: &JobConfig) -> Result<()> {
    if args.nproc == 0 && args.min_workers.is_none() {
        bail!(
            "--nproc 0 runs the coordinator alone: say how many workers it waits for with \
             --min-workers"
        );
    }
    let min_workers = args.min_workers.unwrap_or(args.nproc);
    let max_workers = args.max_workers.unwrap_or(args.nproc.max(min_workers));
    if args.nproc > 0 && !args.no_plan_check {
        // The smallest group the job may run as: the most each rank holds.
        crate::plan::check_launch(job, min_workers.max(1) as usize, args.nproc as usize)?;
    }
    let device = dalle_model::device::parse_device(&job.run.device)?;
    let slot = match device {
        tch::Device::Cuda(_) => "cuda",
        _ => "cpu",
    };
    let backend = match (job.run.backend.as_str(), slot) {
        ("nccl", "cpu") => bail!("run.backend = \"nccl\" needs run.device = cuda"),
        ("nccl", _) | ("auto", "cuda") => Backend::Nccl,
        _ => Backend::TcpRing,
    };
    prepare_synthetic_data(job)?;

    let token = Token::given(args.token_file.as_deref(), args.token.as_deref())?
        .unwrap_or_else(Token::random);
    if !args.listen.ip().is_loopback() && args.tls_cert.is_none() {
        tracing::warn!(
            listen = %args.listen,
            "the coordinator listens beyond this machine without TLS: the job token and the \
             ring secrets cross the network in cleartext (give --tls-cert and --tls-key, or \
             keep --listen on a network you trust)"
        );
    }
    let timeout = Duration::from_secs(args.heartbeat_timeout_secs.max(2));
    let config = CoordinatorConfig {
        listen: args.listen,
        min_workers,
        max_workers,
        heartbeat_interval: timeout / 5,
        heartbeat_timeout: timeout,
        progress_timeout: (args.progress_timeout_secs > 0)
            .then(|| Duration::from_secs(args.progress_timeout_secs)),
        max_restarts: args.max_restarts,
        backend,
        status_listen: args.status,
        status_token: args
            .status_token_file
            .as_deref()
            .map(Token::from_file)
            .transpose()?,
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(dalle_runtime::ServerTls::from_files(cert, key)?),
            _ => None,
        },
        plan: crate::stages::plan(job),
        state_store: Some(dalle_runtime::StateStore(std::sync::Arc::new(
            job_state::RunJobState::of(job)?,
        ))),
        // A job started again resumes the one saved there, unless told to
        // start over.
        take_over: job.checkpoint.resume && job.checkpoint.resume_from.is_none(),
        ..CoordinatorConfig::new(token.clone(), job.to_toml())
    };
    let coordinator = Coordinator::start(config, move |_generation| match backend {
        Backend::Nccl => dalle_collective::nccl_unique_id()
            .map(|id| id.to_vec())
            .map_err(|e| e.to_string()),
        Backend::TcpRing => Ok(Vec::new()),
    })?;
    tracing::info!(
        coordinator = %coordinator.url(), status = ?coordinator.status_addr(),
        workers = args.nproc, backend = backend.as_str(), "job started"
    );
    let command = workers::WorkerCommand {
        exe: std::env::current_exe().context("cannot find the dalle executable")?,
        coordinator: coordinator.url(),
        slots: slots::local_slots(&job.run.device, args.nproc, &slots::Visible::here())?,
        advertise: Some(match &args.advertise {
            Some(host) => host.clone(),
            None if args.listen.ip().is_loopback() => "127.0.0.1".into(),
            None => dalle_runtime::JoinInfo::this_process("", "").host,
        }),
        token: token.expose().to_string(),
        tls_ca: args.tls_ca.clone().or(args.tls_cert.clone()),
        tls_domain: args.tls_domain.clone(),
        extra: Vec::new(),
    };
    // SIGTERM (preemption) stops the workers at a step boundary.
    let mut stop = workers::Stop::new(
        crate::node::signals::AgentSignals::install()?,
        Duration::from_secs(args.stop_grace_secs),
    );
    let mut workers = LocalWorkers::start(command, args.nproc, args.max_restarts)?;
    // On loopback nobody else can join: once the restarts are spent, a
    // group too small for min_workers fails at once instead of waiting.
    let only_local = args.listen.ip().is_loopback() && args.nproc > 0 && max_workers <= args.nproc;
    let host = dalle_runtime::JoinInfo::this_process("", "").host;
    let outcome = supervise(
        &coordinator,
        &mut workers,
        &host,
        only_local,
        timeout,
        &mut stop,
    );
    // Workers exit after their last answer from the coordinator: keep it
    // serving until they have. One that was dropped as hung may never exit.
    let grace = match outcome {
        Ok(_) => timeout * 2,
        Err(_) => Duration::ZERO,
    };
    workers.reap(grace);
    coordinator.shutdown();
    if let Err(e) = &outcome
        && let Some(stopped) = e.downcast_ref::<workers::Stopped>()
    {
        // The coordinator's state stays on the run, not ended: a launch
        // started again on it takes the job over.
        tracing::warn!("{stopped}; the job resumes when started again");
        std::process::exit(stopped.code());
    }
    let outcome = outcome?;
    println!(
        "job finished at step {} with {} workers (generation {}, {} restarts); run directory {}",
        outcome.final_step,
        outcome.world_size,
        outcome.generation,
        outcome.restarts,
        job.run.dir.display()
    );
    Ok(())
}

/// Waits for the job's end, or for the moment nobody is left to run it:
/// every local worker exited and no group runs or waits. A worker that
/// exits is reported to the coordinator at once (the group re-forms without
/// waiting out its heartbeat timeout) and, while the job goes on, started
/// again within the restart budget so that the group re-forms at full size.
/// Once `stop` is asked, none is restarted, and it ends (with
/// [`workers::Stopped`]) when they all exited.
fn supervise(
    coordinator: &CoordinatorHandle,
    workers: &mut LocalWorkers,
    host: &str,
    only_local: bool,
    grace: Duration,
    stop: &mut workers::Stop,
) -> Result<JobOutcome> {
    let mut told_supply = None;
    let mut dropped: HashMap<u32, Instant> = HashMap::new();
    loop {
        let status = coordinator.status();
        if is_over(status.phase) {
            return Ok(coordinator.wait()?);
        }
        kill_the_dropped(&status, workers, host, grace, &mut dropped);
        let stopping = stop.tick(workers);
        for exit in workers.poll() {
            let what = exit.status.to_string();
            coordinator.worker_exited(host, exit.pid, &what);
            if stopping {
                stop.saw_exit(&exit.status);
                continue;
            }
            // Success means the job finished; after its end, nothing to redo.
            if exit.status.success() || is_over(coordinator.status().phase) {
                continue;
            }
            match workers.restart(exit.local_rank) {
                Ok(true) => {}
                Ok(false) => {
                    let (done, max) = workers.restarts();
                    tracing::error!(
                        worker = exit.local_rank,
                        "worker {} exited ({what}) and is not restarted: {done} of --max-restarts \
                         {max} spent",
                        exit.local_rank
                    );
                }
                Err(e) => tracing::error!(worker = exit.local_rank, "{e:#}"),
            }
        }
        if stopping {
            if workers.live() == 0 {
                return Err(stop.stopped().into());
            }
        } else if only_local {
            let (done, max) = workers.restarts();
            let supply = WorkerSupply {
                live: workers.live(),
                why: format!(
                    "launch has restarted {done} of --max-restarts {max} worker(s) and nobody else \
                     can join a coordinator on loopback"
                ),
            };
            if told_supply.as_ref() != Some(&supply) {
                coordinator.limit_workers(Some(supply.clone()));
                told_supply = Some(supply);
            }
        }
        if !workers.is_empty()
            && workers.live() == 0
            && status.world_size == 0
            && status.waiting.is_empty()
        {
            bail!(
                "every local worker exited and no group is running or forming; last failure: {}",
                status.reason.as_deref().unwrap_or("none reported")
            );
        }
        // The coordinator's end and child exits come from different
        // places; a short poll covers both.
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A local worker the coordinator dropped (hung: silent, or heartbeating
/// without progress) that still runs after `grace` is killed, so that its
/// exit frees its slot for a restart; otherwise a group that needs it could
/// never re-form at full size. `dropped`: when each was first seen dropped.
fn kill_the_dropped(
    status: &dalle_runtime::JobStatus,
    workers: &mut LocalWorkers,
    host: &str,
    grace: Duration,
    dropped: &mut HashMap<u32, Instant>,
) {
    for member in &status.workers {
        if member.state == "failed" && member.host == host && workers.runs(member.pid) {
            dropped.entry(member.pid).or_insert_with(Instant::now);
        }
    }
    dropped.retain(|&pid, since| {
        if !workers.runs(pid) {
            return false;
        }
        if since.elapsed() > grace {
            tracing::warn!(
                pid,
                "worker pid {pid} was dropped from the group but still runs {} s later: \
                 killing it",
                since.elapsed().as_secs()
            );
            workers.kill(pid);
        }
        true
    });
}

fn is_over(phase: JobPhase) -> bool {
    matches!(phase, JobPhase::Finished | JobPhase::Failed)
}

/// The embedded defaults train on the synthetic shapes under the run
/// directory: write them first when they are not there yet.
fn prepare_synthetic_data(job: &JobConfig) -> Result<()> {
    if job.data.url.is_some() {
        return Ok(());
    }
    let dir = job.data_dir()?;
    let has_parquet = std::fs::read_dir(&dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.path().extension().is_some_and(|x| x == "parquet"))
    });
    if !has_parquet {
        tracing::info!(dir = %dir.display(), "writing the synthetic dataset (data.url is not set)");
        dalle_data::synth::write_dataset(&dir, &job.synth, |_| {})?;
    }
    Ok(())
}
