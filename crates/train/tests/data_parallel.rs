//! Data parallelism is exact: W ranks (threads joined by a TCP ring on
//! loopback) with per-rank batch b end where one process with batch W·b
//! does, up to float rounding of the summation order, and stay bitwise
//! identical to each other after every step. Alone in its test binary:
//! libtorch's generator is process-wide, and no other test may draw from
//! it while these models are built.

mod common;

use common::{on_ranks, prepare, stage2_job};
use dalle_model::gpt::Gpt;
use dalle_train::config::JobConfig;
use dalle_train::ddp::DataParallel;

fn losses(logs: &[dalle_train::metrics::GptLog]) -> Vec<f64> {
    logs.iter().map(|l| l.loss).collect()
}

#[test]
fn w_ranks_with_batch_b_match_one_process_with_batch_w_times_b() {
    let dir = tempfile::tempdir().unwrap();
    let mut job = stage2_job(dir.path());
    prepare(&job);
    // Images tokenized on the fly (deterministic argmax), batch 12 so that
    // 2 and 3 ranks split it evenly; caption dropout is per sample, so it
    // does not depend on the split either.
    job.gpt.train.data_url = Some(job.data_url());
    job.gpt.train.batch_size = 12;
    job.gpt.train.micro_batch = 0;
    job.gpt.train.steps = 30;
    job.gpt.train.log_every = 10;
    job.run.verify_every = 1;
    let solo = dalle_train::gpt::train(&job, &mut DataParallel::solo(), |_| {}).unwrap();
    let solo_weights = Gpt::load(&solo.weights, tch::Device::Cpu).unwrap();

    for world in [2, 3] {
        let mut job: JobConfig = job.clone();
        job.run.dir = dir.path().join(format!("w{world}"));
        std::fs::create_dir_all(&job.run.dir).unwrap();
        for file in ["dvae.safetensors", "tokenizer.json"] {
            std::fs::copy(dir.path().join("run").join(file), job.run.dir.join(file)).unwrap();
        }
        // verify_every = 1: after every step every rank checks that its
        // parameters are bitwise rank 0's, or fails.
        let reports = on_ranks(world, move |ddp| {
            dalle_train::gpt::train(&job, ddp, |_| {}).map(|r| (losses(&r.logs), r.weights))
        });
        let reports: Vec<_> = reports.into_iter().map(Result::unwrap).collect();
        assert!(
            reports.windows(2).all(|w| w[0].0 == w[1].0),
            "W={world}: ranks logged different losses"
        );
        for (a, b) in reports[0].0.iter().zip(losses(&solo.logs)) {
            assert!((a - b).abs() < 1e-4, "W={world}: loss {a}, alone {b}");
        }
        let weights = Gpt::load(&reports[0].1, tch::Device::Cpu).unwrap();
        for ((name, a), (_, b)) in weights
            .named_parameters()
            .iter()
            .zip(solo_weights.named_parameters().iter())
        {
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(
                diff < 1e-4,
                "W={world}: {name} differs from one process by {diff}"
            );
        }
    }
}
