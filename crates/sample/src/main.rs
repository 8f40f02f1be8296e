//! `dalle-sample BUNDLE --prompt "…"`: images from an exported bundle, one
//! PNG per image and a grid per prompt.

use anyhow::{Context, Result, bail};
use clap::Parser;
use dalle_model::device::parse_device;
use dalle_model::images::grid;
use dalle_sample::bundle::Bundle;
use dalle_sample::generate::{Request, generate, read_prompts};
use dalle_store::{Location, StoreConfig};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "dalle-sample",
    version,
    about = "Generate images from a dalle-rs bundle"
)]
struct Args {
    /// The bundle (`dalle export`): a directory, or a file://, s3:// URL.
    bundle: String,
    /// A prompt (repeatable).
    #[arg(long = "prompt", short = 'p')]
    prompts: Vec<String>,
    /// A file of prompts, one per line (`#` starts a comment line).
    #[arg(long)]
    prompts_file: Option<PathBuf>,
    /// Where the PNGs go.
    #[arg(long, default_value = "samples")]
    out: PathBuf,
    #[arg(long, short = 'n', default_value_t = 4)]
    images_per_prompt: usize,
    /// (prompt, image) pairs sampled at once.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Overrides the bundle's default.
    #[arg(long)]
    temperature: Option<f64>,
    /// Keep only the k most likely tokens (0: all); overrides the bundle's default.
    #[arg(long)]
    top_k: Option<i64>,
    /// Nucleus sampling threshold (1: off); overrides the bundle's default.
    #[arg(long)]
    top_p: Option<f64>,
    /// Classifier-free guidance scale (1: off); overrides the bundle's default.
    #[arg(long)]
    guidance_scale: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Recompute every prefix instead of using the KV cache (slow; for comparison).
    #[arg(long)]
    no_cache: bool,
    /// S3-compatible endpoint for s3:// bundles (credentials from AWS_* variables).
    #[arg(long, env = "DALLE_STORE__ENDPOINT")]
    endpoint: Option<String>,
    #[arg(long, env = "DALLE_STORE__REGION")]
    region: Option<String>,
}

fn slug(prompt: &str) -> String {
    let s: String = prompt
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let s = s
        .split('-')
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    s.chars().take(48).collect()
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut prompts = args.prompts.clone();
    if let Some(file) = &args.prompts_file {
        prompts.extend(read_prompts(file)?);
    }
    if prompts.is_empty() {
        bail!("no prompts: give --prompt TEXT or --prompts-file FILE");
    }
    let device = parse_device(&args.device)?;
    let store = StoreConfig {
        endpoint: args.endpoint.clone(),
        region: args.region.clone(),
        ..StoreConfig::default()
    };
    let location = Location::parse(&args.bundle, &store)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let loading = Instant::now();
    let bundle = runtime.block_on(Bundle::load(&location, device))?;
    let g = bundle.gpt.config();
    tracing::info!(
        bundle = %location.url, ?device, text_len = g.text_len, image_grid = g.image_grid,
        "bundle loaded in {:.1} s", loading.elapsed().as_secs_f64()
    );

    let mut sampling = bundle.manifest.sampling.clone();
    sampling.temperature = args.temperature.unwrap_or(sampling.temperature);
    sampling.top_k = args.top_k.unwrap_or(sampling.top_k);
    sampling.top_p = args.top_p.unwrap_or(sampling.top_p);
    sampling.guidance_scale = args.guidance_scale.unwrap_or(sampling.guidance_scale);
    sampling.seed = args.seed.unwrap_or(sampling.seed);
    let request = Request {
        prompts: prompts.clone(),
        images_per_prompt: args.images_per_prompt,
        batch_size: args.batch_size,
        sampling,
        use_cache: !args.no_cache,
    };
    let total = (prompts.len() * args.images_per_prompt) as u64 * g.image_len() as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {pos}/{len} tokens ({per_sec}, eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message("sampling");
    let started = Instant::now();
    let images = generate(&bundle, &request, |done| bar.set_position(done))?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    for (i, (prompt, row)) in prompts.iter().zip(&images).enumerate() {
        let stem = format!("{:03}-{}", i + 1, slug(prompt));
        for (j, image) in row.iter().enumerate() {
            let path = args.out.join(format!("{stem}-{:02}.png", j + 1));
            image
                .save(&path)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        let path = args.out.join(format!("{stem}-grid.png"));
        grid(std::slice::from_ref(row), 2)
            .save(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let count = images.iter().map(Vec::len).sum::<usize>();
    println!(
        "{count} images for {} prompts in {seconds:.1} s: {:.2} images/s, {:.0} image tokens/s ({})",
        prompts.len(),
        count as f64 / seconds,
        total as f64 / seconds,
        args.out.display()
    );
    Ok(())
}
