//! Stage-2 training in one process: from an image dataset (tokenized on
//! the fly by the frozen dVAE) the loss falls; a token dataset made by
//! another dVAE is refused with both grid sizes named.

mod common;

use common::{prepare, stage2_job as job};
use dalle_data::tokens::{self, TokenRow};
use dalle_model::gpt::{AttentionLayout, GptArch};
use dalle_store::{Location, StoreConfig};
use dalle_train::config::JobConfig;
use dalle_train::ddp::DataParallel;

#[test]
fn training_on_images_through_the_frozen_dvae_lowers_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let mut job = job(dir.path());
    prepare(&job);
    job.gpt.train.data_url = Some(job.data_url());
    let report = dalle_train::gpt::train(&job, &mut DataParallel::solo(), |_| {}).unwrap();
    assert_eq!(report.logs.len(), 3);
    let (first, last) = (&report.logs[0], &report.logs[2]);
    assert!(
        last.loss < first.loss * 0.8 && last.text_loss < first.text_loss,
        "the loss did not fall: {first} → {last}"
    );
    assert!(last.tokens_per_s > 0.0 && last.images_per_s > 0.0);
    assert!(report.weights.is_file());
    assert_eq!(report.truncated_captions, 0);
    let lines = std::fs::read_to_string(job.run.dir.join("gpt-metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 3);
}

/// Writes `rows` as the pre-tokenized data under `dir` and trains the job
/// on it: the error it must end with.
fn train_on_tokens(job: &mut JobConfig, dir: &std::path::Path, rows: &[TokenRow]) -> String {
    let url = dir.join("tokens").display().to_string();
    let location = Location::parse(&url, &StoreConfig::default()).unwrap();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(tokens::write(&location, "part-0.parquet", rows, 16))
        .unwrap();
    job.gpt.train.data_url = Some(url);
    dalle_train::gpt::train(job, &mut DataParallel::solo(), |_| {})
        .err()
        .unwrap()
        .to_string()
}

#[test]
fn tokens_of_another_dvae_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut job = job(dir.path());
    prepare(&job);
    // Grids of 3×3 tokens; the job's dVAE makes 2×2.
    let rows: Vec<TokenRow> = (0..32)
        .map(|i| TokenRow {
            key: format!("k{i}"),
            caption: "a red circle".into(),
            tokens: vec![1; 9],
        })
        .collect();
    let err = train_on_tokens(&mut job, dir.path(), &rows);
    assert!(
        err.contains("9 tokens") && err.contains("grids of 4"),
        "{err}"
    );
}

#[test]
fn a_token_outside_the_codebook_is_refused_where_it_is_read_naming_the_sample() {
    let dir = tempfile::tempdir().unwrap();
    let mut job = job(dir.path());
    prepare(&job);
    let vocab = job.dvae.model.vocab_size as u16;
    let grid = (job.dvae.model.grid_size() * job.dvae.model.grid_size()) as u16;
    let rows: Vec<TokenRow> = (0..32)
        .map(|i| TokenRow {
            key: format!("k{i}"),
            caption: "a red circle".into(),
            // One sample's last token is one past the codebook.
            tokens: (0..grid)
                .map(|t| {
                    if i == 5 && t + 1 == grid {
                        vocab
                    } else {
                        t % vocab
                    }
                })
                .collect(),
        })
        .collect();
    let err = train_on_tokens(&mut job, dir.path(), &rows);
    assert!(
        err.contains("sample k5") && err.contains(&format!("image token {vocab}")),
        "{err}"
    );
}

