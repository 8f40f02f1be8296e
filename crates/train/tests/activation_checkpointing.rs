//! Activation checkpointing changes memory, not the numbers: one step's
//! gradients with the transformer's blocks (with dropout, so the recomputed
//! blocks must redraw the same masks) or the dVAE's groups (with the KL and
//! usage terms on the logits) recomputed in backward equal those of the
//! plain pass, and a short training run follows the same loss trajectory.
//! Also prints the step time with and without on small models.
//!
//! Every test here seeds libtorch's one global generator and compares
//! random draws, so they run one at a time (`SERIAL`).

mod common;

use common::{prepare, stage2_job};
use dalle_model::dvae::{Dvae, DvaeConfig, Objective, ReconLoss, Relaxation};
use dalle_model::gpt::{AttentionLayout, Gpt, GptArch, GptConfig};
use dalle_train::ddp::DataParallel;
use dalle_train::schedule::Cosine;
use std::sync::Mutex;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every parameter's gradient, then zeroed.
fn take_grads(params: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    params
        .into_iter()
        .map(|(name, mut p)| {
            let g = p.grad().copy();
            p.zero_grad();
            (name, g)
        })
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Each gradient of `b` within 1e-6 of the largest entry of `a`'s; none
/// of `a`'s zero. Returns the largest relative difference.
fn assert_close(what: &str, a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    let mut worst: f64 = 0.0;
    for ((name, a), (_, b)) in a.iter().zip(b) {
        let scale = a.abs().max().double_value(&[]);
        assert!(scale > 0.0, "{what} {name}: no gradient");
        let diff = max_diff(a, b) / scale;
        assert!(diff <= 1e-6, "{what} {name}: differs by {diff} (relative)");
        worst = worst.max(diff);
    }
    worst
}

fn gpt_config(attention: AttentionLayout, dropout: f64) -> GptConfig {
    GptConfig {
        arch: GptArch {
            dim: 32,
            depth: 4,
            heads: 4,
            mlp_ratio: 2,
            dropout,
            attn_dropout: dropout,
            attention,
            conv_kernel: 3,
        },
        text_vocab: 20,
        text_len: 5,
        image_vocab: 16,
        image_grid: 4,
    }
}

#[test]
fn checkpointed_transformer_blocks_give_the_plain_gradients_and_draws() {
    let _serial = serial();
    let opts = (Kind::Int64, Device::Cpu);
    for attention in [AttentionLayout::Dense, AttentionLayout::Sparse] {
        let config = gpt_config(attention, 0.2);
        tch::manual_seed(5);
        let model = Gpt::new(config.clone(), Device::Cpu).unwrap();
        let text = Tensor::randint(config.text_targets(), [7, config.text_len], opts);
        let image = Tensor::randint(config.image_vocab, [7, config.image_len()], opts);
        // 7 samples in micro-batches of 3: three passes, the last of one.
        let step = |checkpointing: bool| {
            tch::manual_seed(11);
            let parts = dalle_train::gpt::accumulate_gradients_checkpointed(
                &model,
                &text,
                &image,
                3,
                0.125,
                checkpointing,
            )
            .unwrap();
            // What the generator draws next: the passes must leave it alike.
            let next = Tensor::rand([8], (Kind::Float, Device::Cpu));
            (parts, take_grads(model.named_parameters()), next)
        };
        let (plain_parts, plain, plain_next) = step(false);
        let (ckpt_parts, ckpt, ckpt_next) = step(true);
        let what = format!("{attention:?}");
        assert_eq!(max_diff(&plain_parts, &ckpt_parts), 0.0, "{what}: loss");
        assert_eq!(max_diff(&plain_next, &ckpt_next), 0.0, "{what}: generator");
        let worst = assert_close(&what, &plain, &ckpt);
        println!("{what}: largest relative gradient difference {worst:e}");
        // Dropout is live: other draws give another loss.
        tch::manual_seed(12);
        let other =
            dalle_train::gpt::accumulate_gradients(&model, &text, &image, 3, 0.125).unwrap();
        assert!(
            max_diff(&plain_parts, &other) > 0.0,
            "{what}: dropout drew nothing"
        );
        take_grads(model.named_parameters());
    }
}

fn dvae_config() -> DvaeConfig {
    DvaeConfig {
        image_size: 16,
        n_hid: 8,
        n_blk_per_group: 2,
        vocab_size: 16,
        n_init: 8,
        ..DvaeConfig::default()
    }
}

#[test]
fn checkpointed_dvae_groups_give_the_plain_gradients() {
    let _serial = serial();
    tch::manual_seed(7);
    let model = Dvae::new(dvae_config(), Device::Cpu).unwrap();
    let images = Tensor::rand([8, 3, 16, 16], (Kind::Float, Device::Cpu));
    for relaxation in [Relaxation::Soft, Relaxation::StraightThrough] {
        let objective = Objective {
            tau: 0.8,
            beta: 2.0,
            usage: 0.5,
            relaxation,
            recon: ReconLoss::LogitLaplace,
        };
        // The whole batch in one pass, and in micro-batches of 3.
        for micro in [8, 3] {
            let step = |checkpointing: bool| {
                tch::manual_seed(13);
                let parts = dalle_train::dvae::accumulate_gradients(
                    &model,
                    &images,
                    &objective,
                    micro,
                    checkpointing,
                    &mut DataParallel::solo(),
                )
                .unwrap();
                (parts, take_grads(model.named_parameters()))
            };
            let (plain_parts, plain) = step(false);
            let (ckpt_parts, ckpt) = step(true);
            let what = format!("{relaxation:?}, micro-batch {micro}");
            for (a, b) in [
                (&plain_parts.loss, &ckpt_parts.loss),
                (&plain_parts.recon, &ckpt_parts.recon),
                (&plain_parts.kl, &ckpt_parts.kl),
                (&plain_parts.usage, &ckpt_parts.usage),
            ] {
                assert!(max_diff(a, b) <= 1e-6, "{what}: figures differ");
            }
            assert_eq!(plain_parts.tokens, ckpt_parts.tokens, "{what}");
            let worst = assert_close(&what, &plain, &ckpt);
            println!("{what}: largest relative gradient difference {worst:e}");
        }
    }
}

#[test]
fn a_checkpointed_transformer_run_follows_the_plain_loss_trajectory() {
    let _serial = serial();
    // Each run in its own run directory (one would resume the other).
    let run = |checkpointing: bool| {
        let dir = tempfile::tempdir().unwrap();
        let mut job = stage2_job(dir.path());
        prepare(&job);
        job.gpt.train.data_url = Some(job.data_url());
        job.gpt.model.dropout = 0.1;
        job.gpt.train.steps = 12;
        job.gpt.train.log_every = 4;
        job.gpt.train.activation_checkpointing = checkpointing;
        dalle_train::gpt::train(&job, &mut DataParallel::solo(), |_| {}).unwrap()
    };
    let plain = run(false);
    let ckpt = run(true);
    assert_eq!(plain.logs.len(), 3);
    for (a, b) in plain.logs.iter().zip(&ckpt.logs) {
        let diff = (a.loss - b.loss).abs();
        assert!(diff <= 1e-5 * a.loss.abs(), "step {}: {a} vs {b}", a.step);
        assert!((a.grad_norm - b.grad_norm).abs() <= 1e-4 * a.grad_norm.abs());
    }
}

fn dvae_job(dir: &std::path::Path) -> dalle_train::config::JobConfig {
    let mut job = stage2_job(dir);
    job.dvae.model = dvae_config();
    let t = &mut job.dvae.train;
    t.steps = 12;
    t.batch_size = 16;
    t.log_every = 4;
    t.save_every = 0;
    t.eval_every = 0;
    t.lr = Cosine::new(1e-3, 1e-4, 12);
    t.tau = Cosine::new(1.0, 0.5, 12);
    t.beta = Cosine::new(0.5, 1.0, 12);
    t.usage = Cosine::new(0.5, 0.5, 12);
    job.validate().unwrap();
    job
}

#[test]
fn a_checkpointed_dvae_run_follows_the_plain_loss_trajectory() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut job = dvae_job(dir.path());
    job.data.url = Some(dir.path().join("data").display().to_string());
    dalle_data::synth::write_dataset(&job.data_dir().unwrap(), &job.synth, |_| {}).unwrap();
    // Each run in its own run directory (one would resume the other).
    let run = |checkpointing: bool, micro: usize| {
        let mut job = job.clone();
        job.run.dir = dir.path().join(format!("run-{checkpointing}-{micro}"));
        job.dvae.train.activation_checkpointing = checkpointing;
        job.dvae.train.micro_batch = micro;
        job.validate().unwrap();
        dalle_train::dvae::train(&job, &mut DataParallel::solo(), |_| {})
            .unwrap()
            .logs
    };
    let plain = run(false, 0);
    assert_eq!(plain.len(), 3);
    for (checkpointing, micro) in [(true, 0), (true, 8)] {
        let other = run(checkpointing, micro);
        for (a, b) in plain.iter().zip(&other) {
            let close = |x: f64, y: f64| (x - y).abs() <= 1e-4 * x.abs().max(1e-2);
            assert!(
                close(a.loss, b.loss) && close(a.recon, b.recon) && close(a.usage, b.usage),
                "checkpointing {checkpointing}, micro-batch {micro}, step {}: {a} vs {b}",
                a.step
            );
            assert_eq!(a.codes_used, b.codes_used);
        }
    }
}

