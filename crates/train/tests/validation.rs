//! Held-out evaluation in training: tiny runs of both stages with
//! `data.validation` on log their figures, finite, to the metrics files
//! (lines marked `"kind": "validation"` beside unchanged training lines);
//! evaluating does not change training; and the figures of a model do not
//! depend on how many ranks evaluate it.
//!
//! The tests take turns: libtorch's generator is process-wide, and a run
//! compared bitwise with another must not share it.

mod common;

use common::{on_ranks, prepare, stage2_job};
use dalle_model::dvae::{Dvae, ReconLoss};
use dalle_model::gpt::Gpt;
use dalle_train::config::JobConfig;
use dalle_train::ddp::{DataParallel, exclusive};
use dalle_train::gpt::{CaptionEncoder, ImageTokens, load_tokenizer};
use dalle_train::validation::{self, GptHeldOut, GptValidation, HeldOut};
use serde_json::Value;
use std::sync::Mutex;

static TURNS: Mutex<()> = Mutex::new(());

const HELD_OUT: usize = 32;

/// The shared tiny job with a fifth of the samples held out.
fn job(dir: &std::path::Path) -> JobConfig {
    let mut job = stage2_job(dir);
    job.data.validation.fraction = 0.2;
    job.data.validation.max_samples = HELD_OUT;
    let t = &mut job.dvae.train;
    t.steps = 12;
    t.batch_size = 16;
    t.log_every = 4;
    t.eval_every = 5;
    t.save_every = 0;
    job.gpt.train.data_url = Some(job.data_url());
    let g = &mut job.gpt.train;
    g.steps = 8;
    g.log_every = 4;
    g.eval_every = 4;
    // Evaluation must switch it off.
    job.gpt.model.dropout = 0.2;
    job.validate().unwrap();
    job
}

fn metrics_lines(job: &JobConfig, stage: &str) -> (Vec<Value>, Vec<Value>) {
    let text = std::fs::read_to_string(job.run.dir.join(format!("{stage}-metrics.jsonl"))).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .partition(|l| l.get("kind").is_none())
}

