//! `dalle node --coordinator URL (--gpus N | --nproc N)`: the agent of one
//! machine of a job, the one process a cluster's per-node script (Slurm's
//! `srun`, a Kubernetes pod) runs, like torchrun's elastic agent. It starts
//! one `dalle worker` per local slot (worker i on GPU i, or CPU slot i),
//! forwards their output line by line under `[worker i]`, tells the
//! coordinator at once when one exits (so the group re-forms without
//! waiting out the heartbeat timeout) and starts it again within
//! `--max-restarts`.
//!
//! SIGTERM (preemption) is a graceful stop: the workers are told to stop
//! (SIGTERM) and none is restarted; each finishes its step, saves the
//! checkpoint due there, leaves the coordinator saying why and exits 75.
//! The node exits once they all have: 0 when they finished the job, 75
//! ([`signals::STOPPED`]) when every one stopped at a step boundary, 1 when
//! some had to be killed (a second signal, or still running
//! `--stop-grace-secs` after the first) or the restarts ran out.

pub(crate) mod signals;

use crate::launch::slots;
use crate::launch::workers::{LocalWorkers, Stop, WorkerCommand};
use anyhow::{Context, Result, bail};
use dalle_runtime::{ClientTls, JoinInfo, Membership, Token};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct NodeArgs {
    /// The coordinator, e.g. `http://10.0.0.1:29500` (`https://` with TLS).
    #[arg(long)]
    pub coordinator: String,
    #[command(flatten)]
    pub workers: Workers,
    /// The host name or address the other machines reach this one's workers
    /// at (default: 127.0.0.1 when the coordinator is on loopback, else
    /// this host's name).
    #[arg(long)]
    pub advertise: Option<String>,
    /// The job token, handed to the workers through their environment.
    /// Prefer the environment or --token-file: a command line shows in `ps`.
    #[arg(long, env = "DALLE_JOB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the job token from this file (its first line); it wins over
    /// --token and DALLE_JOB_TOKEN.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Trust coordinator certificates issued by this CA (PEM; a
    /// self-signed certificate is its own CA). Implies TLS.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Check the coordinator's certificate for this name instead of the
    /// URL's host.
    #[arg(long)]
    pub tls_domain: Option<String>,
    /// The workers' own run directory instead of the job's `run.dir`, for
    /// a machine that does not share it (see `dalle worker --run-dir`).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Local workers started again at most, in all, after they died.
    #[arg(long, default_value_t = 3)]
    pub max_restarts: u32,
    /// After SIGTERM, workers still running this long are killed.
    #[arg(long, default_value_t = 60)]
    pub stop_grace_secs: u64,
}

/// How many workers, on what: one of the two.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
pub struct Workers {
    /// Workers on this machine's GPUs: worker i drives GPU i (of those
    /// visible, see CUDA_VISIBLE_DEVICES).
    #[arg(long)]
    pub gpus: Option<u32>,
    /// Workers on the CPU: worker i drives CPU slot i. Their threads come
    /// from the job's `run.threads` (0: each takes every core).
    #[arg(long)]
    pub nproc: Option<u32>,
}

