//! `dalle-sample BUNDLE --prompt "…"`: images from an exported bundle, one
//! PNG per image and a grid per prompt; with `--candidates N`, the
//! reranker's best `-n` of N per prompt and their scores in `scores.json`.

use anyhow::{Context, Result, bail};
use clap::Parser;
use dalle_model::device::parse_device;
use dalle_model::images::grid;
use dalle_precision::PrecisionSetting;
use dalle_sample::bundle::Bundle;
use dalle_sample::generate::{Request, generate, read_prompts};
use dalle_sample::rerank::{self, SCORES_FILE, ScoresReport};
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
    /// Images written per prompt (with --candidates: how many of the best
    /// are kept).
    #[arg(long, short = 'n', default_value_t = 4)]
    images_per_prompt: usize,
    /// Draw N candidates per prompt (N ≥ -n) and keep the -n that the
    /// bundle's reranker scores best, written best first, with every
    /// score in scores.json (the bundle needs a reranker: the rerank
    /// stage). Default: no reranking, -n drawn and written.
    #[arg(long, value_name = "N")]
    candidates: Option<usize>,
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
    /// `auto` (bf16 on a GPU of compute capability 8.0 or newer, fp32
    /// elsewhere), `fp32`, `tf32` or `bf16`.
    #[arg(long, default_value = "auto")]
    precision: PrecisionSetting,
    /// Recompute every prefix instead of using the KV cache (slow; for comparison).
    #[arg(long)]
    no_cache: bool,
    /// On a GPU, run each token's decoding step op by op instead of
    /// replaying it from a CUDA graph (slower; for comparison, or should a
    /// driver refuse graphs).
    #[arg(long)]
    no_cuda_graph: bool,
    /// S3-compatible endpoint for s3:// bundles (credentials from AWS_* variables).
    #[arg(long, env = "DALLE_STORE__ENDPOINT")]
    endpoint: Option<String>,
    #[arg(long, env = "DALLE_STORE__REGION")]
    region: Option<String>,
    /// How log lines look on stderr: `text` for people, `json` (one object
    /// a line) for log pipelines.
    #[arg(long, env = "DALLE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// How log lines look (as `dalle --log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr; `RUST_LOG` filters (default `info`).
fn init_logging(format: LogFormat) {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match format {
        // Colour codes only for a person at a terminal, as `dalle` does.
        LogFormat::Text => logs
            .with_ansi(
                std::io::IsTerminal::is_terminal(&std::io::stderr())
                    && std::env::var_os("NO_COLOR").is_none(),
            )
            .init(),
        LogFormat::Json => logs.json().with_ansi(false).init(),
    }
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
    let args = Args::parse();
    init_logging(args.log_format);
    let mut prompts = args.prompts.clone();
    if let Some(file) = &args.prompts_file {
        prompts.extend(read_prompts(file)?);
    }
    if prompts.is_empty() {
        bail!("no prompts: give --prompt TEXT or --prompts-file FILE");
    }
    rerank::check_counts(args.candidates, args.images_per_prompt)?;
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
    if args.candidates.is_some() && bundle.reranker.is_none() {
        bail!(rerank::no_reranker(&format!("bundle {}", location.url)));
    }
    let g = bundle.gpt.config();
    let precision = args.precision.resolve(device);
    tracing::info!(
        bundle = %location.url, ?device, precision = precision.name(), text_len = g.text_len,
        image_grid = g.image_grid,
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
        cuda_graph: !args.no_cuda_graph,
        candidates: args.candidates,
        precision,
    };
    let total = (prompts.len() * request.drawn_per_prompt()) as u64 * g.image_len() as u64;
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
    let generated = generate(&bundle, &request, |done| bar.set_position(done))?;
    bar.finish_and_clear();
    let images = generated.images;
    let seconds = started.elapsed().as_secs_f64();

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut files: Vec<Vec<String>> = Vec::with_capacity(images.len());
    for (i, (prompt, row)) in prompts.iter().zip(&images).enumerate() {
        let stem = format!("{:03}-{}", i + 1, slug(prompt));
        let mut names = Vec::with_capacity(row.len());
        for (j, image) in row.iter().enumerate() {
            let name = format!("{stem}-{:02}.png", j + 1);
            let path = args.out.join(&name);
            image
                .save(&path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            names.push(name);
        }
        files.push(names);
        let path = args.out.join(format!("{stem}-grid.png"));
        grid(std::slice::from_ref(row), 2)
            .save(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(scores) = &generated.scores {
        let report = ScoresReport::new(scores, &files, request.sampling.seed);
        let path = args.out.join(SCORES_FILE);
        let json = serde_json::to_vec_pretty(&report).expect("scores serialise");
        std::fs::write(&path, json).with_context(|| format!("cannot write {}", path.display()))?;
        let (kept, all) = report.means();
        println!(
            "kept the reranker's best {} of {} candidates per prompt: mean score {kept:.3} kept, \
             {all:.3} over all candidates ({})",
            args.images_per_prompt,
            request.drawn_per_prompt(),
            path.display()
        );
    }
    let count = images.iter().map(Vec::len).sum::<usize>();
    // Throughput is of images drawn: with --candidates, more than written.
    let drawn = prompts.len() * request.drawn_per_prompt();
    let of_drawn = if drawn == count {
        String::new()
    } else {
        format!(" (best of {drawn} drawn)")
    };
    println!(
        "{count} images{of_drawn} for {} prompts in {seconds:.1} s: {:.2} images/s, {:.0} image \
         tokens/s ({})",
        prompts.len(),
        drawn as f64 / seconds,
        total as f64 / seconds,
        args.out.display()
    );
    Ok(())
}
