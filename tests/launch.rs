//! `dalle launch` end to end: a coordinator and two real worker processes
//! over loopback run every stage of a tiny job data-parallel, and the job
//! ends with a sampler bundle.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::launch::{DALLE, KillPid, Running, children, committed, field, tiny_job};

#[test]
fn two_workers_run_the_whole_job() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // Every stage, the optional reranker too.
    let config = tiny_job(
        dir.path(),
        r#"stages = ["dvae", "tokenizer", "pretokenize", "gpt", "rerank", "export"]"#,
        "[rerank.model]\nimage_width = 8\ndim = 16\ndepth = 1\nheads = 2\nembed_dim = 16\n\
         [rerank.train]\nsteps = 10\nbatch_size = 8\nlog_every = 5\nsave_every = 0\n",
    );
    let out = Command::new(DALLE)
        .arg("--config")
        .arg(&config)
        .args(["launch", "--nproc", "2", "--heartbeat-timeout-secs", "20"])
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "launch failed:\n{stderr}");
    assert!(stdout.contains("with 2 workers"), "{stdout}");
    assert!(!stderr.contains("exited with an error"), "{stderr}");
    // Both ranks joined, and both logged the same global losses.
    for rank in [0, 1] {
        assert!(stderr.contains(&format!("rank={rank} world=2")), "{stderr}");
    }
    let rank_lines = |rank: usize| -> String {
        let tail = format!("rank={rank}");
        let mine = stderr.lines().filter(|l| l.trim_end().ends_with(&tail));
        mine.collect::<Vec<_>>().join("\n")
    };
    let lines = |rank: usize| gpt_losses(&rank_lines(rank));
    assert_eq!(lines(0).len(), 2, "{stderr}");
    assert_eq!(lines(0), lines(1), "the ranks logged different losses");
    let rerank = |rank: usize| stage_losses(&rank_lines(rank), "dalle_train::rerank");
    assert_eq!(rerank(0).len(), 2, "{stderr}");
    assert_eq!(
        rerank(0),
        rerank(1),
        "the ranks logged different reranker losses"
    );
    // Every stage left its output; the tokens were split across the ranks.
    for file in [
        "dvae.safetensors",
        "tokenizer.json",
        "gpt.safetensors",
        "reranker.safetensors",
        "bundle/bundle.json",
        "bundle/reranker.safetensors",
    ] {
        assert!(run.join(file).is_file(), "{file} is missing");
    }
    let token_files = std::fs::read_dir(run.join("tokens")).unwrap().count();
    assert_eq!(
        token_files, 4,
        "every one of the 4 data files is tokenized once"
    );
}

/// The losses of the transformer's log lines in `log`, in order.
fn gpt_losses(log: &str) -> Vec<String> {
    stage_losses(log, "dalle_train::gpt")
}

/// The losses of a training stage's log lines (`target`) in `log`, in order.
fn stage_losses(log: &str, target: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(target) && l.contains("| loss"))
        .filter_map(|l| l.split("| loss").nth(1)?.split('|').next())
        .map(str::to_string)
        .collect()
}

fn status_page(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut page = String::new();
    stream.read_to_string(&mut page).unwrap();
    page
}

