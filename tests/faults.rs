//! Lost workers under `dalle launch`, as users run it: with its default
//! flags, with `--no-resume` or `--resume-from`, with the restarts spent,
//! and with a peer that is gone before the ring forms. Real worker
//! processes over loopback, killed with SIGKILL.

// Only the launch helpers: this binary starts no S3 server.
#[path = "support/launch.rs"]
mod launch_support;

use launch_support::{DALLE, Running, STAGE1_LONG, children, committed, field, ledger, tiny_job};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// `dalle` with the tiny job's config and `args`, plain logs.
fn dalle(config: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(DALLE);
    command
        .arg("--config")
        .arg(config)
        .args(args)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info");
    command
}

/// Waits until `stage` has a committed checkpoint past `after_step` and
/// `workers` worker processes run, then SIGKILLs one: the newest checkpoint
/// step then, the pid killed, and the worker pids before the kill.
fn kill_a_worker_after_a_checkpoint(
    launch: &mut Running,
    run: &Path,
    stage: &str,
    after_step: u64,
    workers: usize,
) -> (u64, u32, Vec<u32>) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let ready = committed(run, stage).is_some_and(|s| s > after_step)
            && children(launch.pid()).len() >= workers;
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint of {stage} after step {after_step} within 3 minutes:\n{}",
            launch.stderr.text()
        );
        if let Some(status) = launch.child.try_wait().unwrap() {
            panic!("launch ended early ({status}):\n{}", launch.stderr.text());
        }
        // Poll the readiness conditions without spinning a core.
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = committed(run, stage).unwrap();
    let workers = children(launch.pid());
    let victim = *workers.last().unwrap();
    signal(victim, "KILL");
    (before, victim, workers)
}

/// Sends signal `name` (KILL, STOP, CONT) to `pid`.
fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

/// The steps the workers resumed `stage` from, in log order.
fn resumed_steps(log: &str, stage: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("resuming from a checkpoint"))
        .filter(|l| l.contains(&format!("stage={stage}")))
        .map(|l| field(l, "step").parse().unwrap())
        .collect()
}

