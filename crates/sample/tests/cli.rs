//! `dalle-sample` as a user runs it: a real process on a bundle written by
//! the library, good input and bad.

use dalle_model::dvae::{Dvae, DvaeConfig};
use dalle_model::gpt::sample::SamplingConfig;
use dalle_model::gpt::{AttentionLayout, Gpt, GptArch, GptConfig};
use dalle_model::text::{TextConfig, TextTokenizer};
use dalle_sample::bundle::{self, Parts};
use dalle_store::{Location, StoreConfig};
use std::path::Path;
use std::process::{Command, Output};
use tch::Device;

const SAMPLE: &str = env!("CARGO_BIN_EXE_dalle-sample");

/// The serialised parts of a tiny random bundle; `image_vocab` lets a test
/// make a transformer that does not fit the dVAE.
fn parts(image_vocab: i64) -> Parts {
    let captions = [
        "a red circle",
        "a blue square",
        "a green star on a red background",
    ];
    let text = TextConfig {
        vocab_size: 300,
        text_len: 8,
        ..TextConfig::default()
    };
    let tokenizer = TextTokenizer::train(captions.iter().map(|c| c.to_string()), &text).unwrap();
    tch::manual_seed(0);
    let dvae = DvaeConfig {
        image_size: 16,
        n_hid: 8,
        n_blk_per_group: 1,
        vocab_size: 32,
        n_init: 8,
        ..DvaeConfig::default()
    };
    let decoder = Dvae::new(dvae, Device::Cpu)
        .unwrap()
        .decoder_bytes()
        .unwrap();
    let gpt = Gpt::new(
        GptConfig {
            arch: GptArch {
                dim: 16,
                depth: 1,
                heads: 2,
                attention: AttentionLayout::Dense,
                ..GptArch::default()
            },
            text_vocab: tokenizer.vocab_size() as i64,
            text_len: 8,
            image_vocab,
            image_grid: 2,
        },
        Device::Cpu,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpt.safetensors");
    gpt.save(&path).unwrap();
    Parts {
        dvae_decoder: decoder,
        gpt: std::fs::read(&path).unwrap(),
        tokenizer: tokenizer.to_json().unwrap(),
        sampling: SamplingConfig::default(),
    }
}

fn write_bundle(dir: &Path, parts: Parts) {
    let location = Location::parse(dir.to_str().unwrap(), &StoreConfig::default()).unwrap();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(bundle::write(&location, parts))
        .unwrap();
}

fn sample(args: &[&str]) -> Output {
    Command::new(SAMPLE).args(args).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn writes_one_png_per_image_and_a_grid_per_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    write_bundle(&bundle, parts(32));
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "# a comment\na blue square\n\n").unwrap();
    let out_dir = dir.path().join("out");
    let out = sample(&[
        bundle.to_str().unwrap(),
        "--prompt",
        "A Red Circle!",
        "--prompts-file",
        prompts.to_str().unwrap(),
        "-n",
        "3",
        "--batch-size",
        "4",
        "--guidance-scale",
        "2",
        "--out",
        out_dir.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("6 images for 2 prompts") && stdout.contains("images/s"),
        "{stdout}"
    );
    let mut files: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    files.sort();
    let expected: Vec<String> = [
        "001-a-red-circle-01.png",
        "001-a-red-circle-02.png",
        "001-a-red-circle-03.png",
        "001-a-red-circle-grid.png",
        "002-a-blue-square-01.png",
        "002-a-blue-square-02.png",
        "002-a-blue-square-03.png",
        "002-a-blue-square-grid.png",
    ]
    .map(String::from)
    .to_vec();
    assert_eq!(files, expected);
    let image = image::open(out_dir.join("001-a-red-circle-01.png")).unwrap();
    assert_eq!((image.width(), image.height()), (16, 16));
}

#[test]
fn bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    write_bundle(&bundle, parts(32));
    let b = bundle.to_str().unwrap();

    let out = sample(&[b, "--prompts-file", "/nonexistent/prompts.txt"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent/prompts.txt"),
        "{}",
        stderr(&out)
    );

    let out = sample(&[b]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no prompts"), "{}", stderr(&out));

    let out = sample(&[dir.path().join("nothing").to_str().unwrap(), "-p", "x"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("dalle export"), "{}", stderr(&out));

    // A transformer over another image vocabulary than the decoder's.
    let other = dir.path().join("other");
    write_bundle(&other, parts(64));
    let mismatched = parts(32);
    std::fs::write(
        other.join("dvae-decoder.safetensors"),
        mismatched.dvae_decoder,
    )
    .unwrap();
    let out = sample(&[other.to_str().unwrap(), "-p", "x"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("does not match the transformer") && err.contains("64 codes"),
        "{err}"
    );

    // A part missing.
    std::fs::remove_file(bundle.join("gpt.safetensors")).unwrap();
    let out = sample(&[b, "-p", "x"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("incomplete") && err.contains("gpt.safetensors"),
        "{err}"
    );
}
