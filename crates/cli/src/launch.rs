//! `dalle launch --nproc N`: the whole job on this machine, like torchrun's
//! standalone mode: a coordinator in this process and N `dalle worker`
//! processes (one per GPU, or N CPU slots), which train every stage
//! data-parallel. Workers on other machines can join the same coordinator
//! with `dalle worker --coordinator URL` (listen on a reachable address).

use anyhow::{Context, Result, bail};
use dalle_runtime::{Backend, Coordinator, CoordinatorConfig, Token};
use dalle_train::config::JobConfig;
use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::Duration;

#[derive(clap::Args)]
pub struct LaunchArgs {
    /// Worker processes to start here.
    #[arg(long, default_value_t = 1)]
    pub nproc: u32,
    /// Workers needed to start (default: nproc).
    #[arg(long)]
    pub min_workers: Option<u32>,
    /// Workers taken at most (default: nproc); more may join from elsewhere.
    #[arg(long)]
    pub max_workers: Option<u32>,
    /// The coordinator's gRPC address (0.0.0.0:PORT to take remote workers).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
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
}

pub fn run(args: LaunchArgs, job: &JobConfig) -> Result<()> {
    if args.nproc == 0 {
        bail!("--nproc must be at least 1");
    }
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
    if backend == Backend::TcpRing && job.run.threads == 0 {
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
        min_workers: args.min_workers.unwrap_or(args.nproc),
        max_workers: args.max_workers.unwrap_or(args.nproc),
        heartbeat_interval: timeout / 5,
        heartbeat_timeout: timeout,
        max_restarts: args.max_restarts,
        backend,
        status_listen: args.status,
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
    let mut workers: Vec<Child> = (0..args.nproc)
        .map(|i| {
            Command::new(&exe)
                .arg("worker")
                .arg("--coordinator")
                .arg(coordinator.url())
                .arg("--slot")
                .arg(format!("{slot}:{i}"))
                .env("DALLE_JOB_TOKEN", token.expose())
                .spawn()
                .with_context(|| format!("cannot start worker {i}"))
        })
        .collect::<Result<_>>()?;
    let outcome = coordinator.wait();
    // Workers exit after their last answer from the coordinator: keep it
    // serving until they have.
    for (i, worker) in workers.iter_mut().enumerate() {
        match outcome {
            Ok(_) => {
                let status = worker.wait()?;
                if !status.success() {
                    tracing::warn!(worker = i, %status, "worker exited with an error");
                }
            }
            Err(_) => {
                let _ = worker.kill();
                let _ = worker.wait();
            }
        }
    }
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