#[test]
fn with_default_flags_a_killed_worker_is_restarted_and_the_group_reforms_at_full_size() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // A dVAE stage long enough to be killed in, checkpointed every 20 steps.
    let config = tiny_job(dir.path(), "", "[checkpoint]\nevery = 20\n");
    // `launch --nproc 3` and nothing else: min_workers is 3, the heartbeat
    // timeout 30 s.
    let mut launch = Running::spawn(
        dalle(&config, &STAGE1_LONG)
            .args(["--set", "gpt.train.batch_size=6"])
            .args(["launch", "--nproc", "3"]),
    );
    let (before, victim, _) = kill_a_worker_after_a_checkpoint(&mut launch, &run, "dvae", 0, 3);
    let (stdout, log) = (launch.stdout.clone(), launch.stderr.clone());
    let ended = launch.wait();
    let text = log.text();
    assert!(
        ended.success(),
        "the job failed after losing a worker:\n{text}"
    );
    // The launcher saw its worker die, told the coordinator (which did not
    // wait for the heartbeat timeout) and started it again: the group
    // re-formed with all three.
    assert!(text.contains(&format!("pid {victim}")) && text.contains("exited: signal: 9"));
    assert!(text.contains("restarted worker"), "{text}");
    assert!(
        stdout
            .text()
            .contains("with 3 workers (generation 2, 1 restarts)"),
        "{}\n{text}",
        stdout.text()
    );
    // The group went on from a committed checkpoint, not from scratch.
    let resumed = resumed_steps(&text, "dvae");
    assert_eq!(resumed.len(), 3, "{text}");
    assert!(
        resumed.iter().all(|&s| s >= before),
        "{resumed:?} < {before}"
    );
    assert!(run.join("bundle/bundle.json").is_file());
    // Worker output comes whole lines at a time, each under its worker.
    let worker_lines: Vec<&str> = text.lines().filter(|l| l.contains("rank=")).collect();
    assert!(!worker_lines.is_empty());
    for line in worker_lines {
        assert!(line.starts_with("[worker "), "{line}");
        assert_eq!(line.matches("[worker ").count(), 1, "{line}");
    }

    // The sample ledger: every step, before and after the failure, trained on
    // exactly the samples an uninterrupted run trains on (none lost, none
    // twice). The reference runs the dVAE alone.
    let reference_job = dir.path().join("reference");
    std::fs::create_dir_all(&reference_job).unwrap();
    let reference_config = tiny_job(
        &reference_job,
        "stages = [\"dvae\"]",
        "[checkpoint]\nevery = 20\n",
    );
    let out = dalle(&reference_config, &STAGE1_LONG)
        .args(["launch", "--nproc", "2"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    let reference = reference_job.join("run");
    // Only the planned stage ran.
    assert!(reference.join("dvae.safetensors").is_file());
    assert!(!reference.join("tokenizer.json").exists());
    let (survived, uninterrupted) = (ledger(&run), ledger(&reference));
    assert_eq!(uninterrupted.len(), 600);
    assert_eq!(survived, uninterrupted, "the samples of some step differ");
    let all: Vec<&String> = uninterrupted.values().flatten().collect();
    assert!(all.iter().all(|k| !k.is_empty()) && all.len() == 600 * 6);
}

/// A dVAE-only job, checkpointed every 20 steps (its steps are set with
/// `--set dvae.train.steps=N`).
fn dvae_job(dir: &Path) -> std::path::PathBuf {
    tiny_job(dir, "stages = [\"dvae\"]", "[checkpoint]\nevery = 20\n")
}

#[test]
fn with_no_resume_a_lost_worker_resumes_the_checkpoints_of_this_run() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let config = dvae_job(dir.path());
    let mut launch = Running::spawn(
        dalle(&config, &["--no-resume", "--set", "dvae.train.steps=300"])
            .args(["launch", "--nproc", "2"]),
    );
    let (before, _, _) = kill_a_worker_after_a_checkpoint(&mut launch, &run, "dvae", 0, 2);
    let (stdout, log) = (launch.stdout.clone(), launch.stderr.clone());
    let ended = launch.wait();
    let text = log.text();
    // `--no-resume` was for the job's start: the re-formed group resumes
    // the checkpoints the job itself wrote instead of refusing them.
    assert!(ended.success(), "{text}");
    assert!(!text.contains("checkpoint.resume is off"), "{text}");
    assert!(stdout.text().contains("(generation 2, 1 restarts)"));
    let resumed = resumed_steps(&text, "dvae");
    assert_eq!(resumed.len(), 2, "{text}");
    assert!(
        resumed.iter().all(|&s| s >= before),
        "{resumed:?} < {before}"
    );
}

