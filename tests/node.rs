//! `dalle node`, the agent of one machine: a coordinator alone (`dalle
//! launch --nproc 0`) and one node with two CPU workers, real processes on
//! loopback. The node finishes a job; a worker of it killed is reported to
//! the coordinator at once (long before the heartbeat timeout) and started
//! again; SIGTERM stops the workers at a step boundary after its due
//! checkpoint, the node exits 75, and the job resumes from that checkpoint.
//! `dalle launch` stops the same way.

#[path = "support/launch.rs"]
mod launch_support;

use launch_support::{DALLE, Running, STAGE1_LONG, children, committed, field, ledger, tiny_job};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const TOKEN: &str = "node-test-token";
/// The heartbeat timeout: far longer than any detection the tests expect,
/// so that what they see comes from the node's reports, not from it.
const HEARTBEAT_SECS: &str = "60";

/// `dalle ARGS` with the job token in the environment and plain logs.
fn dalle(args: &[&str]) -> Command {
    let mut command = Command::new(DALLE);
    command
        .args(args)
        .env("DALLE_JOB_TOKEN", TOKEN)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info");
    command
}

/// A coordinator alone on loopback, waiting for two workers; its URL.
fn start_coordinator(config: &Path, sets: &[&str]) -> (Running, String) {
    let config = config.to_str().unwrap();
    let mut args = vec!["--config", config, "--set", "run.threads=1"];
    args.extend(sets);
    args.extend([
        "launch",
        "--nproc",
        "0",
        "--min-workers",
        "2",
        "--max-workers",
        "2",
        "--heartbeat-timeout-secs",
        HEARTBEAT_SECS,
    ]);
    let running = Running::spawn(&mut dalle(&args));
    let started = running
        .stderr
        .wait_for("job started", Duration::from_secs(60));
    let url = field(&started, "coordinator").to_string();
    (running, url)
}

/// `dalle node --nproc 2` for the coordinator at `url`.
fn start_node(url: &str) -> Running {
    Running::spawn(&mut dalle(&["node", "--coordinator", url, "--nproc", "2"]))
}

/// Waits until the run has a committed dVAE checkpoint and the node runs
/// both its workers: its worker pids.
fn training(node: &mut Running, run: &Path) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let workers = children(node.pid());
        if committed(run, "dvae").is_some_and(|s| s > 0) && workers.len() == 2 {
            return workers;
        }
        if let Some(status) = node.child.try_wait().unwrap() {
            panic!("the node ended early ({status}):\n{}", node.stderr.text());
        }
        assert!(
            Instant::now() < deadline,
            "no dVAE checkpoint within 3 minutes:\n{}",
            node.stderr.text()
        );
        // Poll the readiness conditions without spinning a core.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends signal `name` (KILL, TERM) to `pid`.
fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

/// A dVAE-only job, checkpointed every 20 steps.
fn dvae_job(dir: &Path) -> std::path::PathBuf {
    tiny_job(dir, "stages = [\"dvae\"]", "[checkpoint]\nevery = 20\n")
}

/// The `step=` of every line of `text` that says `what`, in order.
fn steps_of<C: FromIterator<u64>>(text: &str, what: &str) -> C {
    text.lines()
        .filter(|l| l.contains(what))
        .map(|l| field(l, "step").parse().unwrap())
        .collect()
}

#[test]
fn a_coordinator_and_one_node_of_two_workers_finish_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_job(dir.path(), "", "");
    let (coordinator, url) = start_coordinator(&config, &[]);
    let node = start_node(&url);
    let (node_log, coordinator_log) = (node.stderr.clone(), coordinator.stderr.clone());
    let coordinator_out = coordinator.stdout.clone();
    let (node_ended, coordinator_ended) = (node.wait(), coordinator.wait());
    let text = node_log.text();
    assert!(coordinator_ended.success(), "{}", coordinator_log.text());
    assert!(node_ended.success(), "the node failed:\n{text}");
    assert!(
        coordinator_out
            .text()
            .contains("with 2 workers (generation 1"),
        "{}",
        coordinator_out.text()
    );
    // Both workers' output, whole lines under their local rank.
    for i in 0..2 {
        assert!(text.contains(&format!("[worker {i}] ")), "{text}");
    }
    assert!(text.contains("world=2"), "{text}");
    assert!(text.contains("every worker finished the job"), "{text}");
    assert!(dir.path().join("run/bundle/bundle.json").is_file());
}

