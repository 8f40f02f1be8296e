//! Faults between machines: the coordinator and every worker on a "host" of
//! its own (a network namespace with its own address, see
//! support/hosts.rs), so that a link can be cut the way a network drops a
//! node: the peer falls silent, no reset comes.

#[path = "support/hosts.rs"]
mod hosts;
#[path = "support/launch.rs"]
mod launch_support;

use hosts::Hosts;
use launch_support::{DALLE, Running, committed, ledger, tiny_job};
use std::path::Path;
use std::time::{Duration, Instant};

const TOKEN: &str = "hosts-test-token";
const PORT: u16 = 7100;

/// `dalle ARGS` on host `i` with the tiny job's config.
fn on_host(hosts: &Hosts, i: usize, config: &Path, args: &[&str]) -> Running {
    Running::spawn(
        hosts
            .command(i, DALLE)
            .arg("--config")
            .arg(config)
            .args(args)
            .env("DALLE_JOB_TOKEN", TOKEN)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info"),
    )
}

/// The coordinator on host 0, for `min`..`max` workers.
fn coordinator(
    hosts: &Hosts,
    config: &Path,
    sets: &[&str],
    min: u32,
    max: u32,
    heartbeat: u64,
) -> Running {
    let listen = format!("{}:{PORT}", hosts.address(0));
    let (min, max, heartbeat) = (min.to_string(), max.to_string(), heartbeat.to_string());
    let mut args: Vec<&str> = sets.to_vec();
    args.extend([
        "launch",
        "--nproc",
        "0",
        "--listen",
        &listen,
        "--min-workers",
        &min,
        "--max-workers",
        &max,
        "--heartbeat-timeout-secs",
        &heartbeat,
    ]);
    on_host(hosts, 0, config, &args)
}

/// A worker on host `i` (i ≥ 1), advertising that host's address.
fn worker(hosts: &Hosts, i: usize, config: &Path, extra: &[&str]) -> Running {
    let url = format!("http://{}:{PORT}", hosts.address(0));
    let advertise = hosts.address(i);
    let mut args = vec![
        "worker",
        "--coordinator",
        &url,
        "--slot",
        "cpu:0",
        "--advertise",
        &advertise,
    ];
    args.extend(extra);
    on_host(hosts, i, config, &args)
}