/// Polls the status page until `ready` holds.
fn wait_for_status(addr: &str, what: &str, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let page = status_page(addr);
        if ready(&page) {
            return page;
        }
        assert!(Instant::now() < deadline, "never {what}:\n{page}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

const TOKEN: &str = "launch-test-token-42";

#[test]
fn over_tls_a_hung_worker_is_dropped_a_newcomer_taken_in_and_strangers_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    // A transformer stage long enough to hang a worker in.
    let config = tiny_job(dir.path(), "", "[checkpoint]\nevery = 25\n");
    let launch = Running::spawn(
        Command::new(DALLE)
            .arg("--config")
            .arg(&config)
            .args(["--set", "gpt.train.steps=1500"])
            .args([
                "launch",
                "--nproc",
                "2",
                "--min-workers",
                "1",
                "--max-workers",
                "3",
            ])
            .args(["--heartbeat-timeout-secs", "3", "--status", "127.0.0.1:0"])
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .env("DALLE_JOB_TOKEN", TOKEN)
            .env("RUST_LOG", "info,dalle_collective=debug")
            .env("NO_COLOR", "1"),
    );
    let (stdout, log) = (launch.stdout.clone(), launch.stderr.clone());
    let started = log.wait_for("job started", Duration::from_secs(60));
    let url = field(&started, "coordinator").to_string();
    let status = field(&started, "status")
        .trim_start_matches("Some(")
        .trim_end_matches(')')
        .to_string();
    assert!(url.starts_with("https://127.0.0.1:"), "{started}");
    let worker = |token: &str, slot: &str| {
        let mut command = Command::new(DALLE);
        command
            .args(["worker", "--coordinator", &url, "--slot", slot, "--tls-ca"])
            .arg(&cert)
            .env("DALLE_JOB_TOKEN", token)
            .env("RUST_LOG", "info,dalle_collective=debug")
            .env("NO_COLOR", "1");
        command
    };

    // A worker with another token is refused, and says why.
    let stranger = worker("not-the-token", "cpu:8").output().unwrap();
    let said = String::from_utf8_lossy(&stranger.stderr);
    assert!(!stranger.status.success(), "{said}");
    assert!(said.contains("wrong job token"), "{said}");
    // A worker of another protocol version is refused naming both versions.
    let refusal = join_with_version(&url, &certified.cert.pem(), 99);
    assert_eq!(
        refusal.code(),
        tonic::Code::FailedPrecondition,
        "{refusal:?}"
    );
    assert!(
        refusal.message().contains("version 99")
            && refusal
                .message()
                .contains(&format!("version {}", dalle_runtime::PROTOCOL_VERSION)),
        "{refusal:?}"
    );

    // A newcomer waits while the group trains, to be taken in when it
    // re-forms.
    wait_for_status(&status, "the first group running", |page| {
        page.contains("generation:  1") && page.contains("phase:       running")
    });
    let newcomer = Running::spawn(&mut worker(TOKEN, "cpu:7"));
    let said = newcomer.stderr.clone();
    wait_for_status(&status, "the newcomer waiting", |page| {
        page.contains("waiting to join (1)")
    });
    let page = wait_for_status(&status, "the transformer training", |page| {
        page.contains("gpt            running") && committed(&run, "gpt").is_some()
    });
    assert!(page.contains("dvae           complete"), "{page}");

    // Rank 1 hangs: alive, sockets open, silent.
    let hung = children(launch.pid())[1];
    Command::new("kill")
        .args(["-STOP", &hung.to_string()])
        .status()
        .unwrap();
    // Whatever happens, the stopped worker does not outlive the test.
    let _reaper = KillPid(hung);

    let ended = launch.wait();
    let joined = newcomer.wait();
    let (text, said) = (log.text(), said.text());
    assert!(ended.success(), "launch failed:\n{text}");
    assert!(
        joined.success(),
        "the newcomer failed:\n{said}\n\nlaunch:\n{text}"
    );
    assert!(
        stdout
            .text()
            .contains("with 2 workers (generation 2, 1 restarts)"),
        "{}\n{text}",
        stdout.text()
    );
    // Detected by its silence, within the heartbeat timeout (+ the
    // coordinator's clock tick).
    let missed = log.wait_for("missed its heartbeats", Duration::ZERO);
    let silent_ms: u64 = missed
        .split("none for ")
        .nth(1)
        .and_then(|rest| rest.split(" ms").next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("{missed}"));
    // (Slack for a loaded machine; without the heartbeats, only the ring's
    // 300 s io_timeout would notice.)
    assert!((3000..5000).contains(&silent_ms), "{missed}");
    assert!(missed.contains(&format!("pid {hung}")), "{missed}");
    // The re-formed group went on with the transformer: the stages before
    // it were complete and nobody ran them again.
    log.wait_for("generation 2 starts at stage 4/5 gpt", Duration::ZERO);
    let dvae_starts = text
        .lines()
        .filter(|l| l.contains("stage starts") && l.contains("stage=dvae"))
        .count();
    assert_eq!(dvae_starts, 2, "{text}");
    assert!(said.contains("generation=2"), "{said}");
    assert!(!said.contains("stage=dvae"), "{said}");
    assert!(said.contains("stage=gpt"), "{said}");
    log.wait_for("killing it", Duration::ZERO);
    assert!(run.join("bundle/bundle.json").is_file());
}

/// Join with another protocol version, as an older or newer worker would.
fn join_with_version(url: &str, ca_pem: &str, version: u32) -> tonic::Status {
    use dalle_runtime::proto::{JoinRequest, coordinator_client::CoordinatorClient};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem));
        let channel = tonic::transport::Endpoint::from_shared(url.to_string())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut request = tonic::Request::new(JoinRequest {
            protocol_version: version,
            host: "elsewhere".into(),
            slot: "cpu:0".into(),
            data_addr: "127.0.0.1:9".into(),
            pid: 1,
            worker_id: String::new(),
            wait_ms: 1000,
        });
        request
            .metadata_mut()
            .insert("x-dalle-token", TOKEN.parse().unwrap());
        CoordinatorClient::new(channel)
            .join(request)
            .await
            .unwrap_err()
    })
}