#[test]
fn a_killed_worker_of_the_node_is_reported_at_once_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let config = dvae_job(dir.path());
    let (coordinator, url) = start_coordinator(&config, &STAGE1_LONG);
    let mut node = start_node(&url);
    let workers = training(&mut node, &run);
    let victim = *workers.last().unwrap();
    let killed = Instant::now();
    signal(victim, "KILL");
    // The coordinator hears of it from the node, not from the heartbeat
    // timeout (60 s): the group re-forms now.
    let heard = coordinator
        .stderr
        .wait_for("exited: signal: 9 (SIGKILL)", Duration::from_secs(20));
    let after = killed.elapsed();
    assert!(heard.contains(&format!("pid {victim}")), "{heard}");
    assert!(after < Duration::from_secs(20), "{after:?}");
    let (node_log, coordinator_log) = (node.stderr.clone(), coordinator.stderr.clone());
    let coordinator_out = coordinator.stdout.clone();
    let (node_ended, coordinator_ended) = (node.wait(), coordinator.wait());
    let text = node_log.text();
    assert!(coordinator_ended.success(), "{}", coordinator_log.text());
    assert!(node_ended.success(), "the node failed:\n{text}");
    assert!(text.contains("restarted worker"), "{text}");
    assert!(
        coordinator_out
            .text()
            .contains("with 2 workers (generation 2, 1 restarts)"),
        "{}\n{}",
        coordinator_out.text(),
        coordinator_log.text()
    );
    // Every step of the stage is in the ledger.
    assert_eq!(ledger(&run).len(), 600);
}

#[test]
fn sigterm_stops_the_node_at_a_step_boundary_after_its_checkpoint_and_the_job_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let config = dvae_job(dir.path());
    let (coordinator, url) = start_coordinator(&config, &STAGE1_LONG);
    let mut node = start_node(&url);
    training(&mut node, &run);
    signal(node.pid(), "TERM");
    let node_log = node.stderr.clone();
    let ended = node.wait();
    let text = node_log.text();
    assert_eq!(ended.code(), Some(75), "{ended}:\n{text}");
    // No worker was restarted, and each stopped on its own (none killed).
    assert!(!text.contains("restarted worker"), "{text}");
    assert!(!text.contains("killing"), "{text}");
    assert!(
        text.contains("every worker stopped at a step boundary"),
        "{text}"
    );
    // The workers that stopped in their step hook did so at one boundary
    // (the other, if any, was blocked in the next step's collective).
    let stops: BTreeSet<u64> = steps_of(&text, "stopping at this step boundary");
    assert_eq!(stops.len(), 1, "{text}");
    let stop = *stops.first().unwrap();
    // The checkpoint due at (or before) that boundary is committed, and
    // none after it.
    assert_eq!(committed(&run, "dvae"), Some(stop / 20 * 20), "{text}");
    assert_eq!(text.matches("exiting with status 75").count(), 2, "{text}");
    // The coordinator heard why the workers left.
    let said = coordinator.stderr.text();
    assert!(said.contains("stopped by SIGTERM"), "{said}");

    // Preemption takes the coordinator too: SIGTERM, and it exits 75,
    // its job state on the run not ended.
    let coordinator_log = coordinator.stderr.clone();
    signal(coordinator.pid(), "TERM");
    let ended = coordinator.wait();
    assert_eq!(ended.code(), Some(75), "{}", coordinator_log.text());

    // The job started again takes over and resumes from that checkpoint.
    let (coordinator, url) = start_coordinator(&config, &STAGE1_LONG);
    let node = start_node(&url);
    let (node_log, coordinator_log) = (node.stderr.clone(), coordinator.stderr.clone());
    let coordinator_out = coordinator.stdout.clone();
    let (node_ended, coordinator_ended) = (node.wait(), coordinator.wait());
    let text = node_log.text();
    assert!(coordinator_ended.success(), "{}", coordinator_log.text());
    assert!(node_ended.success(), "{text}");
    assert!(
        coordinator_log.text().contains("taking over the job"),
        "{}",
        coordinator_log.text()
    );
    let resumed: Vec<u64> = steps_of(&text, "resuming from a checkpoint");
    assert_eq!(resumed, [stop / 20 * 20; 2], "{text}");
    assert!(
        coordinator_out.text().contains("job finished at step 600"),
        "{}",
        coordinator_out.text()
    );
    assert_eq!(ledger(&run).len(), 600);
}

