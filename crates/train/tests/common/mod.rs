//! What the training tests share: a tiny job whose run directory holds a
//! synthetic dataset, a random dVAE and a caption tokenizer; ranks joined
//! by a TCP ring on loopback. Not every test binary uses every helper.
#![allow(dead_code)]

use dalle_collective::{RingConfig, RingSecret, TcpRing};
use dalle_data::synth::{self, SynthConfig};
use dalle_model::dvae::{Dvae, DvaeConfig};
use dalle_model::gpt::{AttentionLayout, GptArch};
use dalle_model::text::{TextConfig, TextTokenizer};
use dalle_train::config::JobConfig;
use dalle_train::ddp::DataParallel;
use dalle_train::schedule::Cosine;
use std::net::TcpListener;
use std::time::Duration;

pub fn stage2_job(dir: &std::path::Path) -> JobConfig {
    let mut job = JobConfig::default();
    job.run.dir = dir.join("run");
    job.run.device = "cpu".into();
    job.synth = SynthConfig {
        count: 256,
        image_size: 16,
        rows_per_file: 128,
        rows_per_group: 32,
        ..SynthConfig::default()
    };
    job.dvae.model = DvaeConfig {
        image_size: 16,
        n_hid: 8,
        n_blk_per_group: 1,
        vocab_size: 16,
        n_init: 8,
        ..DvaeConfig::default()
    };
    job.text = TextConfig {
        vocab_size: 300,
        text_len: 24,
        ..TextConfig::default()
    };
    job.gpt.model = GptArch {
        dim: 32,
        depth: 2,
        heads: 2,
        attention: AttentionLayout::Dense,
        ..GptArch::default()
    };
    let t = &mut job.gpt.train;
    t.steps = 60;
    t.batch_size = 16;
    t.micro_batch = 8;
    t.log_every = 20;
    t.save_every = 0;
    t.caption_dropout = 0.1;
    t.lr = Cosine {
        start: 3e-3,
        end: 1e-4,
        steps: 55,
        warmup: 5,
    };
    job.validate().unwrap();
    job
}

/// A dataset, a random dVAE and a tokenizer in the job's run directory.
pub fn prepare(job: &JobConfig) {
    synth::write_dataset(&job.data_dir().unwrap(), &job.synth, |_| {}).unwrap();
    tch::manual_seed(0);
    let dvae = Dvae::new(job.dvae.model.clone(), tch::Device::Cpu).unwrap();
    dvae.save(&job.dvae_weights_path()).unwrap();
    let captions =
        (0..job.synth.count as u64).map(|i| synth::Scene::sample(job.synth.seed, i).caption());
    TextTokenizer::train(captions, &job.text)
        .unwrap()
        .save(&job.tokenizer_path())
        .unwrap();
}

/// A dVAE-only job that trains in seconds on `images` synthetic 32 px
/// shapes (written to its run directory): a 32 px dVAE of 64 codes.
pub fn small_dvae_job(dir: &std::path::Path, images: usize) -> JobConfig {
    let mut job = JobConfig::default();
    job.run.dir = dir.join("run");
    job.run.device = "cpu".into();
    job.synth = SynthConfig {
        count: images,
        image_size: 32,
        rows_per_file: images / 2,
        rows_per_group: images / 8,
        ..SynthConfig::default()
    };
    job.dvae.model = DvaeConfig {
        image_size: 32,
        n_hid: 16,
        n_blk_per_group: 1,
        vocab_size: 64,
        n_init: 32,
        ..DvaeConfig::default()
    };
    synth::write_dataset(&job.data_dir().unwrap(), &job.synth, |_| {}).unwrap();
    job
}

/// Runs `train` on `world` ranks (threads joined by a TCP ring, with small
/// gradient buckets so a step takes several) and returns each rank's result.
pub fn on_ranks<T: Send + 'static>(
    world: usize,
    train: impl Fn(&mut DataParallel) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    on_ranks_overlapping(world, true, train)
}

/// [`on_ranks`], with gradient buckets reduced during backward (the
/// default) or after it.
pub fn on_ranks_overlapping<T: Send + 'static>(
    world: usize,
    overlap: bool,
    train: impl Fn(&mut DataParallel) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let listeners: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    // One secret for the whole ring, as the coordinator hands out.
    let secret = RingSecret::random();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let (peers, train, secret) = (peers.clone(), train.clone(), secret.clone());
            std::thread::spawn(move || {
                let config = RingConfig {
                    session: 7,
                    secret,
                    connect_timeout: Duration::from_secs(30),
                    io_timeout: Duration::from_secs(60),
                    ..RingConfig::default()
                };
                let ring = TcpRing::connect(rank, peers, listener, config).unwrap();
                train(&mut DataParallel::new(Box::new(ring), 16 * 1024).with_overlap(overlap))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}
