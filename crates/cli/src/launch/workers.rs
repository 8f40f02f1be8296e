//! The worker processes `dalle launch` and `dalle node` run on this
//! machine: starting them, forwarding their output line by line under their
//! local rank, restarting one that dies, like torchrun's agent, within
//! `--max-restarts`, and passing a stop (SIGTERM) on to them.

use anyhow::{Context, Result};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::node::signals::{AgentSignals, STOPPED};

/// How to start one worker: everything but its local rank.
pub struct WorkerCommand {
    pub exe: PathBuf,
    pub coordinator: String,
    /// The `--slot` of each local rank (see [`super::slots`]).
    pub slots: Vec<String>,
    /// Their `--advertise` (default: the worker's own choice).
    pub advertise: Option<String>,
    pub token: String,
    pub tls_ca: Option<PathBuf>,
    pub tls_domain: Option<String>,
    /// More arguments of `dalle worker` (e.g. `--run-dir DIR`).
    pub extra: Vec<OsString>,
}

impl WorkerCommand {
    fn spawn(&self, local_rank: u32) -> Result<Child> {
        let mut worker = Command::new(&self.exe);
        worker
            .arg("worker")
            .arg("--coordinator")
            .arg(&self.coordinator)
            .arg("--slot")
            .arg(&self.slots[local_rank as usize])
            .args(&self.extra)
            // The token travels in the environment, never in `ps`.
            .env("DALLE_JOB_TOKEN", &self.token)
            // So that `auto` thread counts split this machine's cores.
            .env(
                dalle_train::threads::LOCAL_WORKERS_ENV,
                self.slots.len().to_string(),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(host) = &self.advertise {
            worker.arg("--advertise").arg(host);
        }
        stop_with_this_process(&mut worker);
        if let Some(ca) = &self.tls_ca {
            worker.arg("--tls-ca").arg(ca);
        }
        if let Some(domain) = &self.tls_domain {
            worker.arg("--tls-domain").arg(domain);
        }
        let mut child = worker
            .spawn()
            .with_context(|| format!("cannot start worker {local_rank}"))?;
        let prefix = format!("[worker {local_rank}] ");
        if let Some(out) = child.stdout.take() {
            forward(out, prefix.clone(), || Box::new(std::io::stdout()));
        }
        if let Some(err) = child.stderr.take() {
            forward(err, prefix, || Box::new(std::io::stderr()));
        }
        Ok(child)
    }
}

/// Has the worker receive SIGTERM (a stop at its next step boundary) if
/// this agent dies without stopping it, killed outright (SIGKILL, the OOM
/// killer): otherwise it would train on, orphaned, holding its GPU, with
/// nobody to restart or stop it. Linux ties the signal to the thread that
/// spawned the child; workers are spawned from the agent's main thread,
/// which lives as long as the agent.
#[cfg(target_os = "linux")]
fn stop_with_this_process(worker: &mut Command) {
    use std::os::unix::process::CommandExt;
    let agent = std::process::id();
    // SAFETY: between fork and exec the closure calls only prctl, getppid
    // and errno reads, which are async-signal-safe, and allocates nothing.
    unsafe {
        worker.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The agent may have died before the signal was armed.
            if libc::getppid() as u32 != agent {
                return Err(std::io::Error::other("the agent exited"));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn stop_with_this_process(_worker: &mut Command) {}

/// Copies `stream` to `sink` a whole line at a time, each under `prefix`,
/// so that lines of several workers never interleave mid-line. JSON logs
/// (`--log-format json`) go unprefixed, each line an object a log pipeline
/// parses: they carry the worker's rank and generation as fields.
fn forward(stream: impl Read + Send + 'static, prefix: String, sink: fn() -> Box<dyn Write>) {
    let prefix = if std::env::var("DALLE_LOG_FORMAT").as_deref() == Ok("json") {
        String::new()
    } else {
        prefix
    };
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if !line.ends_with(b"\n") {
                line.push(b'\n');
            }
            let mut whole = Vec::with_capacity(prefix.len() + line.len());
            whole.extend_from_slice(prefix.as_bytes());
            whole.extend_from_slice(&line);
            // One write per line: the standard streams lock per call.
            let _ = sink().write_all(&whole);
        }
    });
}

/// A worker that exited, as [`LocalWorkers::poll`] reports it.
pub struct Exit {
    pub local_rank: u32,
    pub pid: u32,
    pub status: ExitStatus,
}

struct LocalWorker {
    local_rank: u32,
    child: Child,
    exited: bool,
}

/// The job's workers on this machine.
pub struct LocalWorkers {
    command: WorkerCommand,
    workers: Vec<LocalWorker>,
    restarts: u32,
    max_restarts: u32,
}

impl LocalWorkers {
    /// Starts local ranks 0..n.
    pub fn start(command: WorkerCommand, n: u32, max_restarts: u32) -> Result<Self> {
        let workers = (0..n)
            .map(|local_rank| {
                Ok(LocalWorker {
                    local_rank,
                    child: command.spawn(local_rank)?,
                    exited: false,
                })
            })
            .collect::<Result<_>>()?;
        Ok(LocalWorkers {
            command,
            workers,
            restarts: 0,
            max_restarts,
        })
    }

