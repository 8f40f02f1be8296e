//! The reranker learns which caption belongs to which image, and its data
//! parallelism is exact: the contrastive loss spans the global batch, so
//! two ranks with half the batch each train as one process with all of it.

mod common;

use common::{on_ranks, prepare, stage2_job};
use dalle_data::synth::Scene;
use dalle_model::rerank::Reranker;
use dalle_model::text::TextTokenizer;
use dalle_train::config::{JobConfig, JobStage};
use dalle_train::ddp::DataParallel;
use dalle_train::rerank::RerankLog;
use dalle_train::schedule::Cosine;
use tch::{Device, Kind, Tensor};

/// Shapes at 32 px (16 px leaves too little of a star or a ring to tell
/// apart), a validation split, and a small reranker.
fn job(dir: &std::path::Path) -> JobConfig {
    let mut job = stage2_job(dir);
    job.synth.count = 768;
    job.synth.image_size = 32;
    job.dvae.model.image_size = 32;
    job.data.validation.fraction = 0.1;
    job.data.validation.max_samples = 64;
    job.run.stages = JobStage::ALL.to_vec();
    job.rerank.model = dalle_model::rerank::RerankArch {
        image_width: 16,
        dim: 64,
        depth: 2,
        heads: 4,
        embed_dim: 64,
    };
    let t = &mut job.rerank.train;
    t.steps = 240;
    t.batch_size = 32;
    t.log_every = 40;
    t.save_every = 0;
    t.eval_every = 120;
    t.adamw.weight_decay = 0.01;
    t.lr = Cosine {
        start: 2e-3,
        end: 2e-5,
        steps: 240,
        warmup: 20,
    };
    job.validate().unwrap();
    job
}

fn losses(logs: &[RerankLog]) -> Vec<f64> {
    logs.iter().map(|l| l.loss).collect()
}

#[test]
fn the_matching_caption_ranks_first_for_most_held_out_images() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    prepare(&job);
    let report = dalle_train::rerank::train(&job, &mut DataParallel::solo(), |_| {}).unwrap();
    let first = report.logs.first().unwrap();
    let last = report.logs.last().unwrap();
    assert!(last.loss < first.loss * 0.7, "{first} → {last}");
    let held = report.validation.last().unwrap();
    assert!(held.val_samples > 32, "{held}");
    assert!(held.val_top1 > 10.0 * held.val_chance, "{held}");

    // Images it never saw (another seed), 32 at a time, each against the
    // 32 captions of its batch.
    let model = Reranker::load(&report.weights, Device::Cpu).unwrap();
    let tokenizer = TextTokenizer::load(&job.tokenizer_path()).unwrap();
    let scenes: Vec<Scene> = (0..64).map(|i| Scene::sample(991, i)).collect();
    let mut right = 0;
    for group in scenes.chunks(32) {
        let pixels: Vec<f32> = group
            .iter()
            .flat_map(|s| {
                let img = s.render(32);
                let mut chw = vec![0f32; 3 * 32 * 32];
                for (i, p) in img.pixels().enumerate() {
                    for c in 0..3 {
                        chw[c * 1024 + i] = f32::from(p.0[c]) / 255.0;
                    }
                }
                chw
            })
            .collect();
        let images = Tensor::from_slice(&pixels).view([group.len() as i64, 3, 32, 32]);
        let ids: Vec<i64> = group
            .iter()
            .flat_map(|s| {
                tokenizer
                    .encode(&s.caption(), job.text.text_len)
                    .unwrap()
                    .ids
            })
            .collect();
        let ids = Tensor::from_slice(&ids).view([group.len() as i64, -1]);
        let similarity = tch::no_grad(|| {
            let i = model.embed_images(&images).unwrap();
            let c = model.embed_captions(&ids).unwrap();
            i.matmul(&c.tr())
        });
        let own = similarity.diagonal(0, 0, 1);
        let best = similarity.amax(&[1i64][..], false);
        right += own
            .ge_tensor(&(best - 1e-5))
            .to_kind(Kind::Int64)
            .sum(Kind::Int64)
            .int64_value(&[]);
    }
    println!("{first}\n{last}\n{held}\nown caption first for {right} of 64 held-out images");
    assert!(
        right > 32,
        "own caption first for {right} of 64 held-out images"
    );
}

#[test]
fn two_ranks_train_as_one_process_with_the_whole_batch() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let mut job = job(dir.path());
    prepare(&job);
    job.rerank.train.steps = 12;
    job.rerank.train.log_every = 4;
    job.rerank.train.eval_every = 6;
    job.run.verify_every = 1;
    let solo = dalle_train::rerank::train(&job, &mut DataParallel::solo(), |_| {}).unwrap();
    let solo_weights = Reranker::load(&solo.weights, Device::Cpu).unwrap();

    let mut job2 = job.clone();
    job2.data.url = Some(job.data_url());
    job2.run.dir = dir.path().join("w2");
    std::fs::create_dir_all(&job2.run.dir).unwrap();
    std::fs::copy(job.tokenizer_path(), job2.tokenizer_path()).unwrap();
    let reports = on_ranks(2, move |ddp| {
        dalle_train::rerank::train(&job2, ddp, |_| {})
            .map(|r| (losses(&r.logs), r.validation, r.weights))
    });
    let reports: Vec<_> = reports.into_iter().map(Result::unwrap).collect();
    assert_eq!(reports[0].0, reports[1].0, "ranks logged different losses");
    for (a, b) in reports[0].0.iter().zip(losses(&solo.logs)) {
        assert!((a - b).abs() < 1e-4, "two ranks: loss {a}, alone {b}");
    }
    for (a, b) in reports[0].1.iter().zip(&solo.validation) {
        assert_eq!(a.val_samples, b.val_samples);
        assert!((a.val_top1 - b.val_top1).abs() < 1e-9, "{a} vs {b}");
    }
    let weights = Reranker::load(&reports[0].2, Device::Cpu).unwrap();
    for ((name, a), (_, b)) in weights
        .named_parameters()
        .iter()
        .zip(solo_weights.named_parameters().iter())
    {
        let diff = (a - b).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "{name} differs from one process by {diff}");
    }
}
