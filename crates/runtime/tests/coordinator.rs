//! The coordinator and its workers over real gRPC on loopback: rendezvous,
//! refusals, failure detection and re-formation, the restart budget, the
//! status page. Ports are bound at 0; waits poll for a condition, with a
//! limit, instead of sleeping.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use dalle_runtime::coordinator::JobPhase;
use dalle_runtime::proto::{self, coordinator_client::CoordinatorClient};
use dalle_runtime::{
    Assignment, Coordinator, CoordinatorConfig, CoordinatorHandle, Departure, Heartbeats,
    Instruction, JoinInfo, Membership, PROTOCOL_VERSION, PlanStage, RuntimeError, StepReport,
    Token, ValidationReport,
};

const TOKEN: &str = "test-token-0123456789";
const JOB: &str = "[run]\nname = \"runtime-test\"\n\n[gpt.train]\nsteps = 10\n";
const INTERVAL: Duration = Duration::from_millis(50);
const TIMEOUT: Duration = Duration::from_millis(400);

fn token() -> Token {
    Token::new(TOKEN).unwrap()
}

fn config(min: u32, max: u32) -> CoordinatorConfig {
    let mut config = CoordinatorConfig::new(token(), JOB.into());
    config.min_workers = min;
    config.max_workers = max;
    config.last_call = Duration::from_millis(100);
    config.heartbeat_interval = INTERVAL;
    config.heartbeat_timeout = TIMEOUT;
    config.log_every = 1;
    config.rendezvous_timeout = Some(Duration::from_secs(20));
    config
}

fn start(config: CoordinatorConfig) -> CoordinatorHandle {
    // The coordinator's and workers' logs show with a failing test's output.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "dalle_runtime=debug".into()),
        )
        .try_init();
    Coordinator::start(config, |_| Ok(Vec::new())).unwrap()
}

fn info(i: usize) -> JoinInfo {
    JoinInfo {
        host: "host-a".into(),
        slot: format!("cpu:{i}"),
        data_addr: format!("127.0.0.1:{}", 7000 + i),
        pid: 1000 + i as u32,
    }
}

