//! `dalle status` against a real coordinator started in this process (its
//! status page on port 0), with workers that are this test's threads or a
//! real `dalle worker` process; and the logs of `dalle` as log pipelines
//! read them (`--log-format json`) and as files do (no colour codes).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use dalle_runtime::worker::{MemoryKind, UsageReport};
use dalle_runtime::{
    Coordinator, CoordinatorConfig, CoordinatorHandle, Departure, Heartbeats, JoinInfo, Membership,
    PlanStage, StepReport, Token,
};

const DALLE: &str = env!("CARGO_BIN_EXE_dalle");
const JOB_TOKEN: &str = "status-cli-job-token-01";
const STATUS_TOKEN: &str = "status-cli-page-token-01";

fn coordinator(min: u32, max: u32, job_toml: String, plan: Vec<PlanStage>) -> CoordinatorHandle {
    let mut config = CoordinatorConfig::new(Token::new(JOB_TOKEN).unwrap(), job_toml);
    config.min_workers = min;
    config.max_workers = max;
    config.last_call = Duration::from_millis(100);
    config.heartbeat_interval = Duration::from_millis(50);
    config.heartbeat_timeout = Duration::from_secs(5);
    config.rendezvous_timeout = Some(Duration::from_secs(120));
    config.status_listen = Some(([127, 0, 0, 1], 0).into());
    config.status_token = Some(Token::new(STATUS_TOKEN).unwrap());
    config.plan = plan;
    Coordinator::start(config, |_| Ok(Vec::new())).unwrap()
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
        thread::sleep(Duration::from_millis(10));
    }
}