    /// The workers that exited since the last call.
    pub fn poll(&mut self) -> Vec<Exit> {
        let mut exits = Vec::new();
        for worker in self.workers.iter_mut().filter(|w| !w.exited) {
            if let Ok(Some(status)) = worker.child.try_wait() {
                worker.exited = true;
                exits.push(Exit {
                    local_rank: worker.local_rank,
                    pid: worker.child.id(),
                    status,
                });
            }
        }
        exits
    }

    /// Starts local rank `local_rank` again (its process exited), if the
    /// restart budget allows: `Ok(false)` once it is spent.
    pub fn restart(&mut self, local_rank: u32) -> Result<bool> {
        if self.restarts >= self.max_restarts {
            return Ok(false);
        }
        self.restarts += 1;
        let child = self.command.spawn(local_rank)?;
        tracing::warn!(
            worker = local_rank,
            pid = child.id(),
            "restarted worker {local_rank} (restart {} of --max-restarts {})",
            self.restarts,
            self.max_restarts
        );
        let worker = self
            .workers
            .iter_mut()
            .find(|w| w.local_rank == local_rank)
            .context("no such local worker")?;
        worker.child = child;
        worker.exited = false;
        Ok(true)
    }

    /// Whether this machine runs no workers (`--nproc 0`).
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Whether `pid` is one of the workers, still running.
    pub fn runs(&self, pid: u32) -> bool {
        self.workers
            .iter()
            .any(|w| !w.exited && w.child.id() == pid)
    }

