//! Stage 2 end to end, as a user runs it: synthetic shapes → dVAE →
//! caption tokenizer → pre-tokenized data → transformer → bundle exported
//! to a real S3-compatible server (Garage) → images from that bundle.
//! The images must show what the prompt asks for more often than chance:
//! their dominant colour is one of the prompt's two colours.

mod support;

use dalle_data::synth::{BACKGROUNDS, COLORS, SHAPES};
use dalle_model::gpt::sample::SamplingConfig;
use dalle_sample::bundle::Bundle;
use dalle_sample::generate::{Request, generate};
use dalle_store::{Location, StoreConfig};
use image::RgbImage;
use std::path::Path;
use std::process::Command;
use support::garage::Garage;

const DALLE: &str = env!("CARGO_BIN_EXE_dalle");

fn dalle(config: &Path, env: &[(&str, String)], args: &[&str]) -> String {
    let started = std::time::Instant::now();
    let out = Command::new(DALLE)
        .envs(env.iter().cloned())
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "dalle {args:?} failed:\n{stderr}");
    eprintln!("dalle {args:?}: {:.1} s", started.elapsed().as_secs_f64());
    String::from_utf8_lossy(&out.stdout).to_string() + &stderr
}

/// The palette colour (index into BACKGROUNDS) most pixels are closest to.
fn dominant_colour(image: &RgbImage) -> usize {
    let mut counts = vec![0usize; BACKGROUNDS.len()];
    for pixel in image.pixels() {
        let nearest = (0..BACKGROUNDS.len())
            .min_by_key(|&i| {
                let c = BACKGROUNDS[i].1;
                (0..3)
                    .map(|k| (i32::from(pixel.0[k]) - i32::from(c[k])).pow(2))
                    .sum::<i32>()
            })
            .expect("palette is not empty");
        counts[nearest] += 1;
    }
    (0..counts.len()).max_by_key(|&i| counts[i]).unwrap()
}

#[test]
fn a_small_model_draws_the_colours_the_prompt_asks_for() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let config = dir.path().join("job.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[run]
dir = "{}"
device = "cpu"
threads = 2

[synth]
count = 1024
image_size = 32
rows_per_file = 1024
rows_per_group = 128

[data]
decode_threads = 1

[dvae.model]
image_size = 32
n_hid = 16
n_blk_per_group = 1
vocab_size = 64
n_init = 32

[dvae.train]
steps = 300
batch_size = 16
log_every = 100
save_every = 0
recon = "mse"
lr = {{ start = 2e-3, end = 1e-4, steps = 300 }}
tau = {{ start = 1.0, end = 0.0625, steps = 300 }}
beta = {{ start = 0.0, end = 1.0, steps = 100 }}

[text]
vocab_size = 320
text_len = 12

[gpt.model]
dim = 64
depth = 2
heads = 4
attention = "sparse"
conv_kernel = 3

[gpt.train]
steps = 300
batch_size = 32
micro_batch = 16
log_every = 50
save_every = 0
caption_dropout = 0.1
lr = {{ start = 2e-3, end = 1e-4, steps = 280, warmup = 20 }}

[gpt.sample]
top_p = 0.9
guidance_scale = 2.0
"#,
            run.display()
        ),
    )
    .unwrap();
    dalle(&config, &[], &["data", "synth"]);
    dalle(&config, &[], &["dvae", "train"]);
    dalle(&config, &[], &["text", "train-tokenizer"]);
    dalle(&config, &[], &["data", "tokenize"]);
    let log = dalle(&config, &[], &["gpt", "train"]);
    assert!(log.contains("tok/s") && log.contains("data wait"), "{log}");

    // The loss fell: first and last log lines of the metrics file.
    let metrics = std::fs::read_to_string(run.join("gpt-metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["image_loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(losses.len(), 6);
    assert!(
        losses[5] < losses[0] * 0.7,
        "the image loss did not fall clearly: {losses:?}"
    );

    // Export to S3 and sample from there, as a separate sampling machine would.
    let garage = Garage::start();
    let url = format!("s3://{}/bundles/shapes", garage.bucket);
    let exported = dalle(&config, &garage.env(), &["export", "--out", &url]);
    assert!(exported.contains(&url), "{exported}");
    for (name, value) in garage.env() {
        // SAFETY: the only test of this binary, and no other thread runs yet.
        unsafe { std::env::set_var(name, value) };
    }
    let store = StoreConfig {
        endpoint: Some(garage.endpoint.clone()),
        ..StoreConfig::default()
    };
    let location = Location::parse(&url, &store).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bundle = runtime
        .block_on(Bundle::load(&location, tch::Device::Cpu))
        .unwrap();
    // Eight prompts, each with another background (never the shape's colour).
    let prompts: Vec<(String, [usize; 2])> = (0..8)
        .map(|i| {
            let background = (i * 3 + 1) % BACKGROUNDS.len();
            let colour = (background + 2) % COLORS.len();
            let prompt = format!(
                "a large {} {} on a {} background",
                COLORS[colour].0,
                SHAPES[i % SHAPES.len()],
                BACKGROUNDS[background].0
            );
            // BACKGROUNDS starts with the shape colours, in order.
            (prompt, [colour, background])
        })
        .collect();
    let per_prompt = 4;
    let request = Request {
        prompts: prompts.iter().map(|(p, _)| p.clone()).collect(),
        images_per_prompt: per_prompt,
        batch_size: 16,
        sampling: bundle.manifest.sampling.clone(),
        use_cache: true,
        cuda_graph: true,
        candidates: None,
        precision: dalle_precision::Precision::Fp32,
    };
    assert_eq!(
        request.sampling,
        SamplingConfig {
            top_p: 0.9,
            guidance_scale: 2.0,
            ..SamplingConfig::default()
        }
    );
    let images = generate(&bundle, &request, |_| {}).unwrap().images;
    let mut hits = 0;
    for ((prompt, colours), row) in prompts.iter().zip(&images) {
        assert_eq!(row.len(), per_prompt);
        for image in row {
            assert_eq!(image.dimensions(), (32, 32));
            let got = dominant_colour(image);
            if colours.contains(&got) {
                hits += 1;
            } else {
                eprintln!("{prompt}: dominant colour {}", BACKGROUNDS[got].0);
            }
        }
    }
    let total = prompts.len() * per_prompt;
    let rate = hits as f64 / total as f64;
    // By chance, 2 of the 10 palette colours.
    assert!(
        rate >= 0.5,
        "only {hits} of {total} images are mostly one of the prompt's colours"
    );
    eprintln!("{hits} of {total} images are mostly one of the prompt's colours");
}