fn in_secs(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

/// Joins from a thread of its own (Join blocks until the group forms).
fn spawn_join(
    url: &str,
    info: JoinInfo,
) -> thread::JoinHandle<(Membership, Result<Assignment, RuntimeError>)> {
    let url = url.to_string();
    thread::spawn(move || {
        let mut membership = Membership::new(&url, &token(), info).unwrap();
        let assignment = membership.join(in_secs(20));
        (membership, assignment)
    })
}

/// Joins `n` workers at once.
fn join_all(url: &str, n: usize) -> Vec<(Membership, Assignment)> {
    let threads: Vec<_> = (0..n).map(|i| spawn_join(url, info(i))).collect();
    threads
        .into_iter()
        .map(|t| {
            let (membership, assignment) = t.join().unwrap();
            (membership, assignment.unwrap())
        })
        .collect()
}

/// Joins again after REFORM, every worker at once.
fn rejoin_all(memberships: Vec<Membership>) -> Vec<(Membership, Assignment)> {
    let threads: Vec<_> = memberships
        .into_iter()
        .map(|mut m| {
            thread::spawn(move || {
                let assignment = m.join(in_secs(20)).unwrap();
                (m, assignment)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// Polls `probe` until it gives a value, failing after `limit`.
fn eventually<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

fn assert_one_group(assignments: &[&Assignment], world: u32, generation: u64) {
    let ranks: BTreeSet<u32> = assignments.iter().map(|a| a.rank).collect();
    assert_eq!(ranks, (0..world).collect(), "ranks are not 0..{world}");
    let first = assignments[0];
    for a in assignments {
        assert_eq!(a.world_size, world);
        assert_eq!(a.generation, generation);
        assert_eq!(a.ring_peers, first.ring_peers);
        assert_eq!(a.ring_peers.len(), world as usize);
    }
    let ids: BTreeSet<&str> = assignments.iter().map(|a| a.worker_id.as_str()).collect();
    assert_eq!(ids.len(), assignments.len(), "worker ids repeat");
}

fn wait_for_instruction(hb: &Heartbeats, what: &str) -> Instruction {
    eventually(what, Duration::from_secs(5), || {
        Some(hb.instruction()).filter(|i| *i != Instruction::Continue)
    })
}

#[test]
fn two_and_three_workers_form_one_group_and_finish() {
    for world in [2u32, 3] {
        let coordinator = start(config(world, world));
        let joined = join_all(&coordinator.url(), world as usize);
        let assignments: Vec<&Assignment> = joined.iter().map(|(_, a)| a).collect();
        assert_one_group(&assignments, world, 1);
        for (i, (_, a)) in joined.iter().enumerate() {
            assert_eq!(a.job_toml, JOB, "the job must be the coordinator's");
            assert_eq!(a.backend, dalle_runtime::Backend::TcpRing);
            assert!(a.nccl_unique_id.is_empty());
            assert_eq!(a.heartbeat_interval, INTERVAL);
            assert_eq!(a.heartbeat_timeout, TIMEOUT);
            // Same host: ranks follow the slots, and each sits at its rank.
            assert_eq!(a.rank as usize, i);
            assert_eq!(a.ring_peers[a.rank as usize], info(i).data_addr);
        }
        for (membership, a) in &joined {
            membership.leave(a, 10, Departure::Finished).unwrap();
        }
        let outcome = coordinator.wait().unwrap();
        assert_eq!(outcome.final_step, 10);
        assert_eq!(
            (outcome.generation, outcome.world_size, outcome.restarts),
            (1, world, 0)
        );
        assert_eq!(coordinator.status().phase, JobPhase::Finished);
    }
}

/// A raw client and runtime, to send what `Membership` never would.
fn raw_client(
    coordinator: &CoordinatorHandle,
) -> (
    tokio::runtime::Runtime,
    CoordinatorClient<tonic::transport::Channel>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = runtime
        .block_on(CoordinatorClient::connect(coordinator.url()))
        .unwrap();
    (runtime, client)
}

fn join_request(version: u32) -> proto::JoinRequest {
    let info = info(0);
    proto::JoinRequest {
        protocol_version: version,
        host: info.host,
        slot: info.slot,
        data_addr: info.data_addr,
        pid: info.pid,
        worker_id: String::new(),
        wait_ms: 200,
    }
}

#[test]
fn a_wrong_or_missing_token_is_refused_as_unauthenticated() {
    let coordinator = start(config(1, 1));
    let mut stranger = Membership::new(
        &coordinator.url(),
        &Token::new("not-the-token").unwrap(),
        info(0),
    )
    .unwrap();
    let err = stranger.join(in_secs(5)).unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::Unauthenticated), "{err}");
    let text = err.to_string();
    assert!(text.contains("wrong job token"), "{text}");
    assert!(
        !text.contains("not-the-token") && !text.contains(TOKEN),
        "{text}"
    );

    // Without any token, every RPC is refused.
    let (runtime, mut client) = raw_client(&coordinator);
    let join = runtime
        .block_on(client.join(join_request(PROTOCOL_VERSION)))
        .unwrap_err();
    let heartbeat = runtime
        .block_on(client.heartbeat(proto::HeartbeatRequest::default()))
        .unwrap_err();
    let leave = runtime
        .block_on(client.leave(proto::LeaveRequest::default()))
        .unwrap_err();
    for status in [join, heartbeat, leave] {
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(
            status.message().contains("missing job token"),
            "{}",
            status.message()
        );
    }

    // The other header works as well: an unknown worker is told to join.
    let mut request = tonic::Request::new(proto::HeartbeatRequest {
        worker_id: "w99".into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-dalle-token", TOKEN.parse().unwrap());
    let reply = runtime
        .block_on(client.heartbeat(request))
        .unwrap()
        .into_inner();
    assert_eq!(reply.instruction, proto::Instruction::Reform as i32);
    assert_eq!(coordinator.status().waiting.len(), 0);
}

#[test]
fn another_protocol_version_is_refused_naming_both() {
    let coordinator = start(config(1, 1));
    let (runtime, mut client) = raw_client(&coordinator);
    let mut request = tonic::Request::new(join_request(PROTOCOL_VERSION + 98));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let status = runtime.block_on(client.join(request)).unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    let message = status.message();
    assert!(
        message.contains(&format!("protocol version {}", PROTOCOL_VERSION + 98))
            && message.contains(&format!("speaks version {PROTOCOL_VERSION}")),
        "{message}"
    );
}

#[test]
fn joiners_wait_while_min_workers_is_not_reached() {
    let coordinator = start(config(2, 2));
    let mut lonely = Membership::new(&coordinator.url(), &token(), info(0)).unwrap();
    let started = Instant::now();
    let err = lonely
        .join(Instant::now() + Duration::from_millis(600))
        .unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(err, RuntimeError::JoinTimeout { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("1 worker(s) joined, min_workers is 2"),
        "the error should say what the rendezvous waits for: {text}"
    );
    assert!(
        waited >= Duration::from_millis(550) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // It no longer counts as joined.
    eventually("the join to be withdrawn", Duration::from_secs(2), || {
        coordinator.status().waiting.is_empty().then_some(())
    });
    assert_eq!(coordinator.status().phase, JobPhase::Rendezvous);
}

#[test]
fn a_worker_may_start_before_its_coordinator() {
    // A free port, released for the coordinator to take later.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let early = spawn_join(&format!("http://{addr}"), info(0));
    // Let the worker find nobody listening first.
    thread::sleep(Duration::from_millis(200));
    let mut c = config(1, 1);
    c.listen = addr;
    let coordinator = start(c);
    let (_membership, assignment) = early.join().unwrap();
    let assignment = assignment.unwrap();
    assert_eq!(
        (
            assignment.rank,
            assignment.world_size,
            assignment.generation
        ),
        (0, 1, 1)
    );
    drop(coordinator);
}

/// A worker of a running group.
struct Worker {
    membership: Membership,
    assignment: Assignment,
    heartbeats: Heartbeats,
}

/// A group of `world` workers with heartbeats running and a step reported.
fn running_group(coordinator: &CoordinatorHandle, world: usize) -> Vec<Worker> {
    join_all(&coordinator.url(), world)
        .into_iter()
        .map(|(membership, assignment)| {
            let heartbeats = Heartbeats::start(&membership, &assignment);
            heartbeats.report(StepReport {
                step: 3,
                loss: 2.0 + assignment.rank as f64,
                samples_per_second: 100.0,
                data_wait_share: 0.25,
            });
            Worker {
                membership,
                assignment,
                heartbeats,
            }
        })
        .collect()
}

/// What [`hang_one`] saw.
struct Hang {
    survivors: Vec<Worker>,
    /// The hung worker's membership, alive: its process does not exit.
    _hanging: Membership,
    /// Each survivor's REFORM reason.
    reasons: Vec<String>,
    /// From the hang to the last survivor hearing REFORM.
    detected: Duration,
}

/// Stops the heartbeats of the worker at index `hung` (it "hangs": no exit,
/// no Leave) and waits until every other worker heard REFORM.
fn hang_one(mut group: Vec<Worker>, hung: usize) -> Hang {
    let Worker {
        membership,
        heartbeats,
        ..
    } = group.remove(hung);
    drop(heartbeats);
    let hang = Instant::now();
    let reasons = group.iter().map(|w| expect_reform(&w.heartbeats)).collect();
    Hang {
        survivors: group,
        _hanging: membership,
        reasons,
        detected: hang.elapsed(),
    }
}

fn expect_reform(heartbeats: &Heartbeats) -> String {
    match wait_for_instruction(heartbeats, "REFORM") {
        Instruction::Reform { reason } => reason,
        other => panic!("expected REFORM, got {other:?}"),
    }
}

/// Survivors join again while their old heartbeats still run (as a
/// training loop should), then drop those.
fn rejoin_survivors(survivors: Vec<Worker>) -> Vec<(Membership, Assignment)> {
    let (memberships, old_heartbeats): (Vec<_>, Vec<_>) = survivors
        .into_iter()
        .map(|w| (w.membership, w.heartbeats))
        .unzip();
    let rejoined = rejoin_all(memberships);
    drop(old_heartbeats);
    rejoined
}

#[test]
fn a_silent_worker_is_dropped_and_the_rest_reform_without_it() {
    let coordinator = start(config(2, 3));
    let group = running_group(&coordinator, 3);
    let hung_id = group[2].assignment.worker_id.clone();
    let hung_addr = group[2].assignment.ring_peers[2].clone();
    let hang = hang_one(group, 2);

    // Detected within the timeout (plus a heartbeat and scheduling slack),
    // and not before it.
    let detected = hang.detected;
    assert!(
        detected >= TIMEOUT - INTERVAL - Duration::from_millis(20),
        "{detected:?}"
    );
    assert!(
        detected < TIMEOUT + Duration::from_millis(1500),
        "{detected:?}"
    );
    for reason in &hang.reasons {
        assert!(
            reason.contains(&format!("worker {hung_id}"))
                && reason.contains("missed its heartbeats"),
            "{reason}"
        );
    }

    let ids: Vec<String> = hang
        .survivors
        .iter()
        .map(|w| w.assignment.worker_id.clone())
        .collect();
    let rejoined = rejoin_survivors(hang.survivors);
    let assignments: Vec<&Assignment> = rejoined.iter().map(|(_, a)| a).collect();
    assert_one_group(&assignments, 2, 2);
    assert!(!assignments[0].ring_peers.contains(&hung_addr));
    let new_ids: Vec<String> = assignments.iter().map(|a| a.worker_id.clone()).collect();
    assert_eq!(new_ids, ids, "survivors keep their ids");

    let status = coordinator.status();
    assert_eq!(
        (status.generation, status.world_size, status.restarts),
        (2, 2, 1)
    );
    assert_eq!(status.phase, JobPhase::Running);
}

#[test]
fn a_newcomer_waits_and_is_taken_in_when_the_group_reforms() {
    let coordinator = start(config(2, 3));
    let group = running_group(&coordinator, 3);
    let newcomer = spawn_join(&coordinator.url(), info(7));
    eventually("the newcomer to wait", Duration::from_secs(5), || {
        (coordinator.status().waiting.len() == 1).then_some(())
    });
    assert!(
        !newcomer.is_finished(),
        "a newcomer must wait for the next re-formation"
    );
    assert_eq!(coordinator.status().generation, 1);

    let hang = hang_one(group, 0);
    let rejoined = rejoin_survivors(hang.survivors);
    let (_, newcomer) = newcomer.join().unwrap();
    let newcomer = newcomer.unwrap();
    let mut assignments: Vec<&Assignment> = rejoined.iter().map(|(_, a)| a).collect();
    assignments.push(&newcomer);
    assert_one_group(&assignments, 3, 2);
    assert!(newcomer.ring_peers.contains(&info(7).data_addr));
    assert!(
        !newcomer.ring_peers.contains(&info(0).data_addr),
        "the hung worker is out"
    );
}

#[test]
fn a_spent_restart_budget_stops_everyone_with_the_reason() {
    let mut c = config(2, 2);
    c.max_restarts = 0;
    let coordinator = start(c);
    let mut group = running_group(&coordinator, 2);
    let hung_id = group[1].assignment.worker_id.clone();
    drop(group.pop().unwrap().heartbeats);
    let survivor = group.pop().unwrap();
    let reason = match wait_for_instruction(&survivor.heartbeats, "STOP") {
        Instruction::Stop { reason } => reason,
        other => panic!("expected STOP, got {other:?}"),
    };
    assert!(
        reason.contains("restart budget exhausted") && reason.contains(&hung_id),
        "{reason}"
    );
    let err = coordinator.wait().unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::RestartBudgetExhausted {
                max_restarts: 0,
                ..
            }
        ),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("max_restarts") && text.contains(&format!("worker {hung_id}")),
        "{text}"
    );
    // The job is over for latecomers too.
    let mut late = Membership::new(&coordinator.url(), &token(), info(5)).unwrap();
    let refused = late.join(in_secs(5)).unwrap_err();
    assert_eq!(refused.code(), Some(tonic::Code::Aborted), "{refused}");
    assert!(
        refused.to_string().contains("restart budget exhausted"),
        "{refused}"
    );
}

#[test]
fn a_failed_leave_reforms_with_its_error_and_the_job_can_still_finish() {
    let coordinator = start(config(1, 2));
    let mut group = running_group(&coordinator, 2);
    let failing = group.pop().unwrap();
    let error = "collective broken: peer 0 (127.0.0.1:7000) timed out";
    failing
        .membership
        .leave(&failing.assignment, 3, Departure::Failed(error.into()))
        .unwrap();
    let reason = expect_reform(&group[0].heartbeats);
    assert!(reason.contains(error), "{reason}");
    let (survivor, assignment) = rejoin_survivors(group).pop().unwrap();
    assert_eq!(
        (
            assignment.generation,
            assignment.world_size,
            assignment.rank
        ),
        (2, 1, 0)
    );
    survivor
        .leave(&assignment, 10, Departure::Finished)
        .unwrap();
    let outcome = coordinator.wait().unwrap();
    assert_eq!(
        (
            outcome.final_step,
            outcome.generation,
            outcome.world_size,
            outcome.restarts
        ),
        (10, 2, 1, 1)
    );
}

#[test]
fn a_stopped_worker_reforms_the_group_without_spending_a_restart() {
    // No restart left: a failure would end the job, a stop (preemption)
    // must not.
    let mut c = config(1, 2);
    c.max_restarts = 0;
    let coordinator = start(c);
    let mut group = running_group(&coordinator, 2);
    let stopping = group.pop().unwrap();
    stopping
        .membership
        .leave(
            &stopping.assignment,
            3,
            Departure::Stopped("stopped by SIGTERM at step 3".into()),
        )
        .unwrap();
    let reason = expect_reform(&group[0].heartbeats);
    assert!(reason.contains("stopped by SIGTERM"), "{reason}");
    let (survivor, assignment) = rejoin_survivors(group).pop().unwrap();
    assert_eq!((assignment.generation, assignment.world_size), (2, 1));
    survivor
        .leave(&assignment, 10, Departure::Finished)
        .unwrap();
    let outcome = coordinator.wait().unwrap();
    assert_eq!((outcome.final_step, outcome.restarts), (10, 0));
}

#[test]
fn a_member_that_joins_again_reforms_the_group() {
    let coordinator = start(config(2, 2));
    let mut group = running_group(&coordinator, 2);
    let broken = group.pop().unwrap();
    // Its collective broke: it joins again without waiting for REFORM.
    let rejoining = thread::spawn(move || {
        let Worker {
            mut membership,
            heartbeats,
            ..
        } = broken;
        let assignment = membership.join(in_secs(20)).unwrap();
        drop(heartbeats);
        (membership, assignment)
    });
    let reason = expect_reform(&group[0].heartbeats);
    assert!(reason.contains("joined again"), "{reason}");
    let mut rejoined = rejoin_survivors(group);
    rejoined.push(rejoining.join().unwrap());
    let assignments: Vec<&Assignment> = rejoined.iter().map(|(_, a)| a).collect();
    assert_one_group(&assignments, 2, 2);
    assert_eq!(coordinator.status().restarts, 1);
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn the_status_page_and_metrics_show_the_job() {
    let mut c = config(2, 2);
    c.status_listen = Some(([127, 0, 0, 1], 0).into());
    let coordinator = start(c);
    let status_addr = coordinator.status_addr().unwrap();
    let group = running_group(&coordinator, 2);
    for w in &group {
        let rank = w.assignment.rank;
        w.heartbeats.report(StepReport {
            step: 5,
            loss: if rank == 0 { 2.0 } else { 4.0 },
            samples_per_second: if rank == 0 { 100.0 } else { 50.0 },
            data_wait_share: 0.1,
        });
    }
    eventually("both workers' step 5", Duration::from_secs(5), || {
        (coordinator.status().step == Some(5)).then_some(())
    });

    let page = http_get(status_addr, "/");
    assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
    for field in [
        "phase:       running",
        "generation:  1",
        "world size:  2",
        "step:        5",
        "loss:        3.0000",
        "heartbeat age",
    ] {
        assert!(page.contains(field), "no {field:?} in\n{page}");
    }
    for a in group.iter().map(|w| &w.assignment) {
        let row = page
            .lines()
            .find(|l| l.starts_with(&format!("{:<5} {:<8}", a.rank, a.worker_id)))
            .unwrap_or_else(|| panic!("no row for rank {} in\n{page}", a.rank));
        assert!(
            row.contains("host-a")
                && row.contains(&format!("cpu:{}", a.rank))
                && row.contains(" 5 "),
            "{row}"
        );
    }

    let metrics = http_get(status_addr, "/metrics");
    assert!(
        metrics.contains("Content-Type: text/plain; version=0.0.4"),
        "{metrics}"
    );
    for line in [
        "dalle_world_size 2",
        "dalle_generation 1",
        "dalle_step 5",
        "dalle_loss 3",
        "dalle_samples_per_second 150",
        "dalle_restarts_total 0",
        "# TYPE dalle_restarts_total counter",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no line {line:?} in\n{metrics}"
        );
    }
    for a in group.iter().map(|w| &w.assignment) {
        let prefix = format!(
            "dalle_worker_heartbeat_age_seconds{{worker=\"{}\",rank=\"{}\",host=\"host-a\",slot=\"cpu:{}\",state=\"active\"}} ",
            a.worker_id, a.rank, a.rank
        );
        let age: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in\n{metrics}"))
            .parse()
            .unwrap();
        assert!((0.0..TIMEOUT.as_secs_f64()).contains(&age), "{age}");
    }
    assert!(!metrics.contains(TOKEN) && !page.contains(TOKEN));
    assert!(http_get(status_addr, "/nope").starts_with("HTTP/1.1 404"));
}

#[test]
fn held_out_figures_reach_the_metrics_and_stay_after_their_stage() {
    let mut c = config(1, 1);
    c.status_listen = Some(([127, 0, 0, 1], 0).into());
    c.plan = vec![PlanStage::all_ranks("dvae"), PlanStage::all_ranks("gpt")];
    let coordinator = start(c);
    let status_addr = coordinator.status_addr().unwrap();
    let w = running_group(&coordinator, 1).pop().unwrap();
    let metrics_with = |what: &str, line: &str| {
        eventually(what, Duration::from_secs(5), || {
            let metrics = http_get(status_addr, "/metrics");
            metrics.lines().any(|l| l == line).then_some(metrics)
        })
    };
    let before = http_get(status_addr, "/metrics");
    assert!(!before.contains("dalle_validation"), "{before}");
    w.heartbeats.report_validation(ValidationReport {
        step: 3,
        samples: 64,
        recon: Some(0.125),
        psnr_db: Some(21.5),
        codes_used: Some(37),
        code_perplexity: Some(20.25),
        ..ValidationReport::default()
    });
    let metrics = metrics_with(
        "the dVAE's held-out PSNR",
        "dalle_validation_psnr_db{stage=\"dvae\"} 21.5",
    );
    for line in [
        "# TYPE dalle_validation_loss gauge",
        "dalle_validation_loss{stage=\"dvae\",part=\"recon\"} 0.125",
        "dalle_validation_codes_used{stage=\"dvae\"} 37",
        "dalle_validation_code_perplexity{stage=\"dvae\"} 20.25",
        "dalle_validation_step{stage=\"dvae\"} 3",
        "dalle_validation_samples{stage=\"dvae\"} 64",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no line {line:?} in\n{metrics}"
        );
    }

    // The next stage's figures join the dVAE's, which stay.
    assert_eq!(w.membership.stage_done(&w.assignment, 0).unwrap(), 1);
    w.heartbeats.enter_stage(1);
    w.heartbeats.report(StepReport {
        step: 2,
        loss: 4.0,
        samples_per_second: 10.0,
        data_wait_share: 0.0,
    });
    w.heartbeats.report_validation(ValidationReport {
        step: 2,
        samples: 32,
        text_loss: Some(1.5),
        image_loss: Some(3.25),
        ..ValidationReport::default()
    });
    let metrics = metrics_with(
        "the transformer's held-out image loss",
        "dalle_validation_loss{stage=\"gpt\",part=\"image\"} 3.25",
    );
    for line in [
        "dalle_validation_loss{stage=\"gpt\",part=\"text\"} 1.5",
        "dalle_validation_loss{stage=\"dvae\",part=\"recon\"} 0.125",
        "dalle_validation_step{stage=\"gpt\"} 2",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no line {line:?} in\n{metrics}"
        );
    }
    assert!(
        !metrics.contains("dalle_validation_psnr_db{stage=\"gpt\"}"),
        "{metrics}"
    );
    let page = http_get(status_addr, "/");
    assert!(
        page.contains("validation gpt: step 2, text 1.5000 nats, image 3.2500 nats, 32 samples"),
        "{page}"
    );
}

#[test]
fn nccl_groups_get_one_unique_id_per_generation_from_the_callback() {
    let mut c = config(2, 2);
    c.backend = dalle_runtime::Backend::Nccl;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = calls.clone();
    let coordinator = Coordinator::start(c, move |generation| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(vec![generation as u8; 128])
    })
    .unwrap();
    // NCCL needs no ring address.
    let threads: Vec<_> = (0..2)
        .map(|i| {
            let mut info = info(i);
            info.data_addr.clear();
            spawn_join(&coordinator.url(), info)
        })
        .collect();
    for thread in threads {
        let (_, assignment) = thread.join().unwrap();
        let assignment = assignment.unwrap();
        assert_eq!(assignment.backend, dalle_runtime::Backend::Nccl);
        assert_eq!(assignment.nccl_unique_id, vec![1u8; 128]);
    }
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn workers_stop_when_the_coordinator_is_gone() {
    let coordinator = start(config(1, 1));
    let mut group = running_group(&coordinator, 1);
    let worker = group.pop().unwrap();
    assert_eq!(worker.heartbeats.instruction(), Instruction::Continue);
    let gone = Instant::now();
    coordinator.shutdown();
    match wait_for_instruction(&worker.heartbeats, "STOP") {
        Instruction::Stop { reason } => {
            assert!(reason.contains("lost the coordinator"), "{reason}")
        }
        other => panic!("expected STOP, got {other:?}"),
    }
    assert!(gone.elapsed() >= TIMEOUT - INTERVAL, "{:?}", gone.elapsed());
}

#[test]
fn the_worker_side_can_move_into_training_threads_and_hooks() {
    fn send<T: Send + 'static>() {}
    send::<Membership>();
    send::<Heartbeats>();
    send::<Assignment>();
    send::<CoordinatorHandle>();
}

/// A self-signed certificate for localhost and 127.0.0.1: (cert, key) PEM.
fn self_signed() -> (String, String) {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let certified = rcgen::generate_simple_self_signed(names).unwrap();
    (certified.cert.pem(), certified.signing_key.serialize_pem())
}

#[test]
fn over_tls_workers_that_trust_the_certificate_join_and_others_are_refused() {
    let (cert, key) = self_signed();
    let mut config = config(1, 1);
    config.tls = Some(dalle_runtime::ServerTls::from_pem(cert.clone(), key));
    config.plan = vec![dalle_runtime::PlanStage::all_ranks("dvae")];
    let coordinator = start(config);
    let url = coordinator.url();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");

    // A worker that trusts another certificate, and one speaking plain
    // HTTP/2, are refused with what went wrong, well before their deadline.
    let (stranger, _) = self_signed();
    let untrusting = dalle_runtime::ClientTls::with_ca_pem(stranger);
    let mut wrong_ca = Membership::connect(&url, &token(), info(1), Some(&untrusting)).unwrap();
    let started = Instant::now();
    let err = wrong_ca.join(in_secs(30)).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10), "{err}");
    assert!(matches!(err, RuntimeError::Tls(_)), "{err}");
    assert!(err.to_string().contains("certificate"), "{err}");
    let plain = url.replacen("https://", "http://", 1);
    let mut cleartext = Membership::new(&plain, &token(), info(2)).unwrap();
    let err = cleartext.join(in_secs(3)).unwrap_err();
    eprintln!("plain http to a TLS coordinator: {err}");
    assert_eq!(coordinator.status().waiting.len(), 0);

    // The one that trusts it joins, heartbeats and finishes the plan.
    let trusting = dalle_runtime::ClientTls::with_ca_pem(cert).domain("localhost");
    let mut membership = Membership::connect(&url, &token(), info(0), Some(&trusting)).unwrap();
    let assignment = membership.join(in_secs(20)).unwrap();
    assert_eq!((assignment.world_size, assignment.first_stage), (1, 0));
    assert_eq!(assignment.plan[0].name, "dvae");
    let heartbeats = Heartbeats::start(&membership, &assignment);
    heartbeats.report(StepReport {
        step: 3,
        loss: 0.5,
        samples_per_second: 1.0,
        data_wait_share: 0.0,
    });
    eventually("the step over TLS", Duration::from_secs(5), || {
        (coordinator.status().step == Some(3)).then_some(())
    });
    assert_eq!(membership.stage_done(&assignment, 0).unwrap(), 1);
    membership
        .leave(&assignment, 3, Departure::Finished)
        .unwrap();
    assert_eq!(coordinator.wait().unwrap().final_step, 3);
}

#[test]
fn tls_settings_for_a_plain_url_or_unreadable_files_are_refused_naming_them() {
    let tls = dalle_runtime::ClientTls::system_roots();
    let err = Membership::connect("http://127.0.0.1:1", &token(), info(0), Some(&tls)).unwrap_err();
    assert!(err.to_string().contains("https://"), "{err}");
    let missing = std::path::Path::new("/nonexistent/ca.pem");
    let err = dalle_runtime::ClientTls::from_ca_file(missing).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    let dir = std::env::temp_dir().join(format!("dalle-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, "not a certificate").unwrap();
    std::fs::write(&key, "not a key").unwrap();
    let err = dalle_runtime::ServerTls::from_files(&cert, &key).unwrap_err();
    assert!(
        err.to_string().contains("cert.pem") && err.to_string().contains("not PEM"),
        "{err}"
    );
    // PEM that is no usable key fails when the coordinator starts, naming
    // the files.
    let (good_cert, _) = self_signed();
    std::fs::write(&cert, good_cert).unwrap();
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let mut config = config(1, 1);
    config.tls = Some(dalle_runtime::ServerTls::from_files(&cert, &key).unwrap());
    let err = Coordinator::start(config, |_| Ok(Vec::new())).unwrap_err();
    assert!(err.to_string().contains("key.pem"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A status request with these extra header lines; the whole response, or
/// "" when the server closed without one.
fn http_get_with(addr: SocketAddr, path: &str, headers: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    // A server that closes the connection unserved (it is busy) may reset
    // it before the request is written: no answer, as when it closes after.
    if write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}\r\n"
    )
    .is_err()
    {
        return String::new();
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

#[test]
fn a_status_token_guards_both_pages_and_connections_are_capped() {
    let mut c = config(1, 1);
    c.status_listen = Some(([127, 0, 0, 1], 0).into());
    c.status_token = Some(Token::new("status-s3cret").unwrap());
    let coordinator = start(c);
    let addr = coordinator.status_addr().unwrap();
    for path in ["/", "/metrics"] {
        let refused = http_get_with(addr, path, "");
        assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
        assert!(refused.contains("WWW-Authenticate: Bearer"), "{refused}");
        let wrong = http_get_with(addr, path, "Authorization: Bearer guess\r\n");
        assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
        let page = http_get_with(addr, path, "authorization: bearer status-s3cret\r\n");
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    }
    let page = http_get_with(addr, "/", "Authorization: Bearer status-s3cret\r\n");
    assert!(page.contains("phase:"), "{page}");

    // Silent connections take every slot: the next one is closed unserved.
    let silent: Vec<TcpStream> = (0..32).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let busy = eventually("the status page to refuse", Duration::from_secs(5), || {
        let answer = http_get_with(addr, "/", "Authorization: Bearer status-s3cret\r\n");
        answer.is_empty().then_some(answer)
    });
    assert!(busy.is_empty());
    drop(silent);
    eventually(
        "the status page to serve again",
        Duration::from_secs(5),
        || {
            let answer = http_get_with(addr, "/", "Authorization: Bearer status-s3cret\r\n");
            answer.starts_with("HTTP/1.1 200").then_some(())
        },
    );
}

#[test]
fn an_exit_reported_by_the_agent_that_started_the_worker_reforms_at_once() {
    // A heartbeat timeout far beyond the test: only the report can do it.
    let mut config = config(1, 2);
    config.heartbeat_timeout = Duration::from_secs(60);
    let coordinator = start(config);
    let mut group = running_group(&coordinator, 2);
    let dead = group.pop().unwrap();
    // The node agent on the same host, which is no worker itself.
    let agent = Membership::new(
        &coordinator.url(),
        &token(),
        JoinInfo {
            host: "host-a".into(),
            slot: "node".into(),
            data_addr: String::new(),
            pid: 4242,
        },
    )
    .unwrap();
    // An exit of a process it knows nothing of changes nothing.
    agent.report_exit(999_999, "exit status: 1").unwrap();
    assert_eq!(coordinator.status().phase, JobPhase::Running);
    let reported = Instant::now();
    agent.report_exit(1001, "signal: 9 (SIGKILL)").unwrap();
    let reason = expect_reform(&group[0].heartbeats);
    assert!(
        reason.contains(&format!("worker {}", dead.assignment.worker_id))
            && reason.contains("exited: signal: 9 (SIGKILL)"),
        "{reason}"
    );
    assert!(reported.elapsed() < Duration::from_secs(5));
    drop(dead);
    let (_, assignment) = rejoin_survivors(group).pop().unwrap();
    assert_eq!((assignment.generation, assignment.world_size), (2, 1));

    // Like every RPC, it wants the job token.
    let (runtime, mut client) = raw_client(&coordinator);
    let refused = runtime
        .block_on(client.process_exited(proto::ProcessExitedRequest {
            host: "host-a".into(),
            pid: 1000,
            what: "exit status: 1".into(),
        }))
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert_eq!(coordinator.status().world_size, 1);
}
