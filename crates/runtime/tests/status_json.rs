//! The status page's JSON route and the operator figures workers send with
//! their heartbeats (memory, model FLOP/s, checkpoint saves), over real
//! gRPC and HTTP on loopback; re-formations are listed with their reason.
//! Ports are bound at 0; waits poll for a condition, with a limit.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use dalle_runtime::coordinator::json;
use dalle_runtime::worker::{MemoryKind, UsageReport};
use dalle_runtime::{
    Coordinator, CoordinatorConfig, CoordinatorHandle, Departure, Heartbeats, JoinInfo, Membership,
    PlanStage, StepReport, Token,
};

const TOKEN: &str = "status-json-token-0123";
const STATUS_TOKEN: &str = "status-page-s3cret";

fn token() -> Token {
    Token::new(TOKEN).unwrap()
}

fn start(min: u32, max: u32) -> CoordinatorHandle {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "dalle_runtime=debug".into()),
        )
        .try_init();
    let mut config = CoordinatorConfig::new(token(), "[run]\nname = \"status-json\"\n".into());
    config.min_workers = min;
    config.max_workers = max;
    config.last_call = Duration::from_millis(100);
    config.heartbeat_interval = Duration::from_millis(50);
    config.heartbeat_timeout = Duration::from_millis(400);
    config.rendezvous_timeout = Some(Duration::from_secs(20));
    config.status_listen = Some(([127, 0, 0, 1], 0).into());
    config.status_token = Some(Token::new(STATUS_TOKEN).unwrap());
    config.plan = vec![PlanStage::all_ranks("dvae"), PlanStage::leader("export")];
    Coordinator::start(config, |_| Ok(Vec::new())).unwrap()
}

