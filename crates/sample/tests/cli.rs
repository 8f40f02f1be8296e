//! `dalle-sample` as a user runs it: a real process on a bundle written by
//! the library, good input and bad.

use dalle_model::dvae::{Dvae, DvaeConfig};
use dalle_model::gpt::sample::SamplingConfig;
use dalle_model::gpt::{AttentionLayout, Gpt, GptArch, GptConfig};
use dalle_model::rerank::{RerankArch, RerankConfig, Reranker};
use dalle_model::text::{TextConfig, TextTokenizer};
use dalle_precision::Precision;
use dalle_sample::bundle::{self, Bundle, Parts};
use dalle_sample::generate::{Request, generate};
use dalle_store::{Location, StoreConfig};
use std::path::Path;
use std::process::{Command, Output};
use tch::{Device, Kind, Tensor};

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
        reranker: None,
        sampling: SamplingConfig::default(),
    }
}

/// A tiny random reranker's weights file, for captions of `text_len`
/// positions over the parts' tokenizer and images of `image_size` pixels.
fn reranker(parts: &Parts, text_len: i64, image_size: i64) -> Vec<u8> {
    let tokenizer = TextTokenizer::from_json(parts.tokenizer.as_bytes(), "test").unwrap();
    tch::manual_seed(1);
    let model = Reranker::new(
        RerankConfig {
            arch: RerankArch {
                image_width: 8,
                dim: 16,
                depth: 1,
                heads: 2,
                embed_dim: 8,
            },
            text_vocab: tokenizer.vocab_size() as i64,
            text_len,
            image_size,
        },
        Device::Cpu,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reranker.safetensors");
    model.save(&path).unwrap();
    std::fs::read(&path).unwrap()
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

fn load_bundle(dir: &Path) -> anyhow::Result<Bundle> {
    let location = Location::parse(dir.to_str().unwrap(), &StoreConfig::default()).unwrap();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(Bundle::load(&location, Device::Cpu))
}

/// The parts with a fitting tiny reranker.
fn parts_with_reranker() -> Parts {
    let mut parts = parts(32);
    parts.reranker = Some(reranker(&parts, 8, 16));
    parts
}

#[test]
fn a_bundle_carries_its_reranker_and_older_ones_load_without() {
    let dir = tempfile::tempdir().unwrap();
    let with = dir.path().join("with");
    let fitting = parts_with_reranker();
    let weights = fitting.reranker.clone().unwrap();
    fitting.check_reranker(16, "test reranker").unwrap();
    write_bundle(&with, fitting);
    assert_eq!(std::fs::read(with.join(bundle::RERANKER)).unwrap(), weights);
    let loaded = load_bundle(&with).unwrap();
    assert_eq!(loaded.manifest.reranker.as_deref(), Some(bundle::RERANKER));
    let reranker = loaded.reranker.as_ref().expect("the bundle's reranker");
    let original = Reranker::from_weights(
        &dalle_model::weights::from_bytes(&weights, Path::new("original")).unwrap(),
        Device::Cpu,
    )
    .unwrap();
    assert_eq!(reranker.config(), original.config());
    let images = Tensor::rand([2, 3, 16, 16], (Kind::Float, Device::Cpu));
    let ids = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8]).view([2, 8]);
    assert!(
        reranker
            .score(&images, &ids)
            .unwrap()
            .equal(&original.score(&images, &ids).unwrap())
    );

    // Without one, the manifest does not mention it: as bundles written
    // before rerankers existed, which must still load.
    let without = dir.path().join("without");
    write_bundle(&without, parts(32));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(without.join(bundle::MANIFEST)).unwrap()).unwrap();
    assert!(manifest.get("reranker").is_none(), "{manifest}");
    assert!(!without.join(bundle::RERANKER).exists());
    let loaded = load_bundle(&without).unwrap();
    assert!(loaded.manifest.reranker.is_none() && loaded.reranker.is_none());
}

#[test]
fn a_reranker_that_does_not_fit_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    // Captions of another length than the transformer's 8.
    let mut short = parts(32);
    short.reranker = Some(reranker(&short, 6, 16));
    let err = short
        .check_reranker(16, "runs/x/reranker.safetensors")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("runs/x/reranker.safetensors")
            && err.contains("text_len 6")
            && err.contains("text_len 8"),
        "{err}"
    );
    let bad = dir.path().join("short");
    write_bundle(&bad, short);
    let err = format!("{:#}", load_bundle(&bad).err().unwrap());
    assert!(
        err.contains("reranker.safetensors")
            && err.contains("text_len 6")
            && err.contains("text_len 8"),
        "{err}"
    );
    // And from the command line, even without --candidates.
    let out = sample(&[bad.to_str().unwrap(), "-p", "x", "--device", "cpu"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("reranker.safetensors") && err.contains("text_len 6"),
        "{err}"
    );

    // Images of another size than the decoder's 16.
    let mut big = parts(32);
    big.reranker = Some(reranker(&big, 8, 32));
    let err = big.check_reranker(16, "big").unwrap_err().to_string();
    assert!(
        err.contains("big") && err.contains("32") && err.contains("16×16"),
        "{err}"
    );
    let bad = dir.path().join("big");
    write_bundle(&bad, big);
    let err = format!("{:#}", load_bundle(&bad).err().unwrap());
    assert!(
        err.contains("reranker.safetensors") && err.contains("image_size 32"),
        "{err}"
    );
}