fn finite(line: &Value, key: &str) -> f64 {
    let v = line[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no {key} in {line}"));
    assert!(v.is_finite(), "{key} = {v} in {line}");
    v
}

#[test]
fn both_stages_log_finite_held_out_figures_and_train_as_without_them() {
    let _turn = TURNS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    prepare(&job);

    let report = dalle_train::dvae::train(&job, &mut DataParallel::solo(), |_| {}).unwrap();
    let steps: Vec<u64> = report.validation.iter().map(|v| v.step).collect();
    assert_eq!(steps, [5, 10, 12], "every 5 steps and after the last");
    assert!(report.loader.held_out > 0, "{:?}", report.loader);
    assert_eq!(
        report.loader.skipped(),
        0,
        "held-out samples are not bad ones"
    );
    let (training, held) = metrics_lines(&job, "dvae");
    assert_eq!(training.len(), 3, "training lines as before");
    assert!(training.iter().all(|l| l["psnr"].is_number()));
    assert_eq!(held.len(), 3);
    for line in &held {
        assert_eq!(line["kind"], "validation");
        assert_eq!(line["val_samples"], HELD_OUT);
        let mse = finite(line, "val_mse");
        assert!((finite(line, "val_psnr") + 10.0 * mse.log10()).abs() < 1e-9);
        assert!(line["val_codes_used"].as_i64().unwrap() >= 1);
        assert!(finite(line, "val_code_perplexity") >= 1.0);
    }

    // The same run without evaluations trains bitwise the same.
    let mut quiet = job.clone();
    quiet.run.dir = dir.path().join("quiet");
    quiet.data.url = Some(job.data_url());
    quiet.dvae.train.eval_every = 0;
    let without = dalle_train::dvae::train(&quiet, &mut DataParallel::solo(), |_| {}).unwrap();
    assert!(without.validation.is_empty());
    let losses = |logs: &[dalle_train::metrics::DvaeLog]| -> Vec<f64> {
        logs.iter().map(|l| l.loss).collect()
    };
    assert_eq!(losses(&report.logs), losses(&without.logs));
    assert_eq!(without.loader.held_out, report.loader.held_out);

    let mut seen = Vec::new();
    let gpt = dalle_train::gpt::train(&job, &mut DataParallel::solo(), |p| {
        if let dalle_train::metrics::Progress::Validation(v) = p {
            seen.push(v.step);
        }
    })
    .unwrap();
    assert_eq!(seen, [4, 8], "handed to the caller as they come");
    let (training, held) = metrics_lines(&job, "gpt");
    assert_eq!(training.len(), 2);
    assert!(training.iter().all(|l| l["image_loss"].is_number()));
    assert_eq!(held.len(), 2);
    for line in &held {
        assert_eq!(line["val_samples"], HELD_OUT);
        for part in ["text", "image"] {
            let nats = finite(line, &format!("val_{part}_loss"));
            let bits = finite(line, &format!("val_{part}_bits"));
            assert!(nats > 0.0 && (bits - nats / std::f64::consts::LN_2).abs() < 1e-9);
        }
    }

    // The last evaluation is that of the saved weights, and evaluating
    // again gives the same figures: no dropout at evaluation.
    let last = gpt.validation.last().unwrap();
    let mut ddp = DataParallel::solo();
    let again: Vec<GptValidation> = (0..2)
        .map(|_| evaluate_gpt(&job, &gpt.weights, &mut ddp))
        .collect();
    for v in &again {
        assert!(
            (v.val_image_loss - last.val_image_loss).abs() < 1e-9,
            "{v} vs {last}"
        );
        assert!(
            (v.val_text_loss - last.val_text_loss).abs() < 1e-9,
            "{v} vs {last}"
        );
    }
}

/// The saved transformer at `weights` on this rank's slice of the set.
fn evaluate_gpt(
    job: &JobConfig,
    weights: &std::path::Path,
    ddp: &mut DataParallel,
) -> GptValidation {
    let device = tch::Device::Cpu;
    let model = exclusive(|| Gpt::load(weights, device)).unwrap();
    let tokenizer = load_tokenizer(job).unwrap();
    let data = job.data_location().unwrap();
    let steps = (0, job.gpt.train.steps);
    let held = HeldOut::open(job, &data, 16, 1, steps, ddp)
        .unwrap()
        .unwrap();
    let images = ImageTokens::new(job, held.set.payload, device, &data.url).unwrap();
    let mut captions = CaptionEncoder::for_evaluation(job, &tokenizer);
    let chunk = job.gpt.train.micro_batch();
    let set = GptHeldOut::encode(held, &mut captions, &images, chunk, device).unwrap();
    let weight = job.gpt.train.text_loss_weight;
    validation::evaluate_gpt(&model, &set, weight, ddp, 8).unwrap()
}

#[test]
fn figures_do_not_depend_on_how_many_ranks_evaluate() {
    let _turn = TURNS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    prepare(&job);
    // A transformer that is not at its initialisation: a few steps.
    let mut short = job.clone();
    short.gpt.train.steps = 2;
    short.gpt.train.eval_every = 0;
    let gpt = dalle_train::gpt::train(&short, &mut DataParallel::solo(), |_| {}).unwrap();

    let evaluate = {
        let (job, gpt_weights) = (job.clone(), gpt.weights.clone());
        move |ddp: &mut DataParallel| {
            let dvae =
                exclusive(|| Dvae::load(&job.dvae_weights_path(), tch::Device::Cpu)).unwrap();
            let data = job.data_location().unwrap();
            let held = HeldOut::open(&job, &data, 16, 1, (0, 1), ddp)
                .unwrap()
                .unwrap();
            let dvae = validation::evaluate_dvae(&dvae, &held, ReconLoss::Mse, 3, ddp, 1).unwrap();
            (dvae, evaluate_gpt(&job, &gpt_weights, ddp), held.set.len())
        }
    };
    let (solo_dvae, solo_gpt, solo_len) = evaluate(&mut DataParallel::solo());
    assert_eq!((solo_len, solo_dvae.val_samples), (HELD_OUT, HELD_OUT));
    // `mse`'s Gaussian likelihood: σ = 0.1, so MSE / 0.02 + ln(0.1·√(2π)).
    let nll = solo_dvae.val_mse / 0.02 + (0.1 * (2.0 * std::f64::consts::PI).sqrt()).ln();
    assert!((solo_dvae.val_recon - nll).abs() < 1e-6, "{solo_dvae}");
    for world in [2, 3] {
        let ranks = on_ranks(world, evaluate.clone());
        let slices: usize = ranks.iter().map(|r| r.2).sum();
        assert_eq!(slices, HELD_OUT, "W={world}: the slices tile the set");
        for (dvae, gpt, _) in &ranks {
            assert_eq!(dvae.val_samples, HELD_OUT);
            assert_eq!(dvae.val_codes_used, solo_dvae.val_codes_used, "W={world}");
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1.0);
            assert!(
                close(dvae.val_mse, solo_dvae.val_mse),
                "W={world}: {dvae} vs {solo_dvae}"
            );
            let (recon, solo_recon) = (dvae.val_recon, solo_dvae.val_recon);
            assert!(close(recon, solo_recon), "W={world}: {dvae} vs {solo_dvae}");
            assert!(
                close(dvae.val_code_perplexity, solo_dvae.val_code_perplexity),
                "W={world}: {dvae} vs {solo_dvae}"
            );
            assert!(
                close(gpt.val_text_loss, solo_gpt.val_text_loss),
                "W={world}: {gpt} vs {solo_gpt}"
            );
            assert!(
                close(gpt.val_image_loss, solo_gpt.val_image_loss),
                "W={world}: {gpt} vs {solo_gpt}"
            );
            assert_eq!(gpt.val_samples, HELD_OUT);
        }
    }
}