fn info(i: usize) -> JoinInfo {
    JoinInfo {
        host: "host-j".into(),
        slot: format!("cpu:{i}"),
        data_addr: format!("127.0.0.1:{}", 7100 + i),
        pid: 2000 + i as u32,
    }
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

/// The response (head and body) to `GET path` with these header lines.
fn get(addr: SocketAddr, path: &str, headers: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

fn authorized(addr: SocketAddr, path: &str) -> String {
    get(
        addr,
        path,
        &format!("Authorization: Bearer {STATUS_TOKEN}\r\n"),
    )
}

fn status_json(addr: SocketAddr) -> json::Status {
    let response = authorized(addr, "/status.json");
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(head.contains("Content-Type: application/json"), "{head}");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

struct Worker {
    membership: Membership,
    assignment: dalle_runtime::Assignment,
    heartbeats: Heartbeats,
}

fn join_group(url: &str, n: usize) -> Vec<Worker> {
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let url = url.to_string();
            thread::spawn(move || {
                let mut membership = Membership::new(&url, &token(), info(i)).unwrap();
                let assignment = membership
                    .join(Instant::now() + Duration::from_secs(20))
                    .unwrap();
                (membership, assignment)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| {
            let (membership, assignment) = t.join().unwrap();
            let heartbeats = Heartbeats::start(&membership, &assignment);
            Worker {
                membership,
                assignment,
                heartbeats,
            }
        })
        .collect()
}

#[test]
fn the_json_route_shows_stages_workers_usage_and_reformations() {
    let coordinator = start(1, 2);
    let addr = coordinator.status_addr().unwrap();
    let refused = get(addr, "/status.json", "Authorization: Bearer guess\r\n");
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");

    let mut group = join_group(&coordinator.url(), 2);
    for w in &group {
        let rank = w.assignment.rank;
        w.heartbeats.report_usage(UsageReport {
            memory_bytes: Some(1000 + u64::from(rank)),
            memory_peak_bytes: Some(2000 + u64::from(rank)),
            memory_kind: MemoryKind::ProcessRss,
            model_tflops: Some(0.5),
            mfu: None,
            checkpoint_seconds: Some(0.25),
            checkpoint_bytes: Some(4096),
        });
        w.heartbeats.report(StepReport {
            step: 4,
            loss: 1.0,
            samples_per_second: 10.0,
            data_wait_share: 0.5,
        });
    }
    let status = eventually("both workers' usage", Duration::from_secs(5), || {
        let status = status_json(addr);
        (status.step == Some(4) && status.workers.iter().all(|w| w.memory_bytes.is_some()))
            .then_some(status)
    });
    assert_eq!(status.format, json::FORMAT);
    assert_eq!((status.phase.as_str(), status.generation), ("running", 1));
    assert_eq!(status.current_stage.as_deref(), Some("dvae"));
    let stages: Vec<(&str, &str)> = status
        .stages
        .iter()
        .map(|s| (s.name.as_str(), s.state.as_str()))
        .collect();
    assert_eq!(stages, [("dvae", "running"), ("export", "pending")]);
    assert!(status.reformations.is_empty(), "{status:?}");
    for w in &status.workers {
        assert_eq!(w.host, "host-j");
        assert_eq!(w.stage.as_deref(), Some("dvae"));
        assert_eq!(w.memory_bytes, Some(1000 + u64::from(w.rank)));
        assert_eq!(w.memory_peak_bytes, Some(2000 + u64::from(w.rank)));
        assert_eq!(w.memory_kind.as_deref(), Some("process_rss"));
        assert_eq!((w.model_tflops, w.mfu), (Some(0.5), None));
        assert_eq!(w.data_wait_share, Some(0.5));
        assert_eq!(w.checkpoint_bytes, Some(4096));
        assert!(w.heartbeat_age_seconds < 0.4, "{w:?}");
    }

    let metrics = authorized(addr, "/metrics");
    for w in group.iter().map(|w| &w.assignment) {
        let labels = format!(
            "worker=\"{}\",rank=\"{}\",host=\"host-j\",slot=\"cpu:{}\"",
            w.worker_id, w.rank, w.rank
        );
        for line in [
            format!(
                "dalle_worker_memory_bytes{{{labels},kind=\"process_rss\"}} {}",
                1000 + w.rank
            ),
            format!(
                "dalle_worker_memory_peak_bytes{{{labels},kind=\"process_rss\"}} {}",
                2000 + w.rank
            ),
            format!("dalle_worker_model_tflops{{{labels},state=\"active\"}} 0.5"),
            format!("dalle_worker_data_wait_ratio{{{labels},state=\"active\"}} 0.5"),
            format!("dalle_worker_checkpoint_bytes{{{labels},state=\"active\"}} 4096"),
        ] {
            assert!(
                metrics.lines().any(|l| l == line),
                "no line {line:?} in\n{metrics}"
            );
        }
    }
    assert!(!metrics.contains("dalle_worker_mfu_ratio{"), "{metrics}");

    // One worker fails: the re-formation is listed with its reason, and
    // once the survivor joined again, with the group it formed.
    let failing = group.pop().unwrap();
    let error = "collective broken: peer 0 timed out";
    failing
        .membership
        .leave(&failing.assignment, 4, Departure::Failed(error.into()))
        .unwrap();
    let reforming = eventually("the re-formation", Duration::from_secs(5), || {
        Some(status_json(addr)).filter(|s| !s.reformations.is_empty())
    });
    let r = &reforming.reformations[0];
    assert_eq!((r.from_generation, r.restart), (1, Some(1)));
    assert!(r.reason.contains(error), "{r:?}");
    assert!(r.at_unix_ms > 1_600_000_000_000, "{r:?}");
    let survivor = group.pop().unwrap();
    let mut membership = survivor.membership;
    let assignment = membership
        .join(Instant::now() + Duration::from_secs(20))
        .unwrap();
    drop(survivor.heartbeats);
    assert_eq!(assignment.generation, 2);
    let status = status_json(addr);
    let r = &status.reformations[0];
    assert_eq!(
        (r.formed_generation, r.formed_world_size),
        (Some(2), Some(1))
    );
    assert!(r.rendezvous_seconds.is_some_and(|t| t >= 0.0), "{r:?}");
    let page = authorized(addr, "/");
    assert!(page.contains("re-formations (latest 1):"), "{page}");
    assert!(page.contains(error), "{page}");
    let metrics = authorized(addr, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("dalle_last_reformation_timestamp_seconds ")),
        "{metrics}"
    );
}