fn status(url: &str, extra: &[&str], token: Option<&str>) -> Output {
    let mut command = Command::new(DALLE);
    command
        .arg("status")
        .arg(url)
        .args(extra)
        .env_remove("DALLE_STATUS_TOKEN")
        .env_remove("DALLE_LOG_FORMAT");
    if let Some(token) = token {
        command.env("DALLE_STATUS_TOKEN", token);
    }
    command.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

struct FakeWorker {
    membership: Membership,
    assignment: dalle_runtime::Assignment,
    heartbeats: Heartbeats,
}

fn join(url: &str, n: usize) -> Vec<FakeWorker> {
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let url = url.to_string();
            thread::spawn(move || {
                let info = JoinInfo {
                    host: format!("node-{i}"),
                    slot: "cpu:0".into(),
                    data_addr: format!("127.0.0.1:{}", 7200 + i),
                    pid: 3000 + i as u32,
                };
                let token = Token::new(JOB_TOKEN).unwrap();
                let mut membership = Membership::new(&url, &token, info).unwrap();
                let deadline = Instant::now() + Duration::from_secs(30);
                let assignment = membership.join(deadline).unwrap();
                (membership, assignment)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| {
            let (membership, assignment) = t.join().unwrap();
            let heartbeats = Heartbeats::start(&membership, &assignment);
            FakeWorker {
                membership,
                assignment,
                heartbeats,
            }
        })
        .collect()
}

#[test]
fn dalle_status_shows_stages_workers_and_reformations_and_refuses_a_wrong_token() {
    let plan = vec![PlanStage::all_ranks("dvae"), PlanStage::leader("export")];
    let coordinator = coordinator(1, 2, "[run]\nname = \"status-cli\"\n".into(), plan);
    let url = format!("http://{}", coordinator.status_addr().unwrap());
    let mut group = join(&coordinator.url(), 2);
    for w in &group {
        w.heartbeats.report_usage(UsageReport {
            memory_bytes: Some(3 << 30),
            memory_peak_bytes: Some(5 << 30),
            memory_kind: MemoryKind::CudaDevice,
            model_tflops: Some(42.0),
            mfu: Some(0.125),
            ..UsageReport::default()
        });
        w.heartbeats.report(StepReport {
            step: 7,
            loss: 0.5,
            samples_per_second: 64.0,
            data_wait_share: 0.25,
        });
    }
    eventually("step 7 of both workers", Duration::from_secs(10), || {
        let s = coordinator.status();
        (s.step == Some(7) && s.workers.iter().all(|w| w.usage.is_some())).then_some(())
    });

    // --json: the coordinator's document, for scripts.
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("status.token");
    std::fs::write(&token_file, format!("{STATUS_TOKEN}\n")).unwrap();
    let out = status(
        &url,
        &["--json", "--token-file", token_file.to_str().unwrap()],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["phase"], "running");
    assert_eq!(json["current_stage"], "dvae");
    let stages: Vec<(&str, &str)> = json["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["state"].as_str().unwrap()))
        .collect();
    assert_eq!(stages, [("dvae", "running"), ("export", "pending")]);
    let workers = json["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2, "{json}");
    for (rank, w) in workers.iter().enumerate() {
        assert_eq!(w["rank"], rank);
        assert_eq!(w["host"], format!("node-{rank}"));
        assert_eq!(w["step"], 7);
        assert_eq!(w["data_wait_share"], 0.25);
        assert_eq!(w["memory_kind"], "cuda_device");
        assert_eq!(w["memory_peak_bytes"], 5u64 << 30);
        assert_eq!(w["mfu"], 0.125);
        assert!(w["heartbeat_age_seconds"].as_f64().unwrap() < 5.0, "{w}");
    }

    // A worker fails: the group re-forms without it, and the view says why.
    let failing = group.pop().unwrap();
    failing
        .membership
        .leave(
            &failing.assignment,
            7,
            Departure::Failed("out of memory on node-1".into()),
        )
        .unwrap();
    let survivor = group.pop().unwrap();
    eventually("the REFORM", Duration::from_secs(10), || {
        (survivor.heartbeats.instruction() != dalle_runtime::Instruction::Continue).then_some(())
    });
    let mut membership = survivor.membership;
    let assignment = membership
        .join(Instant::now() + Duration::from_secs(30))
        .unwrap();
    drop(survivor.heartbeats);
    assert_eq!(assignment.generation, 2);
    let heartbeats = Heartbeats::start(&membership, &assignment);
    heartbeats.report(StepReport {
        step: 8,
        loss: 0.4,
        samples_per_second: 32.0,
        data_wait_share: 0.5,
    });
    eventually("step 8 of generation 2", Duration::from_secs(10), || {
        (coordinator.status().step == Some(8)).then_some(())
    });

    // The view for people (the token from DALLE_STATUS_TOKEN).
    let out = status(&url, &[], Some(STATUS_TOKEN));
    let view = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for expected in [
        "job running | generation 2 | 1 worker(s)",
        "restarts 1/3",
        "step 8",
        "dvae",
        "export",
        "pending",
        "node-0",
        "50%",
        "re-formations (latest 1)",
        "out of memory on node-1",
        "generation 2 with 1 worker(s)",
    ] {
        assert!(view.contains(expected), "no {expected:?} in\n{view}");
    }
    let dvae = view
        .lines()
        .find(|l| l.contains(" dvae "))
        .unwrap_or_else(|| panic!("{view}"));
    assert!(
        dvae.contains("running") && dvae.contains("<- now"),
        "{dvae}"
    );
    let row = view
        .lines()
        .find(|l| l.trim_start().starts_with("0 ") && l.contains("node-0"))
        .unwrap_or_else(|| panic!("no row of rank 0 in\n{view}"));
    assert!(
        row.contains(&assignment.worker_id) && row.contains("32.0") && row.contains(" ago"),
        "{row}"
    );

    // Refusals say what to do.
    let wrong = status(&url, &["--json"], Some("not-the-token"));
    let err = text(&wrong.stderr);
    assert!(!wrong.status.success() && wrong.stdout.is_empty(), "{err}");
    assert!(err.contains("refused the status token"), "{err}");
    let none = status(&url, &[], None);
    assert!(!none.status.success());
    assert!(
        text(&none.stderr).contains("needs a status token"),
        "{}",
        text(&none.stderr)
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let unreachable = status(&gone, &[], Some(STATUS_TOKEN));
    assert!(
        text(&unreachable.stderr).contains("cannot reach the status page"),
        "{}",
        text(&unreachable.stderr)
    );
    heartbeats.stop();
    membership
        .leave(&assignment, 8, Departure::Finished)
        .unwrap();
}

/// A tiny CPU job of the dVAE stage: synthetic data, checkpoints.
fn tiny_job(dir: &Path) -> std::path::PathBuf {
    let config = dir.join("job.toml");
    let text = format!(
        r#"
[run]
dir = "{}"
device = "cpu"
stages = ["dvae"]

[synth]
count = 64
image_size = 16
rows_per_file = 32
rows_per_group = 16

[data]
decode_threads = 1

[dvae.model]
image_size = 16
n_hid = 8
n_blk_per_group = 1
vocab_size = 16
n_init = 8

[dvae.train]
steps = 40
batch_size = 4
log_every = 5
save_every = 0

[checkpoint]
every = 10
"#,
        dir.join("run").display()
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// Every line of `stderr` as a JSON object with a level and fields.
fn json_lines(stderr: &str) -> Vec<serde_json::Value> {
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    for line in &lines {
        assert!(line["level"].is_string(), "{line}");
        assert!(line["fields"].is_object(), "{line}");
        assert!(line["timestamp"].is_string(), "{line}");
    }
    lines
}

#[test]
fn a_real_worker_logs_json_lines_with_its_rank_and_reports_its_usage() {
    let dir = tempfile::tempdir().unwrap();
    let dalle_of = |config: &Path, args: &[&str]| {
        let mut command = Command::new(DALLE);
        command
            .arg("--config")
            .arg(config)
            .args(args)
            .env_remove("DALLE_LOG_FORMAT")
            .env_remove("NO_COLOR")
            .env("RUST_LOG", "info");
        command
    };
    let solo = dir.path().join("solo");
    std::fs::create_dir_all(&solo).unwrap();
    let solo = tiny_job(&solo);
    let synth = dalle_of(&solo, &["data", "synth"]).output().unwrap();
    assert!(synth.status.success(), "{}", text(&synth.stderr));
    let train = [
        "--set",
        "dvae.train.steps=5",
        "--no-resume",
        "dvae",
        "train",
    ];
    // JSON from the environment; every line parses, training lines carry
    // their rank, stage and step.
    let out = dalle_of(&solo, &train)
        .env("DALLE_LOG_FORMAT", "json")
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines = json_lines(&stderr);
    let steps: Vec<String> = lines
        .iter()
        .filter(|l| l["target"] == "dalle_train::dvae" && l["fields"].get("step").is_some())
        .map(|l| {
            let f = &l["fields"];
            format!("{} {} {}", f["step"], f["rank"], f["stage"])
        })
        .collect();
    assert_eq!(steps, ["5 0 \"dvae\""], "{stderr}");
    // Text to a pipe (not a terminal): no colour codes.
    let out = dalle_of(&solo, &train)
        .args(["--set", "checkpoint.overwrite=true"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("step 5 |"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "colour codes in\n{stderr}");
    assert!(stderr.lines().all(|l| !l.starts_with('{')), "{stderr}");

    let config = tiny_job(dir.path());
    let dalle = |args: &[&str]| dalle_of(&config, args);
    let synth = dalle(&["data", "synth"]).output().unwrap();
    assert!(synth.status.success(), "{}", text(&synth.stderr));
    let resolved = dalle(&["config"]).output().unwrap();
    assert!(resolved.status.success(), "{}", text(&resolved.stderr));
    let coordinator = coordinator(
        1,
        1,
        text(&resolved.stdout),
        vec![PlanStage::all_ranks("dvae")],
    );
    let mut worker = dalle(&["--log-format", "json", "worker", "--slot", "cpu:0"])
        .arg("--coordinator")
        .arg(coordinator.url())
        .env("DALLE_JOB_TOKEN", JOB_TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = worker.stderr.take().unwrap();
    let reader = thread::spawn(move || {
        let mut all = String::new();
        let _ = pipe.read_to_string(&mut all);
        all
    });
    // Memory, model FLOP/s and a checkpoint save (from step 10 on) reach
    // the coordinator while the stage runs.
    let usage = eventually("the worker's usage", Duration::from_secs(300), || {
        let status = coordinator.status();
        let usage = status.workers.first()?.usage?;
        (usage.memory_bytes.is_some()
            && usage.model_tflops.is_some()
            && usage.checkpoint_bytes.is_some())
        .then_some(usage)
    });
    assert_eq!(usage.memory_kind, MemoryKind::ProcessRss);
    assert!(usage.memory_peak_bytes >= usage.memory_bytes, "{usage:?}");
    assert!(usage.model_tflops.unwrap() > 0.0, "{usage:?}");
    assert_eq!(usage.mfu, None, "no peak is known on the CPU");
    assert!(usage.checkpoint_seconds.is_some(), "{usage:?}");
    let url = format!("http://{}", coordinator.status_addr().unwrap());
    let out = status(&url, &["--json"], Some(STATUS_TOKEN));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["workers"][0]["memory_kind"], "process_rss", "{json}");

    let outcome = coordinator.wait().unwrap();
    assert_eq!(outcome.final_step, 40);
    assert!(worker.wait().unwrap().success());
    let stderr = reader.join().unwrap();
    let lines = json_lines(&stderr);
    let training: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["target"] == "dalle_train::dvae" && l["fields"]["step"].is_u64())
        .collect();
    assert_eq!(training.len(), 8, "{stderr}");
    for line in &training {
        let fields = &line["fields"];
        assert_eq!(
            (&fields["rank"], &fields["generation"], &fields["stage"]),
            (&0.into(), &1.into(), &"dvae".into()),
            "{line}"
        );
        assert!(
            fields["message"].as_str().unwrap().starts_with("step "),
            "{line}"
        );
    }
    let joined = lines
        .iter()
        .find(|l| l["fields"]["message"] == "joined the job")
        .unwrap_or_else(|| panic!("{stderr}"));
    assert_eq!(joined["fields"]["generation"], 1, "{joined}");
    assert!(!stderr.contains('\u{1b}'), "colour codes in JSON lines");
}
