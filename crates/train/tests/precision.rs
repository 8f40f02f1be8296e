//! bf16 autocast against fp32 on the CPU (libtorch runs bf16 there), for
//! the tiny models of the other training tests: the same seeded run in
//! both precisions must reach the same losses within a stated tolerance,
//! and the sampler must draw mostly the same tokens from the same weights.
//! That bf16 actually ran is checked too: its losses are not fp32's bit
//! for bit. (Exact resume within bf16 is in tests/resume.rs.)
//!
//! The tests hold one lock: the dVAE's Gumbel noise and the GPT's caption
//! dropout come from libtorch's process-wide generator, reseeded per
//! step, which two runs at once would share.

mod common;

use common::{prepare, small_dvae_job, stage2_job};
use dalle_model::gpt::Gpt;
use dalle_model::gpt::sample::{SamplingConfig, sample};
use dalle_model::text::TextTokenizer;
use dalle_precision::{Autocast, Precision, PrecisionSetting};
use dalle_train::config::JobConfig;
use dalle_train::ddp::DataParallel;
use dalle_train::schedule::Cosine;
use std::sync::Mutex;
use tch::{Device, Tensor};

static GLOBAL_GENERATOR: Mutex<()> = Mutex::new(());

/// How far apart the two precisions' logged losses may be, as a share of
/// how far fp32's loss moved over the run (the dVAE's loss crosses zero,
/// so not relative to the loss itself): bf16 keeps 8 bits of mantissa (a
/// rounding of 2⁻⁸ ≈ 0.4% per product), and the runs drift apart over the
/// updates. Measured: the dVAE 1.2%, the GPT 0.01%.
const LOSS_TOLERANCE: f64 = 0.05;

/// The share of sampled tokens bf16 must draw exactly as fp32 does, from
/// the same weights and the same uniforms. Measured: 99.6% of 256.
const SAMPLE_AGREEMENT: f64 = 0.95;

fn in_precision(job: &JobConfig, precision: PrecisionSetting) -> JobConfig {
    let mut job = job.clone();
    job.run.precision = precision;
    job.run.dir = job.run.dir.join(precision.name());
    job
}

/// The largest gap between two runs' losses, line by line, as a share of
/// the range fp32's losses span.
fn largest_gap(fp32: &[f64], bf16: &[f64]) -> f64 {
    assert_eq!(fp32.len(), bf16.len());
    let (lo, hi) = fp32
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    assert!(hi > lo, "fp32's loss did not move: {fp32:?}");
    fp32.iter()
        .zip(bf16)
        .map(|(a, b)| (a - b).abs() / (hi - lo))
        .fold(0.0, f64::max)
}

/// bf16's logged losses stay within [`LOSS_TOLERANCE`] of fp32's, and are
/// not fp32's bit for bit (which would mean autocast never ran).
fn assert_tracks(what: &str, fp32: &[f64], bf16: &[f64]) {
    let gap = largest_gap(fp32, bf16);
    eprintln!("{what}: fp32 {fp32:?}, bf16 {bf16:?}: largest gap {gap:.4}");
    assert!(
        fp32 != bf16,
        "bf16 gave fp32's {what} bit for bit: autocast did not run"
    );
    assert!(
        gap <= LOSS_TOLERANCE,
        "bf16's {what} drifted {:.1}% of fp32's range from fp32 (tolerance {:.0}%): \
         {fp32:?} against {bf16:?}",
        gap * 100.0,
        LOSS_TOLERANCE * 100.0
    );
}

#[test]
fn bf16_dvae_training_tracks_fp32() {
    let _serial = GLOBAL_GENERATOR.lock().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut job = small_dvae_job(dir.path(), 256);
    let steps = 80;
    let t = &mut job.dvae.train;
    t.steps = steps;
    t.batch_size = 16;
    t.log_every = 20;
    t.save_every = 0;
    t.lr = Cosine::new(1e-3, 1e-5, steps);
    t.tau = Cosine::new(1.0, 1.0 / 16.0, steps);
    job.checkpoint.every = 0;
    job.validate().unwrap();
    // Both runs read the dataset written once under the job's run dir.
    job.data.url = Some(job.data_url());
    let run = |precision| {
        let job = in_precision(&job, precision);
        let report = dalle_train::dvae::train(&job, &mut DataParallel::solo(), |_| {}).unwrap();
        report.logs
    };
    let (fp32, bf16) = (run(PrecisionSetting::Fp32), run(PrecisionSetting::Bf16));
    let recon = |logs: &[dalle_train::metrics::DvaeLog]| logs.iter().map(|l| l.recon).collect();
    let (a, b): (Vec<f64>, Vec<f64>) = (recon(&fp32), recon(&bf16));
    assert_tracks("dVAE reconstruction loss", &a, &b);
    assert!(b.last() < b.first(), "bf16 did not learn: {b:?}");
}

#[test]
fn bf16_gpt_training_tracks_fp32_and_samples_as_fp32_does() {
    let _serial = GLOBAL_GENERATOR.lock().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut job = stage2_job(dir.path());
    prepare(&job);
    job.gpt.train.data_url = Some(job.data_url());
    let run = |precision| {
        let job = in_precision(&job, precision);
        std::fs::create_dir_all(&job.run.dir).unwrap();
        for file in ["dvae.safetensors", "tokenizer.json"] {
            std::fs::copy(dir.path().join("run").join(file), job.run.dir.join(file)).unwrap();
        }
        dalle_train::gpt::train(&job, &mut DataParallel::solo(), |_| {}).unwrap()
    };
    let (fp32, bf16) = (run(PrecisionSetting::Fp32), run(PrecisionSetting::Bf16));
    let losses = |r: &dalle_train::gpt::GptTrainReport| r.logs.iter().map(|l| l.loss).collect();
    let (a, b): (Vec<f64>, Vec<f64>) = (losses(&fp32), losses(&bf16));
    assert_tracks("GPT loss", &a, &b);

    // Sampling: the fp32-trained weights, the same captions and seed.
    let gpt = Gpt::load(&fp32.weights, Device::Cpu).unwrap();
    let tokenizer = TextTokenizer::load(&job.tokenizer_path()).unwrap();
    let text_len = job.text.text_len;
    let ids: Vec<i64> = (0..64u64)
        .flat_map(|i| {
            let caption = dalle_data::synth::Scene::sample(job.synth.seed + 1, i).caption();
            tokenizer.encode(&caption, text_len).unwrap().ids
        })
        .collect();
    let captions = Tensor::from_slice(&ids).view([64, text_len as i64]);
    let config = SamplingConfig {
        seed: 11,
        ..SamplingConfig::default()
    };
    let draw = |precision| {
        let _autocast = Autocast::enter(Device::Cpu, precision);
        let tokens = sample(&gpt, &captions, &config, true, |_| {}).unwrap();
        Vec::<i64>::try_from(tokens.flatten(0, -1)).unwrap()
    };
    let (x, y) = (draw(Precision::Fp32), draw(Precision::Bf16));
    let same = x.iter().zip(&y).filter(|(p, q)| p == q).count() as f64 / x.len() as f64;
    eprintln!(
        "bf16 drew {:.1}% of {} tokens as fp32 did",
        same * 100.0,
        x.len()
    );
    assert!(
        same >= SAMPLE_AGREEMENT,
        "bf16 sampling agrees with fp32 on {:.1}% of tokens, less than {:.0}%",
        same * 100.0,
        SAMPLE_AGREEMENT * 100.0
    );
}