#[test]
fn a_worker_with_a_run_directory_of_its_own_trains_through_the_shared_url() {
    let garage = support::garage::Garage::start();
    let dir = tempfile::tempdir().unwrap();
    let (data, elsewhere) = (dir.path().join("data"), dir.path().join("machine-b"));
    let shared = format!("s3://{}/jobs/two-machines", garage.bucket);
    let config = tiny_job(
        dir.path(),
        &format!("shared_url = \"{shared}\""),
        "[checkpoint]\nevery = 5\n",
    );
    let data_url = format!("data.url={}", data.display());
    let dalle = |args: &[&str]| {
        let mut command = Command::new(DALLE);
        command
            .arg("--config")
            .arg(&config)
            .args(["--set", &data_url])
            .args(args)
            .envs(garage.env())
            .env("DALLE_JOB_TOKEN", TOKEN)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        command
    };
    // The dataset sits where every machine reads it.
    let out = dalle(&["data", "synth"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // One worker here, one "on another machine": a run directory of its own.
    let launch = Running::spawn(
        dalle(&["launch", "--nproc", "1", "--min-workers", "2"]).args(["--max-workers", "2"]),
    );
    let (stdout, log) = (launch.stdout.clone(), launch.stderr.clone());
    let started = log.wait_for("job started", Duration::from_secs(60));
    let url = field(&started, "coordinator").to_string();
    let remote = Running::spawn(
        dalle(&[
            "worker",
            "--coordinator",
            &url,
            "--slot",
            "cpu:1",
            "--run-dir",
        ])
        .arg(&elsewhere),
    );
    let said = remote.stderr.clone();
    let (ended, joined) = (launch.wait(), remote.wait());
    let (text, said) = (log.text(), said.text());
    assert!(
        ended.success(),
        "launch failed:\n{text}\n\nremote worker:\n{said}"
    );
    assert!(joined.success(), "the remote worker failed:\n{said}");
    assert!(
        stdout.text().contains("with 2 workers"),
        "{}",
        stdout.text()
    );

    // Both ranks trained the same steps: the same global losses.
    let losses = gpt_losses;
    assert_eq!(losses(&text).len(), 2, "{text}");
    assert_eq!(
        losses(&text),
        losses(&said),
        "the two machines logged different losses"
    );
    // The remote worker fetched what rank 0 trained into its own directory
    // and wrote nothing else there: tokens, checkpoints and the bundle are
    // on the shared store.
    for file in ["dvae.safetensors", "tokenizer.json"] {
        assert!(elsewhere.join(file).is_file(), "{file} was not fetched");
    }
    for dir in ["tokens", "checkpoints", "bundle"] {
        assert!(!elsewhere.join(dir).exists(), "{dir} is local");
    }
    let keys = shared_keys(&garage, "jobs/two-machines");
    for wanted in [
        "jobs/two-machines/dvae.safetensors",
        "jobs/two-machines/tokenizer.json",
        "jobs/two-machines/bundle/bundle.json",
        "jobs/two-machines/checkpoints/gpt/latest",
    ] {
        assert!(keys.iter().any(|k| k == wanted), "no {wanted} in {keys:?}");
    }
    let token_files = keys.iter().filter(|k| k.contains("/tokens/")).count();
    assert_eq!(
        token_files, 4,
        "every data file is tokenized once: {keys:?}"
    );
}

/// Every key under `prefix` in the test bucket.
fn shared_keys(garage: &support::garage::Garage, prefix: &str) -> Vec<String> {
    use object_store::ObjectStore;
    let store = garage.store();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        use futures::TryStreamExt;
        store
            .list(Some(&object_store::path::Path::from(prefix)))
            .map_ok(|meta| meta.location.to_string())
            .try_collect()
            .await
            .unwrap()
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_slurm_node_script_runs_a_job_on_two_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let (data, shared) = (dir.path().join("data"), dir.path().join("shared"));
    let config = tiny_job(
        dir.path(),
        &format!("shared_url = \"file://{}\"", shared.display()),
        "",
    );
    let data_url = format!("data.url={}", data.display());
    let out = Command::new(DALLE)
        .arg("--config")
        .arg(&config)
        .args(["--set", &data_url, "data", "synth"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cluster/slurm/node.sh");
    let (port, status_port) = (free_port().to_string(), free_port().to_string());
    let node = |id: &str| {
        let mut command = Command::new("bash");
        command
            .arg(&script)
            .arg(&config)
            .args(["--set", &data_url])
            .env("SLURM_NODEID", id)
            .env("SLURM_NNODES", "2")
            .env("DALLE_COORDINATOR_HOST", "127.0.0.1")
            .env("DALLE_JOB_TOKEN", TOKEN)
            .env("DALLE_DEVICES_PER_NODE", "1")
            .env("DALLE_SLOT_KIND", "cpu")
            .env("DALLE_PORT", &port)
            .env("DALLE_STATUS_PORT", &status_port)
            .env("DALLE_ADVERTISE", "127.0.0.1")
            .env("DALLE", DALLE)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        command
    };
    let head = Running::spawn(&mut node("0"));
    let head_log = head.stderr.clone();
    head_log.wait_for("job started", Duration::from_secs(60));
    let other = Running::spawn(node("1").env("DALLE_RUN_DIR", dir.path().join("node-1")));
    let other_log = other.stderr.clone();
    let (head_ok, other_ok) = (head.wait(), other.wait());
    assert!(head_ok.success(), "node 0 failed:\n{}", head_log.text());
    assert!(other_ok.success(), "node 1 failed:\n{}", other_log.text());
    // (Which node's worker is rank 0 depends on who joined first: both
    // "nodes" have the same host name and slot.)
    assert!(other_log.text().contains("world=2"), "{}", other_log.text());
    assert!(dir.path().join("node-1/tokenizer.json").is_file());
    assert!(shared.join("bundle/bundle.json").is_file());
}

#[test]
fn tokens_from_files_stay_out_of_command_lines_and_guard_the_status_page() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_job(dir.path(), "stages = [\"dvae\"]", "");
    let (job_token, status_token) = (
        dir.path().join("job.token"),
        dir.path().join("status.token"),
    );
    std::fs::write(&job_token, "file-job-token-0042\n").unwrap();
    std::fs::write(&status_token, "file-status-token-0042\n").unwrap();
    let launch = Running::spawn(
        Command::new(DALLE)
            .arg("--config")
            .arg(&config)
            .args(["--set", "dvae.train.steps=300"])
            .args(["launch", "--nproc", "2", "--status", "127.0.0.1:0"])
            .arg("--token-file")
            .arg(&job_token)
            .arg("--status-token-file")
            .arg(&status_token)
            .env_remove("DALLE_JOB_TOKEN")
            .env("NO_COLOR", "1"),
    );
    let started = launch
        .stderr
        .wait_for("job started", Duration::from_secs(60));
    let status = field(&started, "status")
        .trim_start_matches("Some(")
        .trim_end_matches(')')
        .to_string();
    launch
        .stderr
        .wait_for("stage starts", Duration::from_secs(60));
    // No process of the job shows the token in its command line.
    let pids: Vec<u32> = std::iter::once(launch.pid())
        .chain(children(launch.pid()))
        .collect();
    assert_eq!(pids.len(), 3);
    for pid in pids {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(!cmdline.contains("token-0042"), "pid {pid}: {cmdline}");
    }
    // The status page wants the status token, not the job's.
    let get = |authorization: &str| {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&status).unwrap();
        write!(stream, "GET / HTTP/1.1\r\nHost: x\r\n{authorization}\r\n").unwrap();
        let mut page = String::new();
        stream.read_to_string(&mut page).unwrap();
        page
    };
    assert!(get("").starts_with("HTTP/1.1 401"));
    assert!(get("Authorization: Bearer file-job-token-0042\r\n").starts_with("HTTP/1.1 401"));
    let page = get("Authorization: Bearer file-status-token-0042\r\n");
    assert!(
        page.starts_with("HTTP/1.1 200") && page.contains("phase:"),
        "{page}"
    );
    let log = launch.stderr.clone();
    assert!(launch.wait().success(), "{}", log.text());
}