pub fn run(args: NodeArgs) -> Result<()> {
    // Handled from the start: a stop before the workers run stops them too.
    let signals = signals::AgentSignals::install()?;
    let slots = match (args.workers.gpus, args.workers.nproc) {
        (Some(gpus), _) => slots::local_slots("cuda", gpus, &slots::Visible::here())?,
        (None, Some(cpus)) => {
            let no_gpus = slots::Visible {
                count: 0,
                restricted_to: None,
            };
            slots::local_slots("cpu", cpus, &no_gpus)?
        }
        (None, None) => bail!("say how many workers to run: --gpus N or --nproc N"),
    };
    if slots.is_empty() {
        bail!("a node runs at least one worker: give --gpus or --nproc of 1 or more");
    }
    let Some(token) = Token::given(args.token_file.as_deref(), args.token.as_deref())? else {
        bail!(
            "no job token: set DALLE_JOB_TOKEN or give --token-file (the coordinator's job token)"
        );
    };
    let tls = if args.tls_ca.is_some() || args.tls_domain.is_some() {
        let trust = match &args.tls_ca {
            Some(ca) => ClientTls::from_ca_file(ca)?,
            None => ClientTls::system_roots(),
        };
        Some(match &args.tls_domain {
            Some(domain) => trust.domain(domain.clone()),
            None => trust,
        })
    } else {
        None
    };
    // The node's own line to the coordinator, for its workers' exits: the
    // host is the kernel's host name, as in its workers' Joins.
    let membership = Membership::connect(
        &args.coordinator,
        &token,
        JoinInfo::this_process("node", ""),
        tls.as_ref(),
    )?;
    let mut extra = Vec::new();
    if let Some(dir) = &args.run_dir {
        extra.push("--run-dir".into());
        extra.push(dir.clone().into_os_string());
    }
    let n = slots.len() as u32;
    let command = WorkerCommand {
        exe: std::env::current_exe().context("cannot find the dalle executable")?,
        coordinator: args.coordinator.clone(),
        slots,
        advertise: args.advertise.clone(),
        token: token.expose().to_string(),
        tls_ca: args.tls_ca.clone(),
        tls_domain: args.tls_domain.clone(),
        extra,
    };
    let mut stop = Stop::new(signals, Duration::from_secs(args.stop_grace_secs));
    let mut workers = LocalWorkers::start(command, n, args.max_restarts)?;
    tracing::info!(
        coordinator = %args.coordinator,
        workers = n,
        host = %JoinInfo::this_process("node", "").host,
        "node started"
    );
    let ended = supervise(&membership, &mut workers, &mut stop);
    workers.reap(Duration::ZERO);
    match ended {
        Ok(Ended::Finished) => {
            tracing::info!("every worker finished the job");
            Ok(())
        }
        Ok(Ended::Stopped) => {
            let stopped = stop.stopped();
            tracing::warn!("{stopped}");
            std::process::exit(stopped.code());
        }
        Err(e) => Err(e),
    }
}

enum Ended {
    /// Every worker's last exit was a success: the job finished.
    Finished,
    /// A signal stopped the node (see [`Stop::stopped`]).
    Stopped,
}

/// Runs until every worker exited for good: each exit but a success is
/// reported to the coordinator at once, and a failed worker is started again while the
/// budget lasts, unless the job finished (a worker succeeded) or the node
/// is stopping.
fn supervise(
    membership: &Membership,
    workers: &mut LocalWorkers,
    stop: &mut Stop,
) -> Result<Ended> {
    let mut finished = false;
    let mut given_up = None;
    loop {
        let stopping = stop.tick(workers);
        for exit in workers.poll() {
            let what = exit.status.to_string();
            tracing::info!(
                worker = exit.local_rank,
                pid = exit.pid,
                "worker {} (pid {}) exited: {what}",
                exit.local_rank,
                exit.pid
            );
            // A worker that succeeded left as finished, and the job (and
            // its coordinator) may be over: nothing to tell.
            if !exit.status.success()
                && let Err(e) = membership.report_exit(exit.pid, &what)
            {
                tracing::warn!("could not report the exit (the heartbeat timeout will): {e}");
            }
            if stopping {
                stop.saw_exit(&exit.status);
                continue;
            }
            // Success means the job finished: nothing to redo after it.
            if exit.status.success() {
                finished = true;
                continue;
            }
            if finished {
                continue;
            }
            match workers.restart(exit.local_rank) {
                Ok(true) => {}
                Ok(false) => {
                    let (done, max) = workers.restarts();
                    let why = format!(
                        "worker {} exited ({what}) and is not restarted: {done} of \
                         --max-restarts {max} spent",
                        exit.local_rank
                    );
                    tracing::error!(worker = exit.local_rank, "{why}");
                    given_up = Some(why);
                }
                Err(e) => {
                    tracing::error!(worker = exit.local_rank, "{e:#}");
                    given_up = Some(format!("{e:#}"));
                }
            }
        }
        if workers.live() == 0 {
            if stopping {
                return Ok(Ended::Stopped);
            }
            return match given_up {
                Some(why) if !finished => bail!("{why}"),
                _ => Ok(Ended::Finished),
            };
        }
        // Child exits and signals come from different places; a short
        // poll covers both.
        std::thread::sleep(Duration::from_millis(100));
    }
}
