//! The dVAE commands end to end, as a user runs them: real processes,
//! real files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const DALLE: &str = env!("CARGO_BIN_EXE_dalle");

struct Job {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Job {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("job.toml");
        let run = dir.path().join("run");
        std::fs::write(
            &config,
            format!(
                r#"
[run]
dir = "{}"
device = "cpu"
threads = 1

[synth]
count = 96
image_size = 32
rows_per_file = 64
rows_per_group = 16

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
lr = {{ start = 1e-3, end = 1e-4, steps = 12 }}
"#,
                run.display()
            ),
        )
        .unwrap();
        Self { dir, config }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn dalle(&self, args: &[&str]) -> Output {
        Command::new(DALLE)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap()
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

    fn fails(&self, args: &[&str]) -> String {
        let out = self.dalle(args);
        assert!(!out.status.success(), "dalle {args:?} should fail");
        String::from_utf8(out.stderr).unwrap()
    }
}

fn png_size(path: &Path) -> (u32, u32) {
    image::image_dimensions(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn synth_train_reconstruct_encode_decode() {
    let job = Job::new();
    let out = job.ok(&["data", "synth"]);
    assert!(out.contains("96 samples in 2 files"), "{out}");

    let out = job.ok(&["dvae", "train"]);
    assert!(out.contains("trained 12 steps"), "{out}");
    assert!(job.path("run/dvae.safetensors").is_file());
    let metrics = std::fs::read_to_string(job.path("run/dvae-metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines
            .iter()
            .map(|l| l["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [4, 8, 12]
    );
    for key in [
        "loss",
        "recon",
        "psnr",
        "kl",
        "tau",
        "beta",
        "lr",
        "codes_used",
        "code_perplexity",
        "images_per_s",
        "data_wait",
    ] {
        assert!(
            lines[2][key].is_number(),
            "metrics lack {key}: {}",
            lines[2]
        );
    }

    let out = job.ok(&["dvae", "reconstruct", "--count", "8"]);
    assert!(
        out.contains("PSNR") && out.contains("mean colour") && out.contains("mean image"),
        "{out}"
    );
    // One row of 8 originals over one row of their reconstructions.
    assert_eq!(
        png_size(&job.path("run/reconstructions.png")),
        (8 * 34 + 2, 2 * 34 + 2)
    );

    let tokens = job.path("tokens.jsonl");
    let data = job.path("run/data");
    job.ok(&[
        "dvae",
        "encode",
        "--limit",
        "5",
        "--out",
        tokens.to_str().unwrap(),
        data.to_str().unwrap(),
    ]);
    let grids: Vec<serde_json::Value> = std::fs::read_to_string(&tokens)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(grids.len(), 5);
    assert_eq!(grids[0]["key"], "000000000");
    let ids = grids[0]["tokens"].as_array().unwrap();
    assert_eq!(ids.len(), 16, "a 4×4 grid for 32×32 images");
    assert!(ids.iter().all(|t| (0..32).contains(&t.as_i64().unwrap())));

    // Pre-tokenization: every sample, same tokens as `encode`, per input file.
    let out = job.ok(&[
        "data",
        "tokenize",
        "--out",
        job.path("tokens").to_str().unwrap(),
    ]);
    assert!(out.contains("tokenized 96 samples into 2 files"), "{out}");
    let file = std::fs::File::open(job.path("tokens/part-00000.parquet")).unwrap();
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let batch = reader.build().unwrap().next().unwrap().unwrap();
    use arrow_array::cast::AsArray;
    let keys = batch.column_by_name("key").unwrap().as_string::<i32>();
    let lists = batch.column_by_name("tokens").unwrap().as_fixed_size_list();
    assert_eq!(lists.value_length(), 16);
    for (i, grid) in grids.iter().enumerate() {
        assert_eq!(keys.value(i), grid["key"].as_str().unwrap());
        let ours: Vec<i64> = lists
            .value(i)
            .as_primitive::<arrow_array::types::UInt16Type>()
            .values()
            .iter()
            .map(|&t| i64::from(t))
            .collect();
        let encoded: Vec<i64> = grid["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_i64().unwrap())
            .collect();
        assert_eq!(ours, encoded, "tokens of {}", keys.value(i));
    }

    let decoded = job.path("decoded.png");
    job.ok(&[
        "dvae",
        "decode",
        "--tokens",
        tokens.to_str().unwrap(),
        "--out",
        decoded.to_str().unwrap(),
    ]);
    assert_eq!(png_size(&decoded), (5 * 34 + 2, 34 + 2));
}

#[test]
fn bad_input_gives_errors_naming_the_culprit() {
    let job = Job::new();
    let missing = job.path("nowhere.safetensors");
    let err = job.fails(&[
        "dvae",
        "reconstruct",
        "--weights",
        missing.to_str().unwrap(),
    ]);
    assert!(err.contains("nowhere.safetensors"), "{err}");

    // Weights for the decode checks below.
    job.ok(&["data", "synth"]);
    job.ok(&["dvae", "train", "--set", "dvae.train.steps=1"]);

    let junk = job.path("junk.png");
    std::fs::write(&junk, b"not an image at all").unwrap();
    let err = job.fails(&[
        "dvae",
        "encode",
        "--out",
        "/dev/null",
        junk.to_str().unwrap(),
    ]);
    assert!(err.contains("junk.png"), "{err}");

    let tokens = job.path("bad.jsonl");
    let line = format!(
        "{{\"key\":\"a\",\"grid\":[4,4],\"tokens\":[{}99]}}\n",
        "0,".repeat(15)
    );
    std::fs::write(&tokens, line).unwrap();
    let err = job.fails(&[
        "dvae",
        "decode",
        "--tokens",
        tokens.to_str().unwrap(),
        "--out",
        "/dev/null",
    ]);
    assert!(err.contains("bad.jsonl:1") && err.contains("99"), "{err}");

    let err = job.fails(&["dvae", "train", "--set", "dvae.train.stepz=3"]);
    assert!(err.contains("stepz"), "{err}");

    let err = job.fails(&["dvae", "train", "--set", "data.url=/does/not/exist"]);
    assert!(err.contains("/does/not/exist"), "{err}");
}
