//! `dalle plan` and the fit check of `dalle launch`, run as a user would.

use std::path::Path;
use std::process::{Command, Output};

const DALLE: &str = env!("CARGO_BIN_EXE_dalle");

/// A tiny job of every training stage, on CPU.
fn tiny_job(dir: &Path) -> std::path::PathBuf {
    let config = dir.join("job.toml");
    let text = format!(
        r#"
[run]
dir = "{}"
device = "cpu"
stages = ["dvae", "tokenizer", "pretokenize", "gpt", "rerank", "export"]

[dvae.model]
image_size = 16
n_hid = 8
n_blk_per_group = 1
vocab_size = 16
n_init = 8

[dvae.train]
batch_size = 8

[text]
vocab_size = 300
text_len = 24

[gpt.model]
dim = 32
depth = 1
heads = 2
attention = "dense"

[gpt.train]
batch_size = 8

[rerank.model]
image_width = 8
dim = 16
depth = 1
heads = 2
embed_dim = 16

[rerank.train]
batch_size = 8
"#,
        dir.join("run").display()
    );
    std::fs::write(&config, text).unwrap();
    config
}

fn dalle(config: &Path, args: &[&str]) -> Output {
    Command::new(DALLE)
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The paper's transformer, over the tiny job.
const PAPER_GPT: [&str; 6] = [
    "--set",
    "gpt.model.dim=3968",
    "--set",
    "gpt.model.depth=64",
    "--set",
    "gpt.model.heads=62",
];

#[test]
fn plan_prints_each_training_stages_figures_and_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_job(dir.path());
    let out = dalle(&config, &["plan", "--nproc", "2"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for part in [
        "memory plan: 2 ranks (2 on this machine) on cpu",
        "available memory",
        "stage dvae",
        "stage gpt",
        "stage rerank",
        "4 samples per rank a step (batch 8 over 2 ranks)",
        "parameters (4 B each)",
        "gradients (4 B each)",
        "AdamW moments (8 B each)",
        "activations (4 per pass)",
        "runtime allowance",
        "total by setting",
        "sharding optimizer",
        "checkpointing on",
        "every stage fits",
    ] {
        assert!(stdout.contains(part), "`{part}` missing from\n{stdout}");
    }
    // Stages that do not train have no figures.
    assert!(!stdout.contains("stage tokenizer"), "{stdout}");
    // The transformer's parameters: embeddings of 300 BPE ids + 24 pads +
    // BOS, 25 text positions, 16 codes and 2 × 2 grid lines; one block;
    // the final norm; both heads.
    let (d, t) = (32, 300 + 24);
    let block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d);
    let params = (t + 1 + 25 + 16 + 4) * d + block + 2 * d + (d * t + t) + (d * 16 + 16);
    let shown = format!("stage gpt: {:.1} k parameters", params as f64 / 1e3);
    assert!(stdout.contains(&shown), "`{shown}` missing from\n{stdout}");
}

#[test]
fn plan_refuses_a_device_too_small_naming_the_stage() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_job(dir.path());
    let out = dalle(&config, &["plan", "--device-memory-gib", "0.001"]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("does NOT fit"), "{stdout}");
    assert!(
        stderr.contains("stage dvae does not fit: one rank needs")
            && stderr.contains("but has 1.0 MiB (--device-memory-gib 0.001)"),
        "{stderr}"
    );
}

/// `dalle plan` of the paper's transformer at batch 1024 on `nproc` H200s:
/// it must fail; returns its stderr.
fn plan_paper_transformer(nproc: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_job(dir.path());
    let mut args = PAPER_GPT.to_vec();
    args.extend([
        "--set",
        "gpt.train.batch_size=1024",
        "--set",
        "run.device=cuda",
        "plan",
        "--nproc",
        nproc,
        "--device-memory-gib",
        "141",
    ]);
    let out = dalle(&config, &args);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("on cuda"), "{stdout}");
    assert!(stdout.contains("stage gpt: 12."), "{stdout}");
    assert!(stderr.contains("stage gpt does not fit"), "{stderr}");
    stderr
}

#[test]
fn plan_says_what_would_make_the_paper_transformer_fit() {
    // Over 8 ranks, sharding the gradients as well as the moments brings
    // its 12 B parameters' training state to 5.6 + 11.3 GiB per rank.
    let stderr = plan_paper_transformer("8");
    assert!(
        stderr.contains("it would fit with run.sharding = \"gradients\""),
        "{stderr}"
    );
}

#[test]
fn plan_says_what_would_make_the_paper_transformer_fit_on_fewer_ranks() {
    let stderr = plan_paper_transformer("4");
    assert!(
        stderr.contains("gpt.train.activation_checkpointing = true"),
        "{stderr}"
    );
    assert!(stderr.contains("gpt.train.micro_batch = "), "{stderr}");
}

#[test]
fn the_h200_config_fits_eight_h200s() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/h200x8-1b.toml");
    let out = dalle(
        &config,
        &["plan", "--nproc", "8", "--device-memory-gib", "141"],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("stage gpt: 1.01 B parameters"), "{stdout}");
    assert!(stdout.contains("every stage fits"), "{stdout}");
    // The figures in the config's comments are what the command prints.
    let comments: String = std::fs::read_to_string(&config)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| format!("{}\n", l.strip_prefix(' ').unwrap_or(l)))
        .collect();
    assert!(
        comments.contains(&stdout),
        "configs/h200x8-1b.toml's figures are stale; paste\n{stdout}"
    );
}

#[test]
fn launch_refuses_a_job_that_does_not_fit_before_starting_workers() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_job(dir.path());
    // The paper's transformer on this machine's CPU.
    let mut args = PAPER_GPT.to_vec();
    args.extend(["launch", "--nproc", "1"]);
    let out = dalle(&config, &args);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("stage gpt does not fit") && stderr.contains("--no-plan-check"),
        "{stderr}"
    );
    // Nothing started: no synthetic data, no run directory.
    assert!(!dir.path().join("run").exists());
}
