//! Exact resume: a run stopped at a step boundary and started again (it
//! resumes from its newest committed checkpoint) ends with parameters
//! bitwise equal to a run that never stopped, for both stages, in fp32 and
//! in bf16 autocast (each precision against itself). Alone in
//! its test binary: the dVAE draws Gumbel noise from libtorch's
//! process-wide generator, which no other test may touch meanwhile.

mod common;

use common::{prepare, stage2_job};
use dalle_model::dvae::Dvae;
use dalle_model::gpt::Gpt;
use dalle_precision::PrecisionSetting;
use dalle_train::TrainError;
use dalle_train::config::JobConfig;
use dalle_train::ddp::{DataParallel, StepEnd};

/// A data-parallel context (one process) that stops training after `step`.
fn stopping_at(step: u64) -> DataParallel {
    DataParallel::solo().with_step_hook(Box::new(move |end: &StepEnd| {
        if end.step == step {
            return Err(TrainError::Stopped(format!("killed after step {step}")));
        }
        Ok(())
    }))
}

fn bitwise_equal(a: &[(String, tch::Tensor)], b: &[(String, tch::Tensor)]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|((n, x), (m, y))| n == m && x.equal(y))
}

#[test]
fn a_stopped_and_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one() {
    // One after the other: both draw from the process-wide generator.
    stop_and_resume(PrecisionSetting::Fp32);
    stop_and_resume(PrecisionSetting::Bf16);
}

fn stop_and_resume(precision: PrecisionSetting) {
    let dir = tempfile::tempdir().unwrap();
    let mut base = stage2_job(dir.path());
    base.run.precision = precision;
    prepare(&base);
    base.checkpoint.every = 4;
    base.dvae.train.steps = 12;
    base.dvae.train.batch_size = 8;
    base.dvae.train.log_every = 4;
    base.gpt.train.steps = 12;
    base.gpt.train.log_every = 4;
    base.data.url = Some(base.data_url());
    base.gpt.train.data_url = Some(base.data_url());
    let job_in = |name: &str| -> JobConfig {
        let mut job = base.clone();
        job.run.dir = dir.path().join(name);
        std::fs::create_dir_all(&job.run.dir).unwrap();
        for file in ["dvae.safetensors", "tokenizer.json"] {
            std::fs::copy(base.run.dir.join(file), job.run.dir.join(file)).unwrap();
        }
        job
    };

    // Stage 1, with Gumbel noise drawn every step.
    let straight = job_in("straight");
    dalle_train::dvae::train(&straight, &mut DataParallel::solo(), |_| {}).unwrap();
    let stopped = job_in("stopped");
    let err = dalle_train::dvae::train(&stopped, &mut stopping_at(6), |_| {}).unwrap_err();
    assert!(err.to_string().contains("killed after step 6"), "{err}");
    // Started again: resumes from step 4 (the newest committed) and redoes 5 and 6.
    let report = dalle_train::dvae::train(&stopped, &mut DataParallel::solo(), |_| {}).unwrap();
    assert_eq!(report.logs.first().map(|l| l.step), Some(8));
    let load = |job: &JobConfig| {
        Dvae::load(&job.dvae_weights_path(), tch::Device::Cpu)
            .unwrap()
            .named_parameters()
    };
    assert!(
        bitwise_equal(&load(&straight), &load(&stopped)),
        "dVAE differs after resume in {precision:?}"
    );

    // Stage 2 (the dVAE of `base` tokenizes on the fly in both runs).
    dalle_train::gpt::train(&straight, &mut DataParallel::solo(), |_| {}).unwrap();
    dalle_train::gpt::train(&stopped, &mut stopping_at(9), |_| {}).unwrap_err();
    dalle_train::gpt::train(&stopped, &mut DataParallel::solo(), |_| {}).unwrap();
    let load = |job: &JobConfig| {
        Gpt::load(&job.gpt_weights_path(), tch::Device::Cpu)
            .unwrap()
            .named_parameters()
    };
    assert!(
        bitwise_equal(&load(&straight), &load(&stopped)),
        "GPT differs after resume in {precision:?}"
    );

    // A finished stage started again trains nothing and keeps its weights.
    let again = dalle_train::gpt::train(&stopped, &mut DataParallel::solo(), |_| {}).unwrap();
    assert!(again.logs.is_empty());
    assert!(bitwise_equal(&load(&straight), &load(&stopped)));
}