#[test]
fn with_resume_from_a_lost_worker_resumes_the_newest_checkpoint_not_the_named_one() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let config = dvae_job(dir.path());
    // A first run leaves checkpoints at steps 20 and 40.
    let out = dalle(&config, &["--set", "dvae.train.steps=40"])
        .args(["launch", "--nproc", "1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(committed(&run, "dvae"), Some(40));

    // Back to step 20, for longer; a worker is lost past step 40.
    let step_20 = run.join("checkpoints/dvae/step-0000000020");
    assert!(step_20.join("manifest.json").is_file());
    let mut launch = Running::spawn(
        dalle(&config, &["--set", "dvae.train.steps=300"])
            .arg("--resume-from")
            .arg(&step_20)
            .args(["launch", "--nproc", "2"]),
    );
    let (before, _, _) = kill_a_worker_after_a_checkpoint(&mut launch, &run, "dvae", 40, 2);
    let log = launch.stderr.clone();
    let ended = launch.wait();
    let text = log.text();
    assert!(ended.success(), "{text}");
    // Generation 1 started from the named checkpoint; generation 2 from the
    // newest one, not from step 20 again (which would discard the progress).
    let resumed = resumed_steps(&text, "dvae");
    assert_eq!(resumed.len(), 4, "{text}");
    assert_eq!(resumed[..2], [20, 20], "{text}");
    assert!(
        resumed[2..].iter().all(|&s| s >= before),
        "{resumed:?} < {before}"
    );
    assert_eq!(committed(&run, "dvae"), Some(300));
}

#[test]
fn a_lost_worker_with_no_restarts_left_fails_the_job_at_once_naming_min_workers() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let config = dvae_job(dir.path());
    let mut launch = Running::spawn(dalle(&config, &["--set", "dvae.train.steps=600"]).args([
        "launch",
        "--nproc",
        "2",
        "--max-restarts",
        "1",
    ]));
    let (_, _, workers) = kill_a_worker_after_a_checkpoint(&mut launch, &run, "dvae", 0, 2);
    // The launcher starts it again (its one restart); kill that one too,
    // before it can join.
    let deadline = Instant::now() + Duration::from_secs(60);
    let restarted = loop {
        if let Some(pid) = children(launch.pid())
            .into_iter()
            .find(|p| !workers.contains(p))
        {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "no restart:\n{}",
            launch.stderr.text()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    signal(restarted, "KILL");
    let log = launch.stderr.clone();
    let ended = launch.wait();
    let text = log.text();
    assert!(!ended.success(), "{text}");
    // The coordinator gave up at once, saying why and who is missing,
    // instead of waiting out the 600 s rendezvous timeout.
    assert!(text.contains("min_workers is 2"), "{text}");
    assert!(text.contains("missing: worker"), "{text}");
    assert!(text.contains("--max-restarts 1"), "{text}");
    assert!(!text.contains("rendezvous_timeout"), "{text}");
}

#[test]
fn a_peer_lost_before_the_ring_forms_does_not_take_the_survivors_down() {
    let dir = tempfile::tempdir().unwrap();
    let config = dvae_job(dir.path());
    // Two workers here and room for a third, which this test plays: it
    // joins, gets its place in the ring, and is gone before the ring forms.
    let launch = Running::spawn(
        dalle(&config, &["--set", "dvae.train.steps=10"])
            .args([
                "launch",
                "--nproc",
                "2",
                "--min-workers",
                "2",
                "--max-workers",
                "3",
            ])
            .args(["--heartbeat-timeout-secs", "3"])
            .env("DALLE_JOB_TOKEN", "faults-test-token"),
    );
    let started = launch
        .stderr
        .wait_for("job started", Duration::from_secs(60));
    let url = field(&started, "coordinator").to_string();
    let token = dalle_runtime::Token::new("faults-test-token".to_string()).unwrap();
    // A ring port that never answers a handshake.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let info = dalle_runtime::JoinInfo::this_process(
        "cpu:9",
        format!("127.0.0.1:{}", silent.local_addr().unwrap().port()),
    );
    let mut member = dalle_runtime::Membership::connect(&url, &token, info, None).unwrap();
    let assignment = member
        .join(Instant::now() + Duration::from_secs(60))
        .unwrap();
    assert_eq!((assignment.world_size, assignment.rank), (3, 2));
    // Gone: no heartbeat, no ring link.
    drop(member);

    let (stdout, log) = (launch.stdout.clone(), launch.stderr.clone());
    let ended = launch.wait();
    let text = log.text();
    assert!(ended.success(), "the survivors did not carry on:\n{text}");
    assert!(
        stdout
            .text()
            .contains("with 2 workers (generation 2, 1 restarts)"),
        "{}\n{text}",
        stdout.text()
    );
    assert!(!text.contains("worker failed"), "{text}");
    drop(silent);
}

#[test]
fn a_worker_stuck_in_a_collective_is_dropped_for_making_no_progress() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let config = dvae_job(dir.path());
    // Heartbeats would take 10 s to notice a silent worker; progress 4 s.
    let mut launch = Running::spawn(
        dalle(&config, &["--set", "dvae.train.steps=400"])
            .args(["launch", "--nproc", "2", "--heartbeat-timeout-secs", "10"])
            .args(["--progress-timeout-secs", "4"]),
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while committed(&run, "dvae").is_none() || children(launch.pid()).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "no checkpoint:\n{}",
            launch.stderr.text()
        );
        assert!(
            launch.child.try_wait().unwrap().is_none(),
            "launch ended early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Rank 1 stops: rank 0 waits in the all-reduce, heartbeating, its
    // step standing still.
    let stuck = *children(launch.pid()).last().unwrap();
    signal(stuck, "STOP");
    let (stdout, log) = (launch.stdout.clone(), launch.stderr.clone());
    let ended = launch.wait();
    let _ = Command::new("kill")
        .args(["-9", &stuck.to_string()])
        .status();
    let text = log.text();
    assert!(ended.success(), "{text}");
    // Dropped for its standing step, not (later) for missed heartbeats.
    let dropped = text
        .lines()
        .find(|l| l.contains("made no progress") || l.contains("missed its heartbeats"))
        .unwrap_or_else(|| panic!("nobody was dropped:\n{text}"));
    assert!(dropped.contains("made no progress"), "{dropped}");
    assert!(dropped.contains("progress_timeout 4 s"), "{dropped}");
    // The stopped worker was killed and started again: the group re-formed
    // at full size and finished.
    assert!(
        text.contains(&format!("worker pid {stuck} was dropped")),
        "{text}"
    );
    assert!(text.contains("restarted worker"), "{text}");
    assert!(
        stdout.text().contains("with 2 workers (generation 2"),
        "{}",
        stdout.text()
    );
    assert_eq!(committed(&run, "dvae"), Some(400));
}

/// The checkpoints a run's manifests say each group wrote: (step,
/// generation).
fn writers(run: &Path, stage: &str) -> Vec<(u64, u64)> {
    let mut found: Vec<(u64, u64)> = std::fs::read_dir(run.join("checkpoints").join(stage))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("manifest.json")).ok())
        .map(|bytes| {
            let manifest: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            let generation = manifest["fence"]["generation"].as_u64();
            (manifest["step"].as_u64().unwrap(), generation.unwrap_or(0))
        })
        .collect();
    found.sort();
    found
}

