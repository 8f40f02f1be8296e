//! Datasets on a real S3-compatible server (Garage on loopback): read where
//! they lie, with the same results as the same files on local disk.

mod support;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};
use std::process::{Command, Output};
use support::garage::Garage;

const DALLE: &str = env!("CARGO_BIN_EXE_dalle");

fn dalle(garage: &Garage, args: &[String]) -> Output {
    Command::new(DALLE)
        .envs(garage.env())
        .args(args)
        .output()
        .unwrap()
}

fn ok(garage: &Garage, args: &[String]) -> String {
    let out = dalle(garage, args);
    assert!(
        out.status.success(),
        "dalle {args:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Uploads every file of `dir` under `prefix` in the test bucket.
fn upload(garage: &Garage, dir: &std::path::Path, prefix: &str) {
    let store = garage.store();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let key = ObjectPath::from(format!(
                "{prefix}/{}",
                path.file_name().unwrap().to_str().unwrap()
            ));
            store
                .put(&key, PutPayload::from(std::fs::read(&path).unwrap()))
                .await
                .unwrap();
        }
    });
}

#[test]
fn datasets_on_s3_read_like_local_ones() {
    let garage = Garage::start();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let local = run.join("data");
    let common = [
        "--set".to_string(),
        format!("run.dir={}", run.display()),
        "--set".into(),
        "run.device=cpu".into(),
        "--set".into(),
        "synth.count=48".into(),
        "--set".into(),
        "synth.rows_per_file=16".into(),
        "--set".into(),
        "synth.rows_per_group=8".into(),
        "--set".into(),
        "dvae.model.n_hid=8".into(),
        "--set".into(),
        "dvae.model.vocab_size=64".into(),
        "--set".into(),
        "dvae.train.batch_size=8".into(),
        "--set".into(),
        "dvae.train.steps=2".into(),
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        common
            .iter()
            .cloned()
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };

    let v = with(&["data", "synth"]);
    ok(&garage, &v);
    upload(&garage, &local, "shapes");
    let v = with(&["dvae", "train"]);
    ok(&garage, &v);

    // The same samples, in the same order, from S3 (prefix and glob) and disk.
    let encode = |input: &str, out: &str| {
        let out = dir.path().join(out);
        let v = with(&[
            "dvae",
            "encode",
            "--limit",
            "20",
            "--out",
            out.to_str().unwrap(),
            input,
        ]);
        ok(&garage, &v);
        std::fs::read_to_string(out).unwrap()
    };
    let from_disk = encode(local.to_str().unwrap(), "local.jsonl");
    assert_eq!(from_disk.lines().count(), 20);
    assert_eq!(encode("s3://dalle-test/shapes/", "s3.jsonl"), from_disk);
    assert_eq!(
        encode("s3://dalle-test/shapes/part-*.parquet", "glob.jsonl"),
        from_disk
    );

    // Training reads its batches from S3 (a fresh run: the first one's
    // checkpoints would otherwise resume it at its end).
    let v = with(&[
        "--set",
        "data.url=s3://dalle-test/shapes/",
        "--set",
        "checkpoint.resume=false",
        "--set",
        "checkpoint.overwrite=true",
        "dvae",
        "train",
    ]);
    assert!(ok(&garage, &v).contains("trained 2 steps"));

    // Pre-tokenization from S3 to S3, one token file per input file.
    let v = with(&[
        "data",
        "tokenize",
        "--input",
        "s3://dalle-test/shapes/",
        "--out",
        "s3://dalle-test/tokens/",
    ]);
    let out = ok(&garage, &v);
    assert!(
        out.contains("tokenized 48 samples into 3 files at s3://dalle-test/tokens/"),
        "{out}"
    );
    let v = with(&[
        "dvae",
        "encode",
        "--limit",
        "1",
        "--out",
        "/dev/null",
        "s3://dalle-test/tokens/",
    ]);
    let err = String::from_utf8_lossy(&dalle(&garage, &v).stderr).into_owned();
    assert!(
        err.contains("s3://dalle-test/tokens/part-00000.parquet") && err.contains("image column"),
        "{err}"
    );

    // Nothing there, or no such bucket: errors that name the URL.
    let v = with(&[
        "--set",
        "data.url=s3://dalle-test/nothing/",
        "dvae",
        "train",
    ]);
    let out = dalle(&garage, &v);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("s3://dalle-test/nothing/"),
        "{err}"
    );
    let v = with(&["--set", "data.url=s3://no-such-bucket/x/", "dvae", "train"]);
    let out = dalle(&garage, &v);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("s3://no-such-bucket/x/"),
        "{err}"
    );
}
