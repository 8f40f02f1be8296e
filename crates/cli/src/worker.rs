//! `dalle worker --coordinator URL`: one training process of a job. It
//! joins the coordinator, builds the collective it is told to (TCP ring or
//! NCCL), runs the stages of the coordinator's plan from where the group
//! starts, data-parallel, reports every step (and every held-out
//! evaluation) in its heartbeats and every finished stage, and at a step
//! (or stage) boundary obeys the coordinator: carry on, stop, or leave the
//! group and join the re-formed one.

use crate::stages;
use anyhow::{Context, Result, bail};
use dalle_collective::{Interrupt, NcclCollective, NcclOptions, RingConfig, TcpRing};
use dalle_runtime::worker::Departure;
use dalle_runtime::{Assignment, ClientTls, Heartbeats, Instruction, JoinInfo, Membership, Token};
use dalle_train::TrainError;
use dalle_train::config::JobConfig;
use dalle_train::ddp::{DEFAULT_BUCKET_BYTES, DataParallel, StepEnd};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct WorkerArgs {
    /// The coordinator, e.g. `http://10.0.0.1:7000`.
    #[arg(long)]
    pub coordinator: String,
    /// The job token (never logged). Prefer the environment or
    /// --token-file: a command line shows in `ps`.
    #[arg(long, env = "DALLE_JOB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the job token from this file (its first line); it wins over
    /// --token and DALLE_JOB_TOKEN.
    #[arg(long)]
    pub token_file: Option<std::path::PathBuf>,
    /// The device this worker drives: `cpu:N`, or `cuda:N` for GPU N.
    #[arg(long, default_value = "cpu:0")]
    pub slot: String,
    /// Where this worker listens for its ring neighbours.
    #[arg(long, default_value = "0.0.0.0:0")]
    pub listen: SocketAddr,
    /// The host name or address other workers reach this one at (default:
    /// 127.0.0.1 when the coordinator is on loopback, else this host's name).
    #[arg(long)]
    pub advertise: Option<String>,
    /// How long to keep trying to join (the coordinator may start later).
    #[arg(long, default_value_t = 600)]
    pub join_timeout_secs: u64,
    /// How long to keep trying a coordinator that stopped answering (it may
    /// be starting again on the same run) before giving up; training waits
    /// at its next step boundary meanwhile. Keep it below the ring's 300 s
    /// I/O timeout, which a peer waiting in a collective is bound by.
    #[arg(long, default_value_t = 180)]
    pub coordinator_grace_secs: u64,
    /// Trust coordinator certificates issued by this CA (PEM; a self-signed
    /// certificate is its own CA). Implies TLS; without it an `https://`
    /// coordinator is checked against the system's roots.
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Check the coordinator's certificate for this name instead of the
    /// URL's host.
    #[arg(long)]
    pub tls_domain: Option<String>,
    /// This worker's own run directory (weights, logs, fetched stage
    /// outputs) instead of the job's `run.dir`: for a machine that does not
    /// share it (set `run.shared_url` and `data.url` then).
    #[arg(long)]
    pub run_dir: Option<std::path::PathBuf>,
}

/// Why a generation of training ended.
enum Ending {
    Finished,
    Reform(String),
}