/// Seconds per step of `step(checkpointing)` without and with: the best of
/// three rounds (alternating, against a machine shared with other work)
/// of the mean of five steps after a warm-up.
fn time_steps(mut step: impl FnMut(bool)) -> [f64; 2] {
    let mut best = [f64::INFINITY; 2];
    for _ in 0..3 {
        for (i, checkpointing) in [false, true].into_iter().enumerate() {
            step(checkpointing);
            let started = Instant::now();
            for _ in 0..5 {
                step(checkpointing);
            }
            best[i] = best[i].min(started.elapsed().as_secs_f64() / 5.0);
        }
    }
    best
}

/// Prints (does not assert) step times with and without checkpointing.
#[test]
fn step_time_with_and_without_checkpointing() {
    let _serial = serial();
    let device = if tch::Cuda::is_available() {
        Device::Cuda(0)
    } else {
        Device::Cpu
    };
    let config = GptConfig {
        arch: GptArch {
            dim: 128,
            depth: 4,
            heads: 4,
            attention: AttentionLayout::Dense,
            ..GptArch::default()
        },
        text_vocab: 300,
        text_len: 32,
        image_vocab: 64,
        image_grid: 8,
    };
    tch::manual_seed(0);
    let gpt = Gpt::new(config.clone(), device).unwrap();
    let (batch, opts) = (8, (Kind::Int64, device));
    let text = Tensor::randint(config.text_targets(), [batch, config.text_len], opts);
    let image = Tensor::randint(config.image_vocab, [batch, config.image_len()], opts);
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let [off, on] = time_steps(|checkpointing| {
        let _ = dalle_train::gpt::accumulate_gradients_checkpointed(
            &gpt,
            &text,
            &image,
            batch as usize,
            0.125,
            checkpointing,
        )
        .unwrap();
        take_grads(gpt.named_parameters());
        sync();
    });
    println!(
        "gpt dim 128 depth 4 seq {} batch {batch} on {device:?}: {:.1} ms/step plain, \
         {:.1} ms/step checkpointed ({:+.0} %)",
        config.seq_len(),
        off * 1e3,
        on * 1e3,
        (on / off - 1.0) * 100.0
    );
    let config = DvaeConfig {
        image_size: 32,
        n_hid: 32,
        n_blk_per_group: 2,
        vocab_size: 128,
        n_init: 32,
        ..DvaeConfig::default()
    };
    let dvae = Dvae::new(config, device).unwrap();
    let images = Tensor::rand([16, 3, 32, 32], (Kind::Float, device));
    let objective = Objective {
        tau: 1.0,
        beta: 1.0,
        usage: 0.1,
        relaxation: Relaxation::Soft,
        recon: ReconLoss::LogitLaplace,
    };
    let [off, on] = time_steps(|checkpointing| {
        dalle_train::dvae::accumulate_gradients(
            &dvae,
            &images,
            &objective,
            16,
            checkpointing,
            &mut DataParallel::solo(),
        )
        .unwrap();
        take_grads(dvae.named_parameters());
        sync();
    });
    println!(
        "dvae 32 px n_hid 32 2 blocks/group batch 16 on {device:?}: {:.1} ms/step plain, \
         {:.1} ms/step checkpointed ({:+.0} %)",
        off * 1e3,
        on * 1e3,
        (on / off - 1.0) * 100.0
    );
}
