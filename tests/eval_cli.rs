//! `dalle eval` end to end on a tiny trained run: synthetic shapes with two
//! (colour, shape) pairs kept out, a held-out split, a few steps of each
//! stage, then the eval's report and pictures. The models are far too
//! small to be good; what is checked is that every figure is there, finite
//! and counted consistently, so the report can be trusted to describe a
//! real run.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

const DALLE: &str = env!("CARGO_BIN_EXE_dalle");

/// 512 scenes of 32 pixels, a fifth held out (the first 48 of them make
/// the validation set); a dVAE of 32 codes on a 4×4 grid; a one-layer
/// transformer.
const CONFIG: &str = r#"
[run]
dir = "RUN"
device = "cpu"
threads = 1

[synth]
count = 512
image_size = 32
rows_per_file = 256
rows_per_group = 64
unseen_combos = ["red star", "blue circle"]

[data]
decode_threads = 1

[data.validation]
fraction = 0.2
max_samples = 48

[dvae.model]
image_size = 32
n_hid = 8
n_blk_per_group = 1
vocab_size = 32
n_init = 16

[dvae.train]
steps = 12
batch_size = 8
log_every = 4
save_every = 0
recon = "mse"
lr = { start = 1e-3, end = 1e-4, steps = 12 }

[text]
vocab_size = 300
text_len = 16

[gpt.model]
dim = 32
depth = 1
heads = 2

[gpt.train]
steps = 10
batch_size = 16
log_every = 5
save_every = 0
lr = { start = 1e-3, end = 1e-4, steps = 10, warmup = 2 }
"#;

