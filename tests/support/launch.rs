//! The pieces of the tests that run `dalle launch`: a tiny job, the run's
//! checkpoints and sample ledger, the launcher's worker processes, and the
//! output of child processes followed as it comes.
// Each test binary uses its own part of these.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The dalle executable of this build.
pub const DALLE: &str = env!("CARGO_BIN_EXE_dalle");

/// A tiny job in `dir`: its config file, with `run` added to its `[run]`
/// table and `extra` TOML appended.
pub fn tiny_job(dir: &Path, run_extra: &str, extra: &str) -> std::path::PathBuf {
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

/// A dVAE stage long enough to kill a worker in, with the sample ledger on.
pub const STAGE1_LONG: [&str; 6] = [
    "--set",
    "dvae.train.steps=600",
    "--set",
    "dvae.train.batch_size=6",
    "--set",
    "run.ledger=true",
];

/// The sample keys of every dVAE step in a run's ledger, sorted. A step
/// done more than once (before a failure and again after the re-formation)
/// counts as the highest generation that did it trained it.
pub fn ledger(run: &Path) -> std::collections::BTreeMap<u64, Vec<String>> {
    let mut by_step: std::collections::BTreeMap<u64, (u64, Vec<String>)> = Default::default();
    for entry in std::fs::read_dir(run.join("ledger")).unwrap().flatten() {
        if !entry.file_name().to_string_lossy().starts_with("dvae-") {
            continue;
        }
        for line in std::fs::read_to_string(entry.path()).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let step = v["step"].as_u64().unwrap();
            let generation = v["generation"].as_u64().unwrap();
            let keys = v["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap().to_string());
            let slot = by_step.entry(step).or_insert((generation, Vec::new()));
            if generation > slot.0 {
                *slot = (generation, Vec::new());
            }
            if generation == slot.0 {
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
pub fn committed(run: &Path, stage: &str) -> Option<u64> {
    std::fs::read_dir(run.join("checkpoints").join(stage))
        .ok()?
        .flatten()
        .filter(|e| e.path().join("manifest.json").is_file())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .max()
}

/// The worker processes a launcher started.
pub fn children(pid: u32) -> Vec<u32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Lines a child process writes, collected by a thread as they come.
#[derive(Clone, Default)]
pub struct Log(pub std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Log {
    pub fn follow(stream: impl std::io::Read + Send + 'static) -> Self {
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

    pub fn text(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }

    /// The first line containing `needle`, once it comes (or fails after
    /// `limit` with the log so far).
    pub fn wait_for(&self, needle: &str, limit: Duration) -> String {
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
pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(&format!("{key}="))
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

/// A child process with both outputs followed as they come (a pipe nobody
/// reads fills up and blocks it), killed if the test fails before it ends.
pub struct Running {
    pub child: std::process::Child,
    pub stdout: Log,
    pub stderr: Log,
}

impl Running {
    pub fn spawn(command: &mut Command) -> Self {
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn wait(mut self) -> std::process::ExitStatus {
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

pub struct KillPid(pub u32);

impl Drop for KillPid {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.0.to_string()])
            .status();
    }
}
