//! SIGTERM (and SIGINT) as a graceful stop, for preemption on Slurm and
//! Kubernetes, which send SIGTERM and kill a while later.
//!
//! A worker ([`install_worker_stop`]) that is told to stop finishes the
//! step it is in, saves the checkpoint that step is due (the checkpoint is
//! saved before the step hook runs, and the stage's checkpointer finishes
//! its upload when it is dropped), leaves the coordinator saying why, and
//! exits with [`STOPPED`]. One waiting for its group, with nothing to lose,
//! exits at once. Repeated SIGTERMs change nothing (under Slurm a worker
//! hears the one Slurm sends every process of the step and the one its
//! node agent forwards); a SIGINT once stopping exits at once (130), for a
//! person pressing Ctrl-C twice.
//!
//! An agent (`dalle node`, `dalle launch`: [`AgentSignals`]) forwards the
//! first SIGTERM or SIGINT to its workers as SIGTERM and restarts none of
//! them; a second one kills them.

use anyhow::{Context, Result};
use dalle_runtime::worker::Departure;
use dalle_runtime::{Assignment, Membership};
use signal_hook::consts::{SIGINT, SIGTERM};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The exit status of a process that stopped because it was told to (a
/// worker at a step boundary, an agent whose workers all did): the job is
/// not over and resumes from its checkpoints. 75 is `EX_TEMPFAIL` ("try
/// again later"): a Kubernetes `podFailurePolicy` can match it.
pub const STOPPED: i32 = 75;

/// The name of a termination signal, for messages.
pub fn name(signal: usize) -> &'static str {
    match signal as i32 {
        SIGTERM => "SIGTERM",
        SIGINT => "SIGINT",
        _ => "a signal",
    }
}

/// The signal that asked this worker to stop (0: none yet).
static WORKER_STOP: AtomicUsize = AtomicUsize::new(0);
/// Whether the worker is between joins (idle: waiting for a group, nothing
/// to save), where a stop exits at once.
static WORKER_IDLE: Mutex<bool> = Mutex::new(true);
static INSTALLED: OnceLock<()> = OnceLock::new();

/// Installs the worker's handlers (once): see the module's documentation.
pub fn install_worker_stop() -> Result<()> {
    if INSTALLED.get().is_some() {
        return Ok(());
    }
    for signal in [SIGTERM, SIGINT] {
        let action = move || {
            // Only atomics and _exit here: this runs in the signal handler.
            let before = WORKER_STOP
                .compare_exchange(0, signal as usize, Ordering::SeqCst, Ordering::SeqCst)
                .err();
            if before.is_some() && signal == SIGINT {
                signal_hook::low_level::exit(130);
            }
        };
        // SAFETY: the action only touches atomics and calls _exit, both
        // async-signal-safe.
        unsafe { signal_hook::low_level::register(signal, action) }
            .with_context(|| format!("cannot handle {}", name(signal as usize)))?;
    }
    std::thread::Builder::new()
        .name("stop-watch".into())
        .spawn(|| {
            loop {
                std::thread::sleep(Duration::from_millis(50));
                let Some(signal) = stop_requested() else {
                    continue;
                };
                let idle = WORKER_IDLE.lock().unwrap_or_else(|e| e.into_inner());
                if *idle {
                    tracing::warn!("{signal}: not in a group, nothing to save: exiting");
                    // Holding the lock: the worker cannot start training now.
                    std::process::exit(STOPPED);
                }
            }
        })
        .context("cannot start the stop watcher")?;
    let _ = INSTALLED.set(());
    Ok(())
}

/// The signal that asked this worker to stop, once one did.
pub fn stop_requested() -> Option<&'static str> {
    match WORKER_STOP.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(name(signal)),
    }
}

/// Runs `join` (waiting for a group) as idle time: a stop asked meanwhile
/// exits at once. Once it returns, a stop waits for a step boundary.
pub fn while_idle<T>(join: impl FnOnce() -> T) -> T {
    *WORKER_IDLE.lock().unwrap_or_else(|e| e.into_inner()) = true;
    let joined = join();
    *WORKER_IDLE.lock().unwrap_or_else(|e| e.into_inner()) = false;
    joined
}

/// The step hook's check: `Some(reason)` to stop training after step
/// `step` (its due checkpoint is saved already).
pub fn stop_at_step(step: u64) -> Option<String> {
    let signal = stop_requested()?;
    tracing::warn!(
        step,
        "{signal}: stopping at this step boundary (after its checkpoint, if one was due)"
    );
    Some(format!(
        "{signal}: stopped at the boundary after step {step}"
    ))
}

/// The stage loop's check, before each stage (stages without steps stop
/// only between stages).
pub fn stop_before_stage(stage: &str) -> Option<String> {
    let signal = stop_requested()?;
    tracing::warn!(stage, "{signal}: stopping before this stage");
    Some(format!("{signal}: stopped before stage {stage}"))
}

/// The end of a worker told to stop, once its training ended (whatever the
/// ending: its peers may have left first): leaves the coordinator saying
/// why, and exits with [`STOPPED`]. The stage's checkpointer finished its
/// upload when training returned.
pub fn leave_stopped(
    membership: &Membership,
    assignment: &Assignment,
    last_step: u64,
    signal: &str,
    training: Option<&anyhow::Error>,
) -> ! {
    if let Some(e) = training {
        tracing::debug!("training ended: {e:#}");
    }
    let why = format!(
        "stopped by {signal} (preemption or a stop of its node) at step {last_step}, after the \
         checkpoint that step was due; the job resumes from its checkpoints"
    );
    if let Err(e) = membership.leave(assignment, last_step, Departure::Stopped(why.clone())) {
        tracing::warn!("the coordinator did not hear the stop: {e}");
    }
    tracing::warn!("{why}: exiting with status {STOPPED}");
    std::process::exit(STOPPED);
}

/// An agent's termination signals: how many came, and the first.
#[derive(Clone)]
pub struct AgentSignals {
    count: Arc<AtomicUsize>,
    first: Arc<AtomicUsize>,
}

impl AgentSignals {
    /// Counts SIGTERM and SIGINT from now on (instead of dying of them).
    pub fn install() -> Result<Self> {
        let signals = AgentSignals {
            count: Arc::default(),
            first: Arc::default(),
        };
        for signal in [SIGTERM, SIGINT] {
            let (count, first) = (signals.count.clone(), signals.first.clone());
            let action = move || {
                let _ =
                    first.compare_exchange(0, signal as usize, Ordering::SeqCst, Ordering::SeqCst);
                count.fetch_add(1, Ordering::SeqCst);
            };
            // SAFETY: the action only touches atomics.
            unsafe { signal_hook::low_level::register(signal, action) }
                .with_context(|| format!("cannot handle {}", name(signal as usize)))?;
        }
        Ok(signals)
    }

    /// Termination signals received so far.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// The first one's name.
    pub fn first(&self) -> &'static str {
        name(self.first.load(Ordering::SeqCst))
    }
}