pub fn run(args: WorkerArgs) -> Result<()> {
    // A slot naming no GPU, or one this process cannot see, fails now, not
    // after the group formed around it.
    let device =
        crate::launch::slots::device_of_slot(&args.slot, &crate::launch::slots::Visible::here())?;
    let listener = TcpListener::bind(args.listen)
        .with_context(|| format!("cannot listen for ring peers on {}", args.listen))?;
    // SIGTERM (preemption): stop at the next step boundary, see
    // crate::node::signals.
    crate::node::signals::install_worker_stop()?;
    let mut info = JoinInfo::this_process(args.slot.clone(), String::new());
    let host = match &args.advertise {
        Some(host) => host.clone(),
        None if args.coordinator.contains("127.0.0.1")
            || args.coordinator.contains("localhost") =>
        {
            "127.0.0.1".into()
        }
        None => info.host.clone(),
    };
    info.data_addr = format!("{host}:{}", listener.local_addr()?.port());
    let Some(token) = Token::given(args.token_file.as_deref(), args.token.as_deref())? else {
        bail!(
            "no job token: set DALLE_JOB_TOKEN or give --token-file (the coordinator's job \
             token; `dalle launch` hands it to the workers it starts)"
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
    let mut membership = Membership::connect(&args.coordinator, &token, info, tls.as_ref())?;
    membership.set_coordinator_grace(Duration::from_secs(args.coordinator_grace_secs));
    let join_timeout = Duration::from_secs(args.join_timeout_secs);
    loop {
        let assignment =
            crate::node::signals::while_idle(|| membership.join(Instant::now() + join_timeout))?;
        let mut job = JobConfig::from_toml(&assignment.job_toml, "the coordinator's job config")?;
        job.run.device = device.clone();
        if let Some(dir) = &args.run_dir {
            job.run.dir = dir.clone();
        }
        // Every line of this generation carries the worker's rank and
        // generation (as fields in JSON logs).
        let _generation = tracing::info_span!(
            "worker",
            rank = assignment.rank,
            generation = assignment.generation
        )
        .entered();
        tracing::info!(
            rank = assignment.rank,
            world = assignment.world_size,
            generation = assignment.generation,
            backend = assignment.backend.as_str(),
            "joined the job"
        );
        let heartbeats = Arc::new(Heartbeats::start(&membership, &assignment));
        let last_step = Arc::new(AtomicU64::new(0));
        let outcome = train_generation(
            &job,
            &membership,
            &assignment,
            &listener,
            heartbeats.clone(),
            last_step.clone(),
        );
        drop(heartbeats);
        let last_step = last_step.load(Ordering::Relaxed);
        if let Some(signal) = crate::node::signals::stop_requested()
            && !matches!(outcome, Ok(Ending::Finished))
        {
            let error = outcome.as_ref().err();
            crate::node::signals::leave_stopped(&membership, &assignment, last_step, signal, error);
        }
        match outcome {
            Ok(Ending::Finished) => {
                // The job may end with this very Leave, and the coordinator
                // go away before its answer arrives: that is no failure.
                if let Err(e) = membership.leave(&assignment, last_step, Departure::Finished) {
                    tracing::warn!("the coordinator did not confirm the finish: {e}");
                }
                tracing::info!("job finished");
                return Ok(());
            }
            Ok(Ending::Reform(reason)) => {
                tracing::warn!(%reason, "leaving the group to join the re-formed one");
                continue;
            }
            Err(e) => {
                let text = format!("{e:#}");
                let _ = membership.leave(&assignment, last_step, Departure::Failed(text.clone()));
                bail!("worker failed: {text}");
            }
        }
    }
}

/// One generation: build the collective, run the plan's stages from where
/// the group starts, and read how it ended from the coordinator's
/// instruction when training stopped early.
fn train_generation(
    job: &JobConfig,
    membership: &Membership,
    assignment: &Assignment,
    listener: &TcpListener,
    heartbeats: Arc<Heartbeats>,
    last_step: Arc<AtomicU64>,
) -> Result<Ending> {
    let plan = stages::from_plan(&assignment.plan)?;
    // A peer that hangs leaves the others blocked in a collective, never at
    // a step boundary: once the coordinator gives up on the group, cut the
    // collective short.
    let interrupt = Interrupt::new();
    let cut = interrupt.clone();
    heartbeats.on_leave_group(move |told| {
        let reason = match told {
            Instruction::Reform { reason } | Instruction::Stop { reason } => reason.clone(),
            Instruction::Continue => return,
        };
        cut.trigger(format!("the coordinator ended this group: {reason}"));
    });
    let mut ddp = match collective(job, assignment, listener, interrupt) {
        Ok(ddp) => ddp,
        // A peer that died (or was dropped) between its Join reply and the
        // formation leaves the others unable to form this ring: that is the
        // group's failure, so join again rather than exit.
        Err(e) => {
            return match heartbeats.instruction() {
                Instruction::Stop { reason } => bail!("the coordinator stopped the job: {reason}"),
                Instruction::Reform { reason } => Ok(Ending::Reform(reason)),
                Instruction::Continue => Ok(Ending::Reform(format!(
                    "the collective of generation {} did not form: {e:#}",
                    assignment.generation
                ))),
            };
        }
    };
    let beats = heartbeats.clone();
    // Memory, model FLOP/s and checkpoint saves, for the coordinator's
    // status and /metrics.
    let mut usage = crate::usage::Sampler::new(&job.run.device);
    ddp = ddp.with_step_hook(Box::new(move |end: &StepEnd| {
        last_step.store(end.step, Ordering::Relaxed);
        beats.report_usage(usage.sample());
        beats.report(dalle_runtime::StepReport {
            step: end.step,
            loss: end.loss,
            samples_per_second: end.samples_per_second,
            data_wait_share: end.data_wait,
        });
        if let Some(why) = crate::node::signals::stop_at_step(end.step) {
            return Err(TrainError::Stopped(why));
        }
        beats.wait_for_coordinator();
        match beats.instruction() {
            Instruction::Continue => Ok(()),
            Instruction::Reform { reason } | Instruction::Stop { reason } => {
                Err(TrainError::Stopped(reason))
            }
        }
    }));
    // Ok(Some(reason)): the group re-formed while this worker ended a stage.
    let run_plan = |ddp: &mut DataParallel| -> Result<Option<String>> {
        for (index, &stage) in plan.iter().enumerate().skip(assignment.first_stage) {
            // Stages without training steps see the coordinator here.
            if let Some(why) = crate::node::signals::stop_before_stage(stage.name()) {
                return Err(TrainError::Stopped(why).into());
            }
            heartbeats.wait_for_coordinator();
            if let Instruction::Reform { reason } | Instruction::Stop { reason } =
                heartbeats.instruction()
            {
                return Err(TrainError::Stopped(reason).into());
            }
            heartbeats.enter_stage(index);
            let _stage = tracing::info_span!("stage", stage = stage.name()).entered();
            let job = &stage_job(job, assignment, index);
            stages::run(stage, job, ddp, &mut |v| heartbeats.report_validation(v))?;
            match membership.stage_done(assignment, index) {
                Ok(_) => {}
                Err(e) if e.is_generation_over() => return Ok(Some(e.to_string())),
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("reporting stage {} done", stage.name()));
                }
            }
        }
        Ok(None)
    };
    if assignment.first_stage > 0 {
        let done: Vec<&str> = plan[..assignment.first_stage.min(plan.len())]
            .iter()
            .map(|s| s.name())
            .collect();
        tracing::info!(
            complete = %done.join(", "),
            "the group starts after stages complete"
        );
    }
    match run_plan(&mut ddp) {
        Ok(None) => Ok(Ending::Finished),
        Ok(Some(reason)) => Ok(Ending::Reform(reason)),
        Err(e) => match heartbeats.instruction() {
            Instruction::Reform { reason } => Ok(Ending::Reform(reason)),
            Instruction::Stop { reason } => bail!("the coordinator stopped the job: {reason}"),
            // A broken collective (a peer died or hung) is the group's
            // failure, not this worker's: join again, which tells the
            // coordinator to re-form the group.
            Instruction::Continue => match e.downcast_ref::<TrainError>() {
                Some(TrainError::Collective(why)) => Ok(Ending::Reform(why.clone())),
                _ => Err(e),
            },
        },
    }
}

