//! `dalle launch` end to end: a coordinator and two real worker processes
//! over loopback run every stage of a tiny job data-parallel, and the job
//! ends with a sampler bundle.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DALLE: &str = env!("CARGO_BIN_EXE_dalle");

/// A tiny job in `dir`: its config file, with `extra` TOML appended.
fn tiny_job(dir: &Path, extra: &str) -> std::path::PathBuf {
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
    let config = tiny_job(dir.path(), "");
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
    let lines = |rank: usize| -> Vec<String> {
        stderr
            .lines()
            .filter(|l| l.contains("dalle_train::gpt") && l.contains("| loss"))
            .filter(|l| l.trim_end().ends_with(&format!("rank={rank}")))
            .map(|l| {
                l.split("| loss")
                    .nth(1)
                    .unwrap()
                    .split('|')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    assert_eq!(lines(0).len(), 2, "{stderr}");
    assert_eq!(lines(0), lines(1), "the ranks logged different losses");
    // Every stage left its output; the tokens were split across the ranks.
    for file in [
        "dvae.safetensors",
        "tokenizer.json",
        "gpt.safetensors",
        "bundle/bundle.json",
    ] {
        assert!(run.join(file).is_file(), "{file} is missing");
    }
    let token_files = std::fs::read_dir(run.join("tokens")).unwrap().count();
    assert_eq!(
        token_files, 4,
        "every one of the 4 data files is tokenized once"
    );
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
    let config = tiny_job(dir.path(), "[checkpoint]\nevery = 20\n");
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
    // twice), whatever the world size.
    let reference = dir.path().join("reference");
    let out = Command::new(DALLE)
        .arg("--config")
        .arg(&config)
        .args(["--set", &format!("run.dir={}", reference.display())])
        .args(STAGE1_LONG)
        .args(["launch", "--nproc", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (survived, uninterrupted) = (ledger(&run), ledger(&reference));
    assert_eq!(uninterrupted.len(), 600);
    assert_eq!(survived, uninterrupted, "the samples of some step differ");
    let all: Vec<&String> = uninterrupted.values().flatten().collect();
    assert!(all.iter().all(|k| !k.is_empty()) && all.len() == 600 * 6);
}
