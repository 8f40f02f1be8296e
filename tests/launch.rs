//! `dalle launch` end to end: a coordinator and two real worker processes
//! over loopback run every stage of a tiny job data-parallel, and the job
//! ends with a sampler bundle.

use std::process::Command;

const DALLE: &str = env!("CARGO_BIN_EXE_dalle");

#[test]
fn two_workers_run_the_whole_job() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let config = dir.path().join("job.toml");
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
"#,
            run.display()
        ),
    )
    .unwrap();
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