/// The job as stage `index` runs it in this generation. The resume policy
/// (`--no-resume`, `--resume-from`) is the job's start: once an earlier
/// generation trained in the stage, every re-formed group resumes the run's
/// newest committed checkpoint of it, never going back to `resume_from` (which
/// would discard newer progress) nor refusing the checkpoints it wrote itself.
fn stage_job(job: &JobConfig, assignment: &Assignment, index: usize) -> JobConfig {
    let mut job = job.clone();
    if index == assignment.first_stage && assignment.first_stage_started {
        job.checkpoint.resume = true;
        job.checkpoint.resume_from = None;
    }
    job
}

/// The collective of this generation: NCCL for GPU slots, else the TCP
/// ring over every member's data address.
fn collective(
    job: &JobConfig,
    assignment: &Assignment,
    listener: &TcpListener,
    interrupt: Interrupt,
) -> Result<DataParallel> {
    let rank = assignment.rank as usize;
    let world = assignment.world_size as usize;
    match assignment.backend {
        dalle_runtime::Backend::Nccl => {
            let id: [u8; 128] = assignment
                .nccl_unique_id
                .as_slice()
                .try_into()
                .context("the coordinator sent no NCCL unique id (128 bytes)")?;
            let ordinal = match dalle_model::device::parse_device(&job.run.device)? {
                tch::Device::Cuda(n) => n,
                other => bail!("NCCL needs a CUDA slot, this worker drives {other:?}"),
            };
            let options = NcclOptions {
                interrupt,
                ..NcclOptions::default()
            };
            let nccl = NcclCollective::with_options(rank, world, &id, ordinal, options)?;
            Ok(DataParallel::nccl(nccl, DEFAULT_BUCKET_BYTES).with_group(group(assignment)))
        }
        dalle_runtime::Backend::TcpRing => {
            let peers: Vec<SocketAddr> = assignment
                .ring_peers
                .iter()
                .map(|p| resolve(p))
                .collect::<Result<_>>()?;
            let config = RingConfig {
                session: session_id(assignment),
                secret: dalle_collective::RingSecret::new(assignment.ring_secret.clone()),
                interrupt,
                ..RingConfig::default()
            };
            let ring = TcpRing::connect(rank, peers, listener.try_clone()?, config)?;
            Ok(DataParallel::new(Box::new(ring), DEFAULT_BUCKET_BYTES)
                .with_overlap(job.run.overlap_reduction)
                .with_group(group(assignment)))
        }
    }
}

/// This generation's place in the job's order of groups (checkpoint
/// writers of older ones are fenced out).
fn group(assignment: &Assignment) -> dalle_store::checkpoint::Fence {
    dalle_store::checkpoint::Fence {
        epoch: assignment.job_epoch,
        generation: assignment.generation,
    }
}

fn resolve(peer: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    peer.to_socket_addrs()
        .with_context(|| format!("ring peer address {peer}"))?
        .next()
        .with_context(|| format!("ring peer address {peer} resolves to nothing"))
}

/// A ring session per job and generation: links of an older group are
/// refused.
fn session_id(assignment: &Assignment) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    assignment.job_toml.hash(&mut h);
    assignment.generation.hash(&mut h);
    h.finish()
}