struct Run {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Run {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("job.toml");
        let run = dir.path().join("run");
        std::fs::write(&config, CONFIG.replace("RUN", run.to_str().unwrap())).unwrap();
        Self { dir, config }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn dalle(&self, args: &[&str]) -> Output {
        let started = Instant::now();
        let out = Command::new(DALLE)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        eprintln!("dalle {args:?}: {:.1} s", started.elapsed().as_secs_f64());
        out
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.dalle(args);
        assert!(
            out.status.success(),
            "dalle {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Trains every stage for a few steps; `gpt train` exports the bundle.
    fn train(&self) {
        for stage in [
            &["data", "synth"][..],
            &["dvae", "train"],
            &["text", "train-tokenizer"],
            &["data", "tokenize"],
            &["gpt", "train"],
        ] {
            self.ok(stage);
        }
        assert!(self.path("run/bundle/bundle.json").is_file());
    }
}

fn png_size(path: &Path) -> (u32, u32) {
    image::image_dimensions(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn number(v: &Value, path: &str) -> f64 {
    let mut at = v;
    for key in path.split('.') {
        at = &at[key];
    }
    let x = at
        .as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number: {at}"));
    assert!(x.is_finite(), "{path} = {x}");
    x
}

fn share(v: &Value, path: &str) -> f64 {
    let x = number(v, path);
    assert!((0.0..=1.0).contains(&x), "{path} = {x}");
    x
}

#[test]
fn eval_reports_every_section_of_a_trained_run() {
    let run = Run::new();
    run.train();
    let summary = run.ok(&[
        "eval",
        "--prompts",
        "4",
        "--samples-per-prompt",
        "3",
        "--probe-images",
        "320",
    ]);
    for words in [
        "PSNR",
        "mean colour",
        "codes",
        "held-out loss",
        "shape kind",
        "unseen",
    ] {
        assert!(summary.contains(words), "summary lacks {words}:\n{summary}");
    }
    let out = run.path("run/eval");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();

    // The validation set: its first 48 held-out samples, all synthetic.
    let held = &report["held_out"];
    assert_eq!(held["kind"], "validation", "{held}");
    assert_eq!(held["images"], 48);
    assert_eq!(held["synthetic_captions"], 48);

    let dvae = &report["dvae"];
    assert_eq!(dvae["images"], 48);
    for path in [
        "reconstruction.psnr",
        "reconstruction.ssim",
        "mean_colour_baseline.psnr",
        "dataset_mean_baseline.psnr",
        "psnr_over_mean_colour",
        "codebook.perplexity",
        "codebook.mean_distinct_per_batch",
    ] {
        number(dvae, path);
    }
    let margin = number(dvae, "reconstruction.psnr") - number(dvae, "mean_colour_baseline.psnr");
    assert!((margin - number(dvae, "psnr_over_mean_colour")).abs() < 1e-9);
    let codes = &dvae["codebook"];
    assert_eq!(codes["codebook_size"], 32);
    let distinct = codes["distinct"].as_i64().unwrap();
    assert!((1..=32).contains(&distinct), "{codes}");
    // Batches of dvae.train.batch_size: 48 / 8.
    assert_eq!(
        (codes["batch_size"].as_u64(), codes["batches"].as_u64()),
        (Some(8), Some(6))
    );
    assert!(number(dvae, "codebook.mean_distinct_per_batch") <= distinct as f64);
    assert!(number(dvae, "codebook.perplexity") <= distinct as f64 + 1e-9);
    assert_eq!(dvae["colours"]["images"], 48);
    // The grid: 32 of the images, 4 rows of 8 above their reconstructions.
    assert_eq!(
        png_size(&out.join("reconstructions.png")),
        (8 * 34 + 2, 8 * 34 + 2)
    );

    let gpt = &report["gpt"];
    assert_eq!(gpt["samples"], 48);
    assert!(gpt["model"].as_str().unwrap().ends_with("bundle"), "{gpt}");
    for kind in ["text", "image"] {
        let nats = number(gpt, &format!("{kind}.nats"));
        let bits = number(gpt, &format!("{kind}.bits"));
        assert!(nats > 0.0 && (bits - nats / std::f64::consts::LN_2).abs() < 1e-9);
    }
    let w = number(gpt, "text_loss_weight");
    let loss = w * number(gpt, "text.nats") + (1.0 - w) * number(gpt, "image.nats");
    assert!((number(gpt, "loss") - loss).abs() < 1e-9);

    // Fidelity: 4 prompts, half of them for the pairs kept out of training.
    let f = &report["fidelity"];
    assert_eq!(f["prompts"], 4);
    assert_eq!(f["samples_per_prompt"], 3);
    assert_eq!(f["seen_from"], "training captions");
    let unseen: Vec<&str> = f["unseen_combos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(
        unseen.contains(&"red star") && unseen.contains(&"blue circle"),
        "{unseen:?}"
    );
    let p = &report["probes"];
    assert_eq!(p["trained_on"], "training data");
    assert_eq!(p["ceiling_images"], 48);
    assert!(number(p, "images") <= 320.0);
    for attribute in ["background", "shape_colour", "shape_kind", "size"] {
        share(p, &format!("ceiling.{attribute}"));
        share(p, &format!("through_dvae.{attribute}"));
    }
    for part in ["all", "seen", "unseen"] {
        for attribute in ["background", "shape_colour", "shape_kind", "size"] {
            share(f, &format!("{part}.accuracy.{attribute}"));
        }
        share(f, &format!("{part}.all_four"));
    }
    assert_eq!(f["all"]["samples"], 12);
    assert_eq!(f["seen"]["samples"], 6);
    assert_eq!(f["unseen"]["samples"], 6);
    let rows = f["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    for row in rows {
        assert_eq!(row["judged"].as_array().unwrap().len(), 3, "{row}");
        let caption = row["caption"].as_str().unwrap();
        let is_unseen = unseen
            .iter()
            .any(|c| caption.contains(&format!(" {c} on ")));
        assert_eq!(row["unseen"].as_bool(), Some(is_unseen), "{caption}");
    }
    // The picture: one row of 3 samples per prompt, its captions beside it.
    assert_eq!(
        png_size(&out.join("fidelity.png")),
        (3 * 34 + 2, 4 * 34 + 2)
    );
    let captions: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("fidelity.json")).unwrap()).unwrap();
    let captions = captions.as_array().unwrap();
    assert_eq!(captions.len(), 4);
    assert_eq!(captions[2]["caption"], rows[2]["caption"]);

    // Named inputs, no fidelity, the report on stdout: only what applies.
    let json = run.ok(&[
        "eval",
        run.path("run/data").to_str().unwrap(),
        "--count",
        "16",
        "--prompts",
        "0",
        "--probe-images",
        "64",
        "--json-only",
        "--out",
        run.path("inputs-eval").to_str().unwrap(),
    ]);
    let report: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["held_out"]["kind"], "inputs");
    assert_eq!(report["dvae"]["images"], 16);
    assert_eq!(report["gpt"]["samples"], 16);
    assert!(report.get("fidelity").is_none());
    assert!(
        report["notes"][0].as_str().unwrap().contains("fidelity"),
        "{report}"
    );
    assert!(run.path("inputs-eval/eval.json").is_file());
}

#[test]
fn eval_without_a_transformer_measures_the_dvae_and_says_why() {
    let run = Run::new();
    run.ok(&["data", "synth"]);
    run.ok(&["dvae", "train", "--set", "dvae.train.steps=2"]);
    // No validation split: fresh synthetic scenes of another seed.
    let out = run.ok(&[
        "eval",
        "--count",
        "8",
        "--probe-images",
        "64",
        "--set",
        "data.validation.fraction=0",
    ]);
    assert!(out.contains("fresh synthetic scenes (seed 1)"), "{out}");
    assert!(out.contains("note: gpt and fidelity not measured"), "{out}");
    // The probes need no transformer: how much of each attribute the
    // dVAE's codes keep is measured all the same.
    assert!(out.contains("via dVAE"), "{out}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(run.path("run/eval/eval.json")).unwrap())
            .unwrap();
    assert_eq!(report["held_out"]["kind"], "synthetic");
    assert_eq!(report["dvae"]["images"], 8);
    assert!(report.get("gpt").is_none() && report.get("fidelity").is_none());
    assert_eq!(report["probes"]["ceiling_images"], 8);
    share(&report["probes"], "through_dvae.shape_kind");

    // A bundle asked for by name must load.
    let missing = run.path("nowhere");
    let failed = run.dalle(&["eval", "--bundle", missing.to_str().unwrap()]);
    assert!(!failed.status.success());
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(err.contains("nowhere"), "{err}");
}

#[test]
fn an_unseen_combo_that_names_no_colour_or_shape_is_refused_by_name() {
    let run = Run::new();
    for (entry, reason) in [
        ("pink star", "unknown shape colour `pink`"),
        ("red oval", "unknown shape `oval`"),
    ] {
        let text = std::fs::read_to_string(&run.config)
            .unwrap()
            .replace("\"blue circle\"", &format!("\"{entry}\""));
        let bad = run.path("bad.toml");
        std::fs::write(&bad, text).unwrap();
        let out = Command::new(DALLE)
            .arg("--config")
            .arg(&bad)
            .arg("config")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("`{entry}`")) && err.contains(reason),
            "{err}"
        );
    }
}
