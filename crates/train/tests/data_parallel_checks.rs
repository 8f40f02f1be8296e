//! Data-parallel safety checks over real TCP rings (threads on loopback):
//! dVAE ranks stay identical after every step, and ranks holding different
//! parameters are caught.

mod common;

use common::{on_ranks, prepare, stage2_job};
use dalle_model::dvae::{Dvae, DvaeConfig};

#[test]
fn dvae_ranks_stay_identical_after_every_step() {
    let dir = tempfile::tempdir().unwrap();
    let mut job = stage2_job(dir.path());
    prepare(&job);
    job.run.verify_every = 1;
    job.dvae.train.steps = 6;
    job.dvae.train.batch_size = 8;
    job.dvae.train.log_every = 3;
    job.dvae.train.save_every = 0;
    let reports = on_ranks(2, move |ddp| {
        dalle_train::dvae::train(&job, ddp, |_| {})
            .map(|r| r.logs.iter().map(|l| l.loss).collect::<Vec<_>>())
    });
    let losses: Vec<Vec<f64>> = reports.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        losses[0], losses[1],
        "the ranks logged different global losses"
    );
    assert!(losses[0].iter().all(|l| l.is_finite()));
}

#[test]
fn ranks_that_hold_different_parameters_are_refused() {
    let results = on_ranks(2, |ddp| {
        // Each rank seeds its own model differently.
        tch::manual_seed(ddp.rank() as i64);
        let config = DvaeConfig {
            image_size: 16,
            n_hid: 8,
            n_blk_per_group: 1,
            vocab_size: 16,
            n_init: 8,
            ..DvaeConfig::default()
        };
        let model = Dvae::new(config, tch::Device::Cpu).unwrap();
        let params = model.named_parameters();
        let verified = ddp.verify_identical(&params).map_err(|e| e.to_string());
        // Sharing rank 0's parameters makes them agree.
        let shared = ddp
            .share_initial_parameters(&params)
            .map_err(|e| e.to_string());
        (verified, shared)
    });
    assert!(results[0].0.is_ok(), "rank 0 agrees with itself");
    let err = results[1].0.as_ref().unwrap_err();
    assert!(
        err.contains("rank 1") && err.contains("different parameters"),
        "{err}"
    );
    assert!(results.iter().all(|(_, shared)| shared.is_ok()));
}