#[test]
fn generate_keeps_the_best_of_the_candidates_it_drew() {
    // With the same seed and batches, drawing 5 per prompt without
    // reranking draws the very candidates that reranking chooses among.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bundle");
    write_bundle(&path, parts_with_reranker());
    let bundle = load_bundle(&path).unwrap();
    let request = |images_per_prompt, candidates| Request {
        prompts: vec!["a red circle".into(), "a blue square".into()],
        images_per_prompt,
        batch_size: 3,
        sampling: SamplingConfig {
            seed: 11,
            ..SamplingConfig::default()
        },
        use_cache: true,
        cuda_graph: true,
        candidates,
        precision: Precision::Fp32,
    };
    let plain = generate(&bundle, &request(5, None), |_| {}).unwrap();
    assert!(plain.scores.is_none());
    let ranked = generate(&bundle, &request(2, Some(5)), |_| {}).unwrap();
    let scores = ranked.scores.as_ref().unwrap();
    assert_eq!(scores.len(), 2);
    for (p, s) in scores.iter().enumerate() {
        assert_eq!(s.candidates.len(), 5);
        assert_eq!(s.kept, dalle_model::rerank::best(&s.candidates, 2));
        assert_eq!(ranked.images[p].len(), 2);
        for (image, &j) in ranked.images[p].iter().zip(&s.kept) {
            assert_eq!(image, &plain.images[p][j]);
        }
    }
    let again = generate(&bundle, &request(2, Some(5)), |_| {}).unwrap();
    assert_eq!(
        again.scores.as_ref().unwrap(),
        scores,
        "same seed, same scores"
    );
    assert_eq!(again.images, ranked.images);
}

#[test]
fn candidates_keep_the_rerankers_best_and_need_one() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain");
    write_bundle(&plain, parts(32));
    let ranked = dir.path().join("ranked");
    write_bundle(&ranked, parts_with_reranker());
    let args = |bundle: &Path, out_dir: &Path, extra: &[&str]| {
        let mut args = vec![
            bundle.to_str().unwrap().to_string(),
            "-p".into(),
            "a red circle".into(),
            "-p".into(),
            "a blue square".into(),
            "--device".into(),
            "cpu".into(),
            "--seed".into(),
            "5".into(),
            "--out".into(),
            out_dir.to_str().unwrap().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let run = |args: Vec<String>| Command::new(SAMPLE).args(args).output().unwrap();
    let out_dir = dir.path().join("out");

    let out = run(args(&plain, &out_dir, &["--candidates", "6", "-n", "2"]));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("has no reranker")
            && err.contains("`rerank` to run.stages")
            && err.contains("plain"),
        "{err}"
    );

    let out = run(args(&ranked, &out_dir, &["--candidates", "1", "-n", "2"]));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--candidates 1") && err.contains("at least as many"),
        "{err}"
    );
    assert!(!out_dir.exists(), "refused before writing anything");

    let best_of = ["--candidates", "6", "-n", "2", "--batch-size", "4"];
    let out = run(args(&ranked, &out_dir, &best_of));
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("best 2 of 6") && stdout.contains("4 images (best of 12 drawn)"),
        "{stdout}"
    );
    let mut pngs: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|name| name.ends_with(".png") && !name.ends_with("grid.png"))
        .collect();
    pngs.sort();
    assert_eq!(
        pngs,
        [
            "001-a-red-circle-01.png",
            "001-a-red-circle-02.png",
            "002-a-blue-square-01.png",
            "002-a-blue-square-02.png"
        ],
        "2 kept images for each of 2 prompts"
    );
    let report = std::fs::read(out_dir.join("scores.json")).unwrap();
    let scores: serde_json::Value = serde_json::from_slice(&report).unwrap();
    assert_eq!(scores["candidates_per_prompt"], 6);
    assert_eq!(scores["kept_per_prompt"], 2);
    assert_eq!(scores["seed"], 5);
    let prompts = scores["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 2);
    for (p, prompt) in prompts.iter().enumerate() {
        let all: Vec<f64> = prompt["candidate_scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(all.len(), 6);
        let mut sorted = all.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kept = prompt["kept"].as_array().unwrap();
        let kept_scores: Vec<f64> = kept.iter().map(|k| k["score"].as_f64().unwrap()).collect();
        assert_eq!(
            kept_scores,
            sorted[..2],
            "the kept are the best two, best first"
        );
        for (i, k) in kept.iter().enumerate() {
            assert_eq!(
                all[k["candidate"].as_u64().unwrap() as usize],
                kept_scores[i]
            );
            assert_eq!(k["file"], pngs[p * 2 + i]);
        }
    }

    // Same seed, same choice, same images.
    let again_dir = dir.path().join("again");
    let out = run(args(&ranked, &again_dir, &best_of));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(again_dir.join("scores.json")).unwrap(),
        report
    );
    for png in &pngs {
        assert_eq!(
            std::fs::read(again_dir.join(png)).unwrap(),
            std::fs::read(out_dir.join(png)).unwrap()
        );
    }

    // Without --candidates a bundle with a reranker samples as before,
    // and writes no scores.
    let plain_dir = dir.path().join("unranked");
    let out = run(args(&ranked, &plain_dir, &["-n", "2"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!plain_dir.join("scores.json").exists());
}
