//! A short dVAE run on synthetic shapes must learn: reconstruction loss
//! falls clearly, and encode → decode beats, by a clear margin, the best a
//! model ignoring its input could do (the mean image). Beating each image's
//! own mean colour takes longer runs (the demo's); see BENCHMARKS.md.

mod common;

use common::small_dvae_job;
use dalle_data::loader::ImageLoader;
use dalle_data::order::Cursor;
use dalle_model::device::parse_device;
use dalle_model::dvae::Dvae;
use dalle_train::schedule::Cosine;

#[test]
fn short_training_run_learns_to_reconstruct() {
    let dir = tempfile::tempdir().unwrap();
    let mut job = small_dvae_job(dir.path(), 512);
    let steps = 900;
    let t = &mut job.dvae.train;
    t.steps = steps;
    t.batch_size = 16;
    t.log_every = 100;
    t.save_every = 0;
    t.lr = Cosine::new(1e-3, 1e-5, steps);
    t.tau = Cosine::new(1.0, 1.0 / 16.0, steps);
    t.beta = Cosine::new(0.0, 6.6, 100);
    job.validate().unwrap();

    let report =
        dalle_train::dvae::train(&job, &mut dalle_train::ddp::DataParallel::solo(), |_| {})
            .unwrap();
    let (first, last) = (&report.logs[0], report.logs.last().unwrap());
    assert_eq!(last.step, steps);
    assert!(
        last.recon < first.recon - 0.2 && last.psnr > first.psnr + 3.0,
        "reconstruction did not improve clearly: {first} → {last}"
    );
    assert_eq!(report.loader.skipped(), 0);

    let model = Dvae::load(&report.weights, parse_device("cpu").unwrap()).unwrap();
    let batches = ImageLoader::start(
        &job.data_location().unwrap(),
        dalle_train::feed::loader_config(
            &job,
            job.dvae.model.image_size as u32,
            dalle_data::order::Sharding::single(32),
        ),
        Cursor::start(0),
    )
    .unwrap();
    let tensors = batches.map(|b| Ok(dalle_train::feed::batch_tensor(&b?, tch::Device::Cpu)));
    let eval = dalle_train::eval::reconstruct(&model, tensors, 64).unwrap();
    assert_eq!(eval.images, 64);
    assert!(
        eval.psnr > eval.blind_psnr + 3.0,
        "encode → decode PSNR {:.2} dB does not clearly beat the input-blind baseline {:.2} dB",
        eval.psnr,
        eval.blind_psnr
    );
}