#[test]
fn a_dropped_writer_that_wakes_up_commits_nothing_over_the_new_group() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let config = dvae_job(dir.path());
    let steps = [
        "--set",
        "dvae.train.steps=300",
        "--set",
        "checkpoint.every=1",
        "--set",
        "run.threads=1",
    ];
    // A coordinator for one worker at a time; the workers are started here.
    let coordinator = Running::spawn(
        dalle(&config, &steps)
            .args(["launch", "--nproc", "0", "--min-workers", "1"])
            .args(["--heartbeat-timeout-secs", "3"])
            .env("DALLE_JOB_TOKEN", "fencing-test-token"),
    );
    let started = coordinator
        .stderr
        .wait_for("job started", Duration::from_secs(60));
    let url = field(&started, "coordinator").to_string();
    let worker = |slot: &str| {
        Running::spawn(
            dalle(&config, &[])
                .args(["worker", "--coordinator", &url, "--slot", slot])
                .env("DALLE_JOB_TOKEN", "fencing-test-token"),
        )
    };
    let stale = worker("cpu:0");
    let deadline = Instant::now() + Duration::from_secs(120);
    while committed(&run, "dvae").is_none_or(|s| s < 20) {
        assert!(Instant::now() < deadline, "{}", stale.stderr.text());
        std::thread::sleep(Duration::from_millis(5));
    }
    // Asleep mid-training: dropped, and a new group takes over the run.
    signal(stale.pid(), "STOP");
    let fresh = worker("cpu:1");
    coordinator
        .stderr
        .wait_for("generation 2 formed", Duration::from_secs(60));
    let resumed = fresh
        .stderr
        .wait_for("resuming from a checkpoint", Duration::from_secs(60));
    let resumed: u64 = field(&resumed, "step").parse().unwrap();
    while committed(&run, "dvae").is_none_or(|s| s < resumed + 5) {
        assert!(Instant::now() < deadline, "{}", fresh.stderr.text());
        std::thread::sleep(Duration::from_millis(5));
    }
    // It wakes up and finishes its step, whose checkpoint it tries to commit.
    signal(stale.pid(), "CONT");
    let refused = stale
        .stderr
        .wait_for("has claimed the run", Duration::from_secs(60));
    assert!(refused.contains("generation 2 of job epoch"), "{refused}");
    let (stale_log, coordinator_log) = (stale.stderr.clone(), coordinator.stderr.clone());
    assert!(fresh.wait().success(), "{}", coordinator_log.text());
    assert!(coordinator.wait().success(), "{}", coordinator_log.text());
    drop(stale);
    // Past the resume step, every checkpoint is the new group's.
    let written = writers(&run, "dvae");
    assert!(!written.is_empty());
    for (step, generation) in written {
        assert!(
            step <= resumed || generation == 2,
            "step {step} by generation {generation}\n{}",
            stale_log.text()
        );
    }
    assert_eq!(committed(&run, "dvae"), Some(300));
}

