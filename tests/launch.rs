//! `dalle launch` end to end: a coordinator and two real worker processes
//! over loopback run every stage of a tiny job data-parallel, and the job
//! ends with a sampler bundle.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DALLE: &str = env!("CARGO_BIN_EXE_dalle");

/// A tiny job in `dir`: its config file, with `run` added to its `[run]`
/// table and `extra` TOML appended.
fn tiny_job(dir: &Path, run_extra: &str, extra: &str) -> std::path::PathBuf {
    let run = dir.join("run");
    let config = dir.join("job.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[run]
dir = "{}"
device = "cpu"
verify_every = 5
{run_extra}

[synth]
count = 256
image_size = 16
rows_per_file = 64
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
steps = 10
batch_size = 8
log_every = 5
save_every = 0

[text]
vocab_size = 300
text_len = 24

[gpt.model]
dim = 32
depth = 1
heads = 2
attention = "dense"

[gpt.train]
steps = 10
batch_size = 8
log_every = 5
save_every = 0
{extra}
"#,
            run.display()
        ),
    )
    .unwrap();
    config
}

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

/// A dVAE stage long enough to kill a worker in, with the sample ledger on.
const STAGE1_LONG: [&str; 6] = [
    "--set",
    "dvae.train.steps=600",
    "--set",
    "dvae.train.batch_size=6",
    "--set",
    "run.ledger=true",
];

/// The sample keys of every dVAE step in a run's ledger; a step done more
/// than once (before and after a re-formation) counts as done by the
/// smaller, later group.
fn ledger(run: &Path) -> std::collections::BTreeMap<u64, Vec<String>> {
    let mut by_step: std::collections::BTreeMap<u64, (u64, Vec<String>)> = Default::default();
    for entry in std::fs::read_dir(run.join("ledger")).unwrap().flatten() {
        if !entry.file_name().to_string_lossy().starts_with("dvae-") {
            continue;
        }
        for line in std::fs::read_to_string(entry.path()).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let (step, world) = (v["step"].as_u64().unwrap(), v["world"].as_u64().unwrap());
            let keys = v["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap().to_string());
            let slot = by_step.entry(step).or_insert((world, Vec::new()));
            if world < slot.0 {
                *slot = (world, Vec::new());
            }
            if world == slot.0 {
                slot.1.extend(keys);
            }
        }
    }
    by_step
        .into_iter()
        .map(|(step, (_, mut keys))| {
            keys.sort();
            (step, keys)
        })
        .collect()
}

/// The newest committed checkpoint step of a stage, if any.
fn committed(run: &Path, stage: &str) -> Option<u64> {
    std::fs::read_dir(run.join("checkpoints").join(stage))
        .ok()?
        .flatten()
        .filter(|e| e.path().join("manifest.json").is_file())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .max()
}

/// The worker processes a launcher started.
fn children(pid: u32) -> Vec<u32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn a_killed_worker_is_replaced_by_resuming_the_survivors_from_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // A dVAE stage long enough to be killed in, checkpointed every 20 steps.
    let config = tiny_job(dir.path(), "", "[checkpoint]\nevery = 20\n");
    let mut launch = Command::new(DALLE)
        .arg("--config")
        .arg(&config)
        .args(STAGE1_LONG)
        .args(["launch", "--nproc", "3", "--min-workers", "2"])
        .args(["--heartbeat-timeout-secs", "3"])
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Ready: a checkpoint is committed and the three workers run.
    let deadline = Instant::now() + Duration::from_secs(120);
    while committed(&run, "dvae").is_none() || children(launch.id()).len() < 3 {
        assert!(Instant::now() < deadline, "no checkpoint within 2 minutes");
        assert!(launch.try_wait().unwrap().is_none(), "launch ended early");
        // Poll the readiness conditions above without spinning a core.
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = committed(&run, "dvae").unwrap();
    let victim = children(launch.id())[2];
    Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();

    let out = launch.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the job failed after losing a worker:\n{stderr}"
    );
    assert!(
        stdout.contains("with 2 workers (generation 2, 1 restarts)"),
        "{stdout}"
    );
    // The launcher saw its worker die and told the coordinator, which did
    // not wait for the heartbeat timeout to drop it.
    assert!(stderr.contains("exited: signal: 9"), "{stderr}");
    // The survivors went on from a committed checkpoint, not from scratch.
    let resumed: Vec<u64> = stderr
        .lines()
        .filter(|l| l.contains("resuming from a checkpoint") && l.contains("stage=dvae"))
        .filter_map(|l| {
            l.split("step=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(
        !resumed.is_empty() && resumed.iter().all(|&s| s >= before),
        "{stderr}"
    );
    assert!(run.join("bundle/bundle.json").is_file());

    // The sample ledger: every step, before and after the failure, trained on
    // exactly the samples an uninterrupted run trains on (none lost, none
    // twice), whatever the world size. The reference runs the dVAE alone.
    let reference_job = dir.path().join("reference");
    std::fs::create_dir_all(&reference_job).unwrap();
    let reference_config = tiny_job(
        &reference_job,
        "stages = [\"dvae\"]",
        "[checkpoint]\nevery = 20\n",
    );
    let reference = reference_job.join("run");
    let out = Command::new(DALLE)
        .arg("--config")
        .arg(&reference_config)
        .args(STAGE1_LONG)
        .args(["launch", "--nproc", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Only the planned stage ran.
    assert!(reference.join("dvae.safetensors").is_file());
    assert!(!reference.join("tokenizer.json").exists());
    let (survived, uninterrupted) = (ledger(&run), ledger(&reference));
    assert_eq!(uninterrupted.len(), 600);
    assert_eq!(survived, uninterrupted, "the samples of some step differ");
    let all: Vec<&String> = uninterrupted.values().flatten().collect();
    assert!(all.iter().all(|k| !k.is_empty()) && all.len() == 600 * 6);
}

/// Lines a child process writes, collected by a thread as they come.
#[derive(Clone, Default)]
struct Log(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Log {
    fn follow(stream: impl std::io::Read + Send + 'static) -> Self {
        let log = Log::default();
        let lines = log.0.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stream)
                .lines()
                .map_while(Result::ok)
            {
                lines.lock().unwrap().push(line);
            }
        });
        log
    }

    fn text(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }

    /// The first line containing `needle`, once it comes (or fails after
    /// `limit` with the log so far).
    fn wait_for(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self.0.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no line with {needle:?} within {limit:?}:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The value after `key=` in a log line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(&format!("{key}="))
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
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

/// A child process with both outputs followed as they come (a pipe nobody
/// reads fills up and blocks it), killed if the test fails before it ends.
struct Running {
    child: std::process::Child,
    stdout: Log,
    stderr: Log,
}

impl Running {
    fn spawn(command: &mut Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = Log::follow(child.stdout.take().unwrap());
        let stderr = Log::follow(child.stderr.take().unwrap());
        Running {
            child,
            stdout,
            stderr,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait(mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

struct KillPid(u32);

impl Drop for KillPid {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.0.to_string()])
            .status();
    }
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