    /// Kills the running worker `pid` (its exit then shows in `poll`).
    pub fn kill(&mut self, pid: u32) {
        if let Some(worker) = self
            .workers
            .iter_mut()
            .find(|w| !w.exited && w.child.id() == pid)
        {
            let _ = worker.child.kill();
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to every running worker.
    pub fn signal(&self, signal: i32) {
        for worker in self.workers.iter().filter(|w| !w.exited) {
            let Ok(pid) = libc::pid_t::try_from(worker.child.id()) else {
                continue;
            };
            // SAFETY: kill(2) on a child not reaped yet (its pid is ours).
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    /// Kills every running worker (their exits then show in `poll`).
    pub fn kill_all(&mut self) {
        for worker in self.workers.iter_mut().filter(|w| !w.exited) {
            let _ = worker.child.kill();
        }
    }

    /// Worker processes alive now.
    pub fn live(&self) -> u32 {
        self.workers.iter().filter(|w| !w.exited).count() as u32
    }

    /// Restarts done so far, and the budget.
    pub fn restarts(&self) -> (u32, u32) {
        (self.restarts, self.max_restarts)
    }

    /// Waits up to `grace` for the workers to exit, then kills the rest (a
    /// worker the coordinator dropped as hung, say).
    pub fn reap(&mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        for worker in &mut self.workers {
            let i = worker.local_rank;
            loop {
                match worker.child.try_wait() {
                    Ok(Some(status)) => {
                        if !status.success() && status.code() != Some(STOPPED) {
                            tracing::warn!(worker = i, %status, "worker exited with an error");
                        }
                        break;
                    }
                    Ok(None) => {}
                    Err(_) => break,
                }
                if Instant::now() >= deadline {
                    if !grace.is_zero() {
                        tracing::warn!(
                            worker = i,
                            pid = worker.child.id(),
                            "worker still running {} s after the job ended: killing it",
                            grace.as_secs()
                        );
                    }
                    let _ = worker.child.kill();
                    let _ = worker.child.wait();
                    break;
                }
                // Child exits are not awaitable here without a signal handler.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Passes a stop on to the workers: the first SIGTERM or SIGINT as SIGTERM
/// (each stops at its next step boundary, after the checkpoint due there),
/// a second one, or `grace` passing with workers still running, as
/// SIGKILL. Workers exiting meanwhile are not restarted.
pub struct Stop {
    signals: AgentSignals,
    grace: Duration,
    since: Option<Instant>,
    /// Workers had to be killed, or one exited with an error while stopping.
    unclean: bool,
}

impl Stop {
    pub fn new(signals: AgentSignals, grace: Duration) -> Self {
        Stop {
            signals,
            grace,
            since: None,
            unclean: false,
        }
    }

    /// Whether a stop was asked; forwards it, or escalates, as due.
    pub fn tick(&mut self, workers: &mut LocalWorkers) -> bool {
        let count = self.signals.count();
        if count == 0 {
            return false;
        }
        let since = *self.since.get_or_insert_with(|| {
            tracing::warn!(
                "{}: stopping; {} worker(s) told to stop at their next step boundary (SIGTERM), \
                 none restarted; a second signal, or {} s, kills them",
                self.signals.first(),
                workers.live(),
                self.grace.as_secs()
            );
            workers.signal(libc::SIGTERM);
            Instant::now()
        });
        let live = workers.live();
        if live > 0 && (count >= 2 || since.elapsed() > self.grace) {
            if count >= 2 {
                tracing::warn!("a second signal: killing {live} worker(s) now");
            } else {
                tracing::warn!(
                    "{live} worker(s) still running {} s after the stop: killing them",
                    self.grace.as_secs()
                );
            }
            workers.kill_all();
            self.unclean = true;
        }
        true
    }

    /// Notes how a worker exited while stopping.
    pub fn saw_exit(&mut self, status: &ExitStatus) {
        if !status.success() && status.code() != Some(STOPPED) {
            self.unclean = true;
        }
    }

    /// The stop, once every worker exited.
    pub fn stopped(&self) -> Stopped {
        Stopped {
            signal: self.signals.first(),
            clean: !self.unclean,
        }
    }
}

/// An agent stopped by a signal, its workers gone: see [`Stopped::code`].
#[derive(Debug)]
pub struct Stopped {
    pub signal: &'static str,
    /// Every worker stopped by itself at a step boundary.
    pub clean: bool,
}

impl Stopped {
    /// The agent's exit status: [`STOPPED`] when every worker stopped at a
    /// step boundary, 1 when some had to be killed (or failed).
    pub fn code(&self) -> i32 {
        if self.clean { STOPPED } else { 1 }
    }
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.clean {
            write!(
                f,
                "stopped by {}: every worker stopped at a step boundary after its due checkpoint",
                self.signal
            )
        } else {
            write!(
                f,
                "stopped by {}: some workers had to be killed or failed while stopping",
                self.signal
            )
        }
    }
}

impl std::error::Error for Stopped {}
