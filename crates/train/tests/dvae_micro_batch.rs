//! dVAE micro-batches: the accumulated gradients of a batch's slices are
//! the whole batch's, the usage term (a non-linear function of the batch's
//! mean posterior) included, and so are the logged figures; and a short run
//! in micro-batches of half the batch learns.
//!
//! The tests seed libtorch's one global generator and compare what it
//! draws (the Gumbel noise), so they run one at a time (`SERIAL`).

mod common;

use common::small_dvae_job;
use dalle_model::dvae::{Dvae, DvaeConfig, Objective, ReconLoss, Relaxation};
use dalle_train::ddp::DataParallel;
use dalle_train::schedule::Cosine;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn accumulated_micro_batches_give_the_whole_batch_gradient() {
    let _serial = serial();
    let config = DvaeConfig {
        image_size: 16,
        n_hid: 8,
        n_blk_per_group: 1,
        vocab_size: 16,
        n_init: 8,
        ..DvaeConfig::default()
    };
    tch::manual_seed(3);
    let model = Dvae::new(config, Device::Cpu).unwrap();
    let images = Tensor::rand([8, 3, 16, 16], (Kind::Float, Device::Cpu));
    let step = |objective: &Objective, micro: usize| {
        // The same seed: on the CPU, noise for the slices in turn is the
        // whole batch's noise, element for element.
        tch::manual_seed(17);
        let parts = dalle_train::dvae::accumulate_gradients(
            &model,
            &images,
            objective,
            micro,
            false,
            &mut DataParallel::solo(),
        )
        .unwrap();
        let grads: Vec<(String, Tensor)> = model
            .named_parameters()
            .into_iter()
            .map(|(name, mut p)| {
                let g = p.grad().copy();
                p.zero_grad();
                (name, g)
            })
            .collect();
        (parts, grads)
    };
    for (usage, beta, recon) in [
        (0.0, 0.0, ReconLoss::LogitLaplace),
        (0.7, 2.0, ReconLoss::LogitLaplace),
        (1.5, 0.5, ReconLoss::Mse),
    ] {
        let objective = Objective {
            tau: 0.9,
            beta,
            usage,
            relaxation: Relaxation::Soft,
            recon,
        };
        let (whole_parts, whole) = step(&objective, 8);
        // Halves, and slices of 3 that leave a last one of 2.
        for micro in [4, 3] {
            let (parts, grads) = step(&objective, micro);
            let what = format!("usage {usage}, beta {beta}, {recon:?}, micro-batch {micro}");
            for (name, a, b) in [
                ("loss", &whole_parts.loss, &parts.loss),
                ("recon", &whole_parts.recon, &parts.recon),
                ("kl", &whole_parts.kl, &parts.kl),
                ("mse", &whole_parts.mse, &parts.mse),
                ("usage", &whole_parts.usage, &parts.usage),
            ] {
                let diff = max_diff(a, b);
                assert!(
                    diff <= 1e-6 * a.abs().double_value(&[]).max(1.0),
                    "{what}: {name} {diff}"
                );
            }
            assert_eq!(whole_parts.tokens, parts.tokens, "{what}: tokens");
            let mut worst: f64 = 0.0;
            for ((name, a), (_, b)) in whole.iter().zip(&grads) {
                let scale = a.abs().max().double_value(&[]);
                assert!(scale > 0.0, "{what}: no gradient for {name}");
                let diff = max_diff(a, b) / scale;
                assert!(diff <= 1e-5, "{what}: {name} differs by {diff} (relative)");
                worst = worst.max(diff);
            }
            println!("{what}: largest relative gradient difference {worst:e}");
        }
        // The usage term moves the gradient, so the test above covers it.
        if usage > 0.0 {
            let plain = Objective {
                usage: 0.0,
                ..objective
            };
            let (_, without) = step(&plain, 8);
            let moved = whole
                .iter()
                .zip(&without)
                .any(|((_, a), (_, b))| max_diff(a, b) > 1e-4 * a.abs().max().double_value(&[]));
            assert!(moved, "the usage term changes no gradient");
        }
    }
}

#[test]
fn a_run_in_micro_batches_of_half_the_batch_learns() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut job = small_dvae_job(dir.path(), 256);
    let steps = 200;
    let t = &mut job.dvae.train;
    t.steps = steps;
    t.batch_size = 16;
    t.micro_batch = 8;
    t.log_every = 50;
    t.save_every = 0;
    t.eval_every = 0;
    t.lr = Cosine::new(1e-3, 1e-4, steps);
    t.tau = Cosine::new(1.0, 0.5, steps);
    t.beta = Cosine::new(0.0, 1.0, 50);
    t.usage = Cosine::new(0.1, 0.1, steps);
    job.validate().unwrap();
    let report = dalle_train::dvae::train(&job, &mut DataParallel::solo(), |_| {}).unwrap();
    let (first, last) = (&report.logs[0], report.logs.last().unwrap());
    assert_eq!(last.step, steps);
    assert!(
        last.loss < first.loss - 0.1 && last.recon < first.recon - 0.1,
        "the loss did not fall: {first} → {last}"
    );
    assert!(last.codes_used > 1 && last.usage.is_finite());
}