/// A port free now on loopback (for a coordinator that must come back at
/// the same address).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_coordinator_killed_and_started_again_takes_the_job_over() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let config = tiny_job(dir.path(), "", "[checkpoint]\nevery = 25\n");
    let listen = format!("127.0.0.1:{}", free_port());
    let coordinator = || {
        Running::spawn(
            dalle(
                &config,
                &["--set", "gpt.train.steps=1000", "--set", "run.threads=1"],
            )
            .args([
                "launch",
                "--nproc",
                "0",
                "--min-workers",
                "2",
                "--listen",
                &listen,
            ])
            .args(["--heartbeat-timeout-secs", "3"])
            .env("DALLE_JOB_TOKEN", "restart-test-token"),
        )
    };
    let mut first = coordinator();
    first
        .stderr
        .wait_for("job started", Duration::from_secs(60));
    let url = format!("http://{listen}");
    let worker = |slot: &str| {
        Running::spawn(
            dalle(&config, &[])
                .args(["worker", "--coordinator", &url, "--slot", slot])
                .args(["--coordinator-grace-secs", "120"])
                .env("DALLE_JOB_TOKEN", "restart-test-token"),
        )
    };
    let workers = [worker("cpu:0"), worker("cpu:1")];
    // The coordinator dies while the transformer trains.
    let deadline = Instant::now() + Duration::from_secs(180);
    while committed(&run, "gpt").is_none() {
        assert!(Instant::now() < deadline, "{}", first.stderr.text());
        assert!(
            first.child.try_wait().unwrap().is_none(),
            "{}",
            first.stderr.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    // Started again on the same run, it takes the job over.
    let second = coordinator();
    let took = second
        .stderr
        .wait_for("taking over the job", Duration::from_secs(60));
    assert!(
        took.contains("generation 1") && took.contains("[dvae, tokenizer, pretokenize]"),
        "{took}"
    );
    let logs: Vec<_> = workers.iter().map(|w| w.stderr.clone()).collect();
    let (stdout, log) = (second.stdout.clone(), second.stderr.clone());
    for worker in workers {
        let said = worker.stderr.clone();
        assert!(
            worker.wait().success(),
            "{}\n\ncoordinator:\n{}",
            said.text(),
            log.text()
        );
    }
    assert!(second.wait().success(), "{}", log.text());
    assert!(stdout.text().contains("(generation 2"), "{}", stdout.text());
    // The new group went on with the transformer from its checkpoint; the
    // stages before it ran once.
    log.wait_for("generation 2 starts at stage 4/5 gpt", Duration::ZERO);
    for said in logs {
        let said = said.text();
        let starts = |stage: &str| {
            said.lines()
                .filter(|l| l.contains("stage starts") && l.contains(&format!("stage={stage}")))
                .count()
        };
        assert_eq!((starts("dvae"), starts("gpt")), (1, 2), "{said}");
        // Killed mid-stage: the new group resumed the transformer from a
        // checkpoint before its end.
        let resumed = resumed_steps(&said, "gpt");
        let mid_stage = |s: &u64| (25..1000).contains(s);
        assert!(
            !resumed.is_empty() && resumed.iter().all(mid_stage),
            "{said}"
        );
    }
    assert!(run.join("bundle/bundle.json").is_file());
}
