//! The demo's dVAE recipe (`configs/demo.toml`, `[dvae.train]`) must keep
//! working: trained on a smaller synthetic set for a third of its updates, its
//! reconstructions of held-out images beat painting each image its own
//! mean colour by a clear margin, and the codebook does not collapse.
//! A change to the recipe that brings back the collapse (a handful of
//! codes, reconstructions no better than a flat colour) fails here. At 400
//! updates the recipe is +2.9 dB and ~160 codes; the collapsed one stayed
//! below the baseline with ~15 codes. Full-length figures: QUALITY.md.

use dalle_data::loader::ImageLoader;
use dalle_data::order::{Cursor, Sharding};
use dalle_data::synth::{self, SynthConfig};
use dalle_model::dvae::{Dvae, loss};
use dalle_train::config::{DEMO_TOML, JobConfig};
use dalle_train::schedule::Cosine;

/// Stretches a schedule written for `from` steps to `to` steps.
fn rescale(schedule: &mut Cosine, from: u64, to: u64) {
    schedule.steps = (schedule.steps * to).div_ceil(from).max(1);
    schedule.warmup = schedule.warmup * to / from;
}

#[test]
fn demo_recipe_beats_mean_colour_and_keeps_codes_alive() {
    // One libtorch thread: the figures are seeded per thread count, and
    // two tests each spinning two threads on a small machine crawl.
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let mut job = JobConfig::from_toml(DEMO_TOML, "configs/demo.toml").unwrap();
    job.run.dir = dir.path().join("run");
    job.run.device = "cpu".into();
    job.checkpoint.every = 0;
    job.synth = SynthConfig {
        count: 4096,
        rows_per_file: 2048,
        rows_per_group: 256,
        ..job.synth.clone()
    };
    // The demo's model and data at a third of its updates, schedules
    // compressed to match.
    let (demo_steps, steps) = (job.dvae.train.steps, 400);
    let t = &mut job.dvae.train;
    t.steps = steps;
    t.save_every = 0;
    for schedule in [&mut t.lr, &mut t.tau, &mut t.beta, &mut t.usage] {
        rescale(schedule, demo_steps, steps);
    }
    job.validate().unwrap();
    synth::write_dataset(&job.data_dir().unwrap(), &job.synth, |_| {}).unwrap();

    let report =
        dalle_train::dvae::train(&job, &mut dalle_train::ddp::DataParallel::solo(), |_| {})
            .unwrap();
    assert_eq!(report.logs.last().unwrap().step, steps);

    // Held-out scenes: another seed of the same generator.
    let held_out = dir.path().join("held-out");
    let held_out_cfg = SynthConfig {
        seed: job.synth.seed + 1,
        count: 256,
        rows_per_file: 256,
        ..job.synth.clone()
    };
    synth::write_dataset(&held_out, &held_out_cfg, |_| {}).unwrap();
    let model = Dvae::load(&report.weights, tch::Device::Cpu).unwrap();
    let mut held_out_job = job.clone();
    held_out_job.data.url = Some(held_out.to_str().unwrap().to_string());
    let location = held_out_job.data_location().unwrap();
    let loader = ImageLoader::start(
        &location,
        dalle_train::feed::loader_config(&job, 64, Sharding::single(64)),
        Cursor::start(0),
    )
    .unwrap();
    // The loader runs epoch after epoch: take the set once.
    let batches: Vec<tch::Tensor> = loader
        .take(held_out_cfg.count / 64)
        .map(|b| dalle_train::feed::batch_tensor(&b.unwrap(), tch::Device::Cpu))
        .collect();
    let images = tch::Tensor::cat(&batches, 0);
    let eval =
        dalle_train::eval::reconstruct(&model, std::iter::once(Ok(images.copy())), 256).unwrap();
    let margin = eval.psnr - eval.baseline_psnr;
    // Codes in use over batches of the training batch size, as the log
    // lines count them.
    let tokens = model.encode(&images).unwrap();
    let (codes, perplexity) = loss::codebook_usage(&tokens.narrow(0, 0, 16), 512);
    eprintln!(
        "held-out PSNR {:.2} dB, mean colour {:.2} dB (+{margin:.2}), codes {codes} ppl {perplexity:.1}",
        eval.psnr, eval.baseline_psnr
    );
    assert!(
        margin > 1.5,
        "held-out PSNR {:.2} dB is not clearly above the mean-colour baseline {:.2} dB",
        eval.psnr,
        eval.baseline_psnr
    );
    assert!(
        codes >= 64 && perplexity >= 32.0,
        "the codebook collapsed: {codes} codes, perplexity {perplexity:.1}"
    );
}