fn wait_until(what: &str, limit: Duration, log: &Running, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "never {what}:\n{}",
            log.stderr.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `--set`s for a dVAE stage of `steps` steps at batch 6 with the sample
/// ledger, one libtorch thread per worker (they share the machine's cores).
fn dvae_steps(steps: u64) -> Vec<String> {
    [
        format!("dvae.train.steps={steps}"),
        "dvae.train.batch_size=6".into(),
        "run.ledger=true".into(),
        "run.threads=1".into(),
    ]
    .into_iter()
    .flat_map(|set| ["--set".to_string(), set])
    .collect()
}

/// A dVAE-only job, checkpointed every 20 steps.
fn dvae_job(dir: &Path) -> std::path::PathBuf {
    tiny_job(dir, "stages = [\"dvae\"]", "[checkpoint]\nevery = 20\n")
}

/// Every step of the `total` trained, on exactly one global batch of 6.
fn assert_every_step_trained_once(run: &Path, total: usize) {
    let steps = ledger(run);
    assert_eq!(steps.len(), total);
    for (step, keys) in steps {
        let mut distinct = keys.clone();
        distinct.dedup();
        assert_eq!(
            (keys.len(), distinct.len()),
            (6, 6),
            "step {step}: {keys:?}"
        );
    }
}

#[test]
fn a_worker_cut_off_mid_collective_is_dropped_and_the_rest_finish() {
    let Some(hosts) = Hosts::new(4) else { return };
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let config = dvae_job(dir.path());
    let sets = dvae_steps(300);
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let coordinator = coordinator(&hosts, &config, &sets, 2, 3, 3);
    coordinator
        .stderr
        .wait_for("job started", Duration::from_secs(60));
    let workers: Vec<Running> = (1..=3).map(|i| worker(&hosts, i, &config, &[])).collect();
    wait_until(
        "a checkpoint",
        Duration::from_secs(120),
        &coordinator,
        || committed(&run, "dvae").is_some(),
    );
    // Host 3 drops off the network in the middle of the all-reduces.
    hosts.cut(3);
    let (stdout, log) = (coordinator.stdout.clone(), coordinator.stderr.clone());
    let mut workers = workers.into_iter();
    let (first, second, cut) = (
        workers.next().unwrap(),
        workers.next().unwrap(),
        workers.next().unwrap(),
    );
    assert!(first.wait().success());
    assert!(second.wait().success());
    assert!(coordinator.wait().success(), "{}", log.text());
    drop(cut);
    let text = log.text();
    let dropped = log.wait_for("missed its heartbeats", Duration::ZERO);
    assert!(dropped.contains(&hosts.address(3)), "{dropped}");
    assert!(
        stdout
            .text()
            .contains("with 2 workers (generation 2, 1 restarts)"),
        "{}\n{text}",
        stdout.text()
    );
    // Exactly the samples of an uninterrupted run, step by step.
    assert_every_step_trained_once(&run, 300);
}

#[test]
fn the_coordinator_cut_off_for_less_than_the_grace_period_loses_nothing() {
    let Some(hosts) = Hosts::new(3) else { return };
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let config = dvae_job(dir.path());
    // Long enough that training cannot end before the workers notice the
    // cut (within about a heartbeat timeout, 3 s), on any machine.
    let sets = dvae_steps(1500);
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let coordinator = coordinator(&hosts, &config, &sets, 2, 2, 3);
    coordinator
        .stderr
        .wait_for("job started", Duration::from_secs(60));
    let grace = ["--coordinator-grace-secs", "60"];
    let workers = [
        worker(&hosts, 1, &config, &grace),
        worker(&hosts, 2, &config, &grace),
    ];
    wait_until(
        "a checkpoint",
        Duration::from_secs(120),
        &coordinator,
        || committed(&run, "dvae").is_some(),
    );
    // The coordinator is unreachable: every worker's heartbeats notice, and
    // the first to notice waits at its step boundary instead of giving up
    // (the other then waits for it inside the next step's collective).
    hosts.cut(0);
    for w in &workers {
        w.stderr
            .wait_for("has not answered", Duration::from_secs(30));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !workers
        .iter()
        .any(|w| w.stderr.text().contains("waiting at this step boundary"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no worker waited at a step boundary:\n{}",
            workers[0].stderr.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    hosts.mend(0);
    let log = coordinator.stderr.clone();
    let said: Vec<_> = workers.iter().map(|w| w.stderr.clone()).collect();
    for w in workers {
        assert!(w.wait().success());
    }
    assert!(coordinator.wait().success(), "{}", log.text());
    for said in &said {
        assert!(
            !said.text().contains("lost the coordinator"),
            "{}",
            said.text()
        );
    }
    assert!(
        said.iter()
            .any(|s| s.text().contains("the coordinator answers again")),
        "nobody saw the coordinator come back"
    );
    assert_every_step_trained_once(&run, 1500);
    assert_eq!(committed(&run, "dvae"), Some(1500));
}

#[test]
fn a_coordinator_killed_and_started_again_on_its_host_finishes_the_job() {
    let Some(hosts) = Hosts::new(3) else { return };
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let config = tiny_job(dir.path(), "", "[checkpoint]\nevery = 25\n");
    let sets = ["--set", "gpt.train.steps=1000", "--set", "run.threads=1"];
    let mut first = coordinator(&hosts, &config, &sets, 2, 2, 3);
    first
        .stderr
        .wait_for("job started", Duration::from_secs(60));
    let grace = ["--coordinator-grace-secs", "120"];
    let workers = [
        worker(&hosts, 1, &config, &grace),
        worker(&hosts, 2, &config, &grace),
    ];
    wait_until(
        "a transformer checkpoint",
        Duration::from_secs(180),
        &first,
        || committed(&run, "gpt").is_some(),
    );
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let second = coordinator(&hosts, &config, &sets, 2, 2, 3);
    second
        .stderr
        .wait_for("taking over the job", Duration::from_secs(60));
    let log = second.stderr.clone();
    let said: Vec<_> = workers.iter().map(|w| w.stderr.clone()).collect();
    for w in workers {
        assert!(w.wait().success(), "{}", log.text());
    }
    assert!(second.wait().success(), "{}", log.text());
    log.wait_for("generation 2 starts at stage 4/5 gpt", Duration::ZERO);
    for said in said {
        let dvae_starts = said
            .text()
            .lines()
            .filter(|l| l.contains("stage starts") && l.contains("stage=dvae"))
            .count();
        assert_eq!(dvae_starts, 1, "{}", said.text());
        let resumed = said.wait_for("resuming from a checkpoint", Duration::ZERO);
        let step: u64 = resumed
            .split("step=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .unwrap();
        assert!(resumed.contains("stage=gpt") && step < 1000, "{resumed}");
    }
    assert!(run.join("bundle/bundle.json").is_file());
}