#[test]
fn sigterm_stops_launch_the_same_way_and_launch_again_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let config = dvae_job(dir.path());
    let config = config.to_str().unwrap();
    let mut args = vec!["--config", config];
    args.extend(STAGE1_LONG);
    args.extend(["launch", "--nproc", "2"]);
    let mut launch = Running::spawn(&mut dalle(&args));
    training(&mut launch, &run);
    signal(launch.pid(), "TERM");
    let log = launch.stderr.clone();
    let ended = launch.wait();
    let text = log.text();
    assert_eq!(ended.code(), Some(75), "{ended}:\n{text}");
    assert!(!text.contains("restarted worker"), "{text}");
    let stops: BTreeSet<u64> = steps_of(&text, "stopping at this step boundary");
    assert_eq!(stops.len(), 1, "{text}");
    let stop = *stops.first().unwrap();
    assert_eq!(committed(&run, "dvae"), Some(stop / 20 * 20), "{text}");

    let launch = Running::spawn(&mut dalle(&args));
    let (log, out) = (launch.stderr.clone(), launch.stdout.clone());
    let ended = launch.wait();
    let text = log.text();
    assert!(ended.success(), "{text}");
    assert!(text.contains("taking over the job"), "{text}");
    let resumed: Vec<u64> = steps_of(&text, "resuming from a checkpoint");
    assert_eq!(resumed, [stop / 20 * 20; 2], "{text}");
    assert!(
        out.text().contains("job finished at step 600"),
        "{}",
        out.text()
    );
    assert_eq!(ledger(&run).len(), 600);
}

/// Whether `pid` runs (a zombie no longer does: nobody may reap an orphan
/// in a container).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

#[test]
fn a_node_killed_outright_takes_its_workers_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let config = dvae_job(dir.path());
    let (coordinator, url) = start_coordinator(&config, &STAGE1_LONG);
    let mut node = start_node(&url);
    let workers = training(&mut node, &run);
    signal(node.pid(), "KILL");
    let _ = node.child.wait();
    // Orphaned, they would train on until a log line hit their closed
    // pipe: each gets SIGTERM from the kernel instead and stops at its next
    // step boundary.
    let deadline = Instant::now() + Duration::from_secs(60);
    while workers.iter().any(|&w| alive(w)) {
        assert!(
            Instant::now() < deadline,
            "workers {workers:?} outlived their node by a minute"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // They stopped, not crashed on a closed pipe: each told the coordinator
    // it stopped on SIGTERM, after the checkpoint its step was due.
    let said = coordinator.stderr.text();
    for pid in &workers {
        assert!(
            said.lines()
                .any(|l| l.contains(&format!("pid {pid},")) && l.contains("stopped by SIGTERM")),
            "worker {pid} did not stop on SIGTERM:\n{said}"
        );
    }
}

#[test]
fn a_node_is_refused_without_a_worker_count_or_a_token() {
    let url = "http://127.0.0.1:1";
    let out = dalle(&["node", "--coordinator", url]).output().unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("--gpus") && said.contains("--nproc"),
        "{said}"
    );
    let both = ["node", "--coordinator", url, "--gpus", "1", "--nproc", "1"];
    assert!(!dalle(&both).output().unwrap().status.success());
    let out = dalle(&["node", "--coordinator", url, "--nproc", "1"])
        .env_remove("DALLE_JOB_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("no job token"), "{said}");
}
