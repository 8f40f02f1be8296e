//! `dalle launch --nproc N`: the whole job on this machine, like torchrun's
//! standalone mode: a coordinator in this process and N `dalle worker`
//! processes (one per GPU, or N CPU slots), which train every stage
//! data-parallel. Workers on other machines can join the same coordinator
//! with `dalle worker --coordinator URL` (listen on a reachable address);
//! `--nproc 0` runs the coordinator alone, for a job whose workers all run
//! elsewhere (one `dalle worker` per GPU on every node).

use anyhow::{Context, Result, bail};
use dalle_runtime::coordinator::JobPhase;
use dalle_runtime::{
    Backend, Coordinator, CoordinatorConfig, CoordinatorHandle, JobOutcome, Token,
};
use dalle_train::config::JobConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

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
    /// Group re-formations allowed before the job fails.
    #[arg(long, default_value_t = 3)]
    pub max_restarts: u32,
    /// Silence after which a worker is dropped.
    #[arg(long, default_value_t = 30)]
    pub heartbeat_timeout_secs: u64,
    /// The job token workers must present (default: a random one, handed
    /// to the local workers through their environment).
    #[arg(long, env = "DALLE_JOB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
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
    let mut job = job.clone();
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
    if backend == Backend::TcpRing && job.run.threads == 0 && args.nproc > 0 {
        // Workers share the machine's cores instead of each taking them all.
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        job.run.threads = (cores / args.nproc as usize).max(1);
    }
    prepare_synthetic_data(&job)?;

    let token = match &args.token {
        Some(t) => Token::new(t.clone())?,
        None => Token::random(),
    };
    let timeout = Duration::from_secs(args.heartbeat_timeout_secs.max(2));
    let config = CoordinatorConfig {
        listen: args.listen,
        min_workers,
        max_workers,
        heartbeat_interval: timeout / 5,
        heartbeat_timeout: timeout,
        max_restarts: args.max_restarts,
        backend,
        status_listen: args.status,
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(dalle_runtime::ServerTls::from_files(cert, key)?),
            _ => None,
        },
        plan: crate::stages::plan(&job),
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
    let exe = std::env::current_exe().context("cannot find the dalle executable")?;
    let advertise = match &args.advertise {
        Some(host) => host.clone(),
        None if args.listen.ip().is_loopback() => "127.0.0.1".into(),
        None => dalle_runtime::JoinInfo::this_process("", "").host,
    };
    let mut workers: Vec<Child> = (0..args.nproc)
        .map(|i| {
            let mut worker = Command::new(&exe);
            worker
                .arg("worker")
                .arg("--coordinator")
                .arg(coordinator.url())
                .arg("--slot")
                .arg(format!("{slot}:{i}"))
                .arg("--advertise")
                .arg(&advertise)
                .env("DALLE_JOB_TOKEN", token.expose());
            if let Some(ca) = args.tls_ca.as_ref().or(args.tls_cert.as_ref()) {
                worker.arg("--tls-ca").arg(ca);
            }
            if let Some(domain) = &args.tls_domain {
                worker.arg("--tls-domain").arg(domain);
            }
            worker
                .spawn()
                .with_context(|| format!("cannot start worker {i}"))
        })
        .collect::<Result<_>>()?;
    let host = dalle_runtime::JoinInfo::this_process("", "").host;
    let outcome = supervise(&coordinator, &mut workers, &host);
    // Workers exit after their last answer from the coordinator: keep it
    // serving until they have. One that was dropped as hung may never exit.
    let grace = match outcome {
        Ok(_) => timeout * 2,
        Err(_) => Duration::ZERO,
    };
    reap(&mut workers, grace)?;
    coordinator.shutdown();
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
/// every local worker exited (each failed) and no group runs or waits.
/// A worker that exits is reported to the coordinator at once (the group
/// re-forms without waiting out its heartbeat timeout).
fn supervise(
    coordinator: &CoordinatorHandle,
    workers: &mut [Child],
    host: &str,
) -> Result<JobOutcome> {
    let mut reported = vec![false; workers.len()];
    loop {
        let status = coordinator.status();
        if matches!(status.phase, JobPhase::Finished | JobPhase::Failed) {
            return Ok(coordinator.wait()?);
        }
        for (worker, reported) in workers.iter_mut().zip(reported.iter_mut()) {
            if let (false, Ok(Some(exit))) = (*reported, worker.try_wait()) {
                *reported = true;
                coordinator.worker_exited(host, worker.id(), &exit.to_string());
            }
        }
        let exited = !workers.is_empty() && reported.iter().all(|&r| r);
        if exited && status.world_size == 0 && status.waiting.is_empty() {
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

/// Waits up to `grace` for the local workers to exit, then kills the rest
/// (a worker the coordinator dropped as hung, say).
fn reap(workers: &mut [Child], grace: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + grace;
    for (i, worker) in workers.iter_mut().enumerate() {
        loop {
            if let Some(status) = worker.try_wait()? {
                if !status.success() {
                    tracing::warn!(worker = i, %status, "worker exited with an error");
                }
                break;
            }
            if std::time::Instant::now() >= deadline {
                if !grace.is_zero() {
                    tracing::warn!(
                        worker = i,
                        pid = worker.id(),
                        "worker still running {} s after the job ended: killing it",
                        grace.as_secs()
                    );
                }
                let _ = worker.kill();
                let _ = worker.wait();
                break;
            }
            // Child exits are not awaitable here without a signal handler.
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
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