#[test]
fn accumulated_micro_batches_give_the_whole_batch_gradient() {
    use dalle_model::gpt::{Gpt, GptConfig};
    let config = GptConfig {
        arch: GptArch {
            dim: 16,
            depth: 1,
            heads: 2,
            attention: AttentionLayout::Dense,
            ..GptArch::default()
        },
        text_vocab: 12,
        text_len: 4,
        image_vocab: 8,
        image_grid: 2,
    };
    tch::manual_seed(3);
    let model = Gpt::new(config, tch::Device::Cpu).unwrap();
    let opts = (tch::Kind::Int64, tch::Device::Cpu);
    // 7 samples: micro-batches of 3 leave a last slice of 1.
    let text = tch::Tensor::randint(12, [7, 4], opts);
    let image = tch::Tensor::randint(8, [7, 4], opts);
    let grads = |micro: usize| {
        for (_, mut p) in model.named_parameters() {
            p.zero_grad();
        }
        let parts =
            dalle_train::gpt::accumulate_gradients(&model, &text, &image, micro, 0.125).unwrap();
        let grads: Vec<tch::Tensor> = model
            .named_parameters()
            .iter()
            .map(|(_, p)| p.grad().copy())
            .collect();
        (parts, grads)
    };
    let (whole_parts, whole) = grads(7);
    let (micro_parts, micro) = grads(3);
    assert!((&whole_parts - &micro_parts).abs().max().double_value(&[]) < 1e-5);
    for (a, b) in whole.iter().zip(&micro) {
        assert!((a - b).abs().max().double_value(&[]) < 1e-5);
    }
    // And the gradient is not trivially zero.
    assert!(
        whole
            .iter()
            .any(|g| g.abs().sum(tch::Kind::Float).double_value(&[]) > 0.0)
    );
}

#[test]
fn a_step_hook_sees_every_step_and_can_stop_training_at_a_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let mut job = job(dir.path());
    prepare(&job);
    job.gpt.train.data_url = Some(job.data_url());
    job.gpt.train.log_every = 2;
    let (tx, rx) = std::sync::mpsc::channel();
    let hook = Box::new(move |end: &dalle_train::ddp::StepEnd| {
        tx.send(*end).unwrap();
        if end.step == 5 {
            return Err(dalle_train::TrainError::Stopped("told to re-form".into()));
        }
        Ok(())
    });
    let mut ddp = DataParallel::solo().with_step_hook(hook);
    let err = dalle_train::gpt::train(&job, &mut ddp, |_| {})
        .err()
        .unwrap();
    assert!(err.to_string().contains("told to re-form"), "{err}");
    let seen: Vec<_> = rx.try_iter().collect();
    assert_eq!(
        seen.iter().map(|e| e.step).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert!(seen.iter().all(|e| e.samples_per_second > 0.0));
    // The loss is that of the last step read off the device: none before
    // the first log step, then every step's.
    assert!(seen[0].loss.is_nan(), "{:?}", seen[0]);
    assert!(seen[1..].iter().all(|e| e.loss.is_finite()), "{seen:?}");
}

/// The steps' losses are read from the device only at log and checkpoint
/// steps: a run that diverges between them still fails naming the first
/// step whose loss was not finite, and writes no checkpoint after it.
#[test]
fn divergence_between_log_steps_is_named_and_never_checkpointed() {
    let dir = tempfile::tempdir().unwrap();
    let mut job = job(dir.path());
    prepare(&job);
    job.gpt.train.data_url = Some(job.data_url());
    job.gpt.train.steps = 12;
    job.gpt.train.log_every = 100;
    job.gpt.train.grad_clip = None;
    // Weights of ~1e30 after the first update overflow every matmul.
    job.gpt.train.lr = dalle_train::schedule::Cosine::new(1e30, 1e30, 12);
    job.checkpoint.every = 3;
    let err = dalle_train::gpt::train(&job, &mut DataParallel::solo(), |_| {}).unwrap_err();
    let dalle_train::TrainError::Diverged { step, loss } = err else {
        panic!("expected divergence, got {err}");
    };
    assert!(!loss.is_finite());
    assert!((1..3).contains(&step), "diverged at step {step}");
    // Step `step` (0-based) is the first bad one: a checkpoint of a later
    // step would hold its weights.
    let saved = job.run.dir.join("checkpoints").join("gpt");
    let later: Vec<_> = std::fs::read_dir(&saved)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        later
            .iter()
            .all(|n| !n.to_string_lossy().starts_with("step-")),
        "checkpoints written after divergence: {later:?}"
    );
}
