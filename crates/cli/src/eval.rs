//! `dalle eval`: what a trained run is worth, as `<out>/eval.json`, pictures
//! and a summary. On held-out images (see [`held_out`]): the dVAE's
//! reconstructions against both baselines, its codebook usage and
//! per-colour errors; the attribute probes' accuracy on the held-out images
//! and on their reconstructions (no transformer needed); the transformer's
//! held-out loss ([`stage2`]); and prompt fidelity, samples for held-out
//! and unseen captions judged by those probes ([`fidelity`]). A section the run cannot fill (no
//! transformer yet, captions that are not synthetic) is left out with a
//! note saying why. With a reranker (the optional `rerank` stage), fidelity
//! again with each sample the reranker's best of N candidates ([`best_of`]).

mod best_of;
mod fidelity;
mod held_out;
mod stage2;

use crate::dvae::{reconstruction_grid, save_png, write_atomically};
use crate::progress;
use anyhow::{Context, Result};
use clap::Args;
use dalle_eval::report::{DvaeReport, EvalReport, HeldOutImages};
use dalle_eval::{CodebookUsage, ReconReport};
use dalle_model::dvae::Dvae;
use dalle_train::config::JobConfig;
use dalle_train::feed::runtime_device;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Images of the reconstruction grid: 4 rows of 8 originals, each above
/// its reconstructions.
const GRID_IMAGES: i64 = 32;
/// Images per dVAE pass.
const DVAE_BATCH: i64 = 64;
const REPORT: &str = "eval.json";
const GRID: &str = "reconstructions.png";

#[derive(Args)]
pub struct EvalArgs {
    /// Held-out image files or datasets (paths or URLs). Default: the job's
    /// validation set (`data.validation`), else fresh synthetic scenes of
    /// another seed than `synth.seed`.
    inputs: Vec<String>,
    /// dVAE weights; defaults to `<run.dir>/dvae.safetensors`.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Sampler bundle (path or URL); defaults to `<run.dir>/bundle`, else
    /// the run's `gpt.safetensors` and `tokenizer.json`.
    #[arg(long)]
    bundle: Option<String>,
    /// Where eval.json and the pictures go; defaults to `<run.dir>/eval`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Held-out images; defaults to `data.validation.max_samples`.
    #[arg(long)]
    count: Option<usize>,
    /// Prompts to sample for fidelity (0: no fidelity).
    #[arg(long, default_value_t = 16)]
    prompts: usize,
    #[arg(long, default_value_t = 4)]
    samples_per_prompt: usize,
    /// Fidelity again with each sample the reranker's best of N candidates,
    /// for each N of a comma-separated list ("" or 0: not measured).
    #[arg(long, default_value = "8,32", value_parser = parse_candidates)]
    rerank_candidates: Candidates,
    /// Seeds the samples and the probes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Training images the probes learn from.
    #[arg(long, default_value_t = 2000)]
    probe_images: usize,
    /// Samples per transformer pass (held-out loss and sampling).
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Print eval.json on stdout instead of the summary.
    #[arg(long)]
    json_only: bool,
}

/// The candidate counts of `--rerank-candidates`: distinct, ascending, none
/// 0 (empty: reranking not measured).
#[derive(Clone, Debug, PartialEq)]
pub struct Candidates(pub Vec<usize>);

/// "8,32" → [8, 32]; "" and "0" → none.
fn parse_candidates(list: &str) -> std::result::Result<Candidates, String> {
    let mut counts = Vec::new();
    for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let n: usize = item.parse().map_err(|_| {
            format!("`{item}` is not a number of candidates (give a list such as 8,32)")
        })?;
        if n > 0 {
            counts.push(n);
        }
    }
    counts.sort_unstable();
    counts.dedup();
    Ok(Candidates(counts))
}

pub fn run(args: EvalArgs, job: &JobConfig) -> Result<()> {
    let device = runtime_device(job)?;
    let weights = args
        .weights
        .clone()
        .unwrap_or_else(|| job.dvae_weights_path());
    let dvae = Dvae::load(&weights, device)
        .with_context(|| format!("loading dVAE weights {}", weights.display()))?;
    let out = args.out.clone().unwrap_or_else(|| job.run.dir.join("eval"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    // Before any long work: a --bundle that does not load fails here.
    let transformer = stage2::load(job, args.bundle.as_deref(), &dvae, device)?;
    // So does a reranker that does not fit it; a missing one is a note.
    let rerank = !args.rerank_candidates.0.is_empty() && args.prompts * args.samples_per_prompt > 0;
    let reranker = match &transformer {
        Ok(model) if rerank => Some(best_of::load(job, args.bundle.as_deref(), model, device)?),
        _ => None,
    };
    let count = args.count.unwrap_or(job.data.validation.max_samples);
    let held = held_out::read(job, &args.inputs, &dvae, count)?;
    tracing::info!(images = held.len(), source = ?held.source, "held-out images read");

    let mut notes = Vec::new();
    let (dvae_report, tokens, reconstructions) = measure_dvae(&dvae, &weights, &held, job, &out)?;
    let plan = fidelity::Plan {
        prompts: args.prompts,
        samples_per_prompt: args.samples_per_prompt,
        seed: args.seed,
        probe_images: args.probe_images,
        batch_size: args.batch_size,
        rerank_candidates: args.rerank_candidates.0.clone(),
    };
    let held_out = fidelity::HeldOutAndReconstructions {
        held: &held,
        reconstructions: &reconstructions,
    };
    let side = dvae.config().image_size;
    let probes = match fidelity::train_probes(job, &held_out, side, &plan, device)? {
        Ok(probes) => Some(probes),
        Err(why) => {
            notes.push(format!("probes not trained: {why}"));
            None
        }
    };
    let (mut gpt, mut fidelity) = (None, None);
    match transformer {
        Err(why) => notes.push(format!("gpt and fidelity not measured: {why}")),
        Ok(model) => {
            let weight = job.gpt.train.text_loss_weight;
            gpt = stage2::held_out_loss(&model, &held.captions, &tokens, weight, args.batch_size)?;
            if gpt.is_none() {
                notes.push("gpt not measured: no held-out image has a caption".into());
            }
            let loaded = reranker.as_ref().and_then(|r| r.as_ref().ok());
            let measured = match &probes {
                None => Err("no probes to judge samples with".to_string()),
                Some(p) => fidelity::measure(job, &model, p, &plan, loaded, &out, device)?,
            };
            match measured {
                Ok(report) => {
                    if let Some(Err(why)) = &reranker {
                        notes.push(format!("reranking not measured: {why}"));
                    }
                    fidelity = Some(report)
                }
                Err(why) => notes.push(format!("fidelity not measured: {why}")),
            }
        }
    }
    let report = EvalReport {
        held_out: HeldOutImages {
            source: held.source.clone(),
            images: held.len(),
            synthetic_captions: held.attributes().len(),
        },
        dvae: Some(dvae_report),
        probes: probes.map(|p| p.report),
        gpt,
        fidelity,
        notes,
    };
    let json = serde_json::to_string_pretty(&report)?;
    let path = out.join(REPORT);
    write_atomically(&path, format!("{json}\n").as_bytes())?;
    if args.json_only {
        println!("{json}");
    } else {
        print!("{}", report.summary());
        println!("report: {}", path.display());
    }
    Ok(())
}

/// Reconstruction, codebook usage and the grid; returns the `(N, h, w)`
/// tokens too, which the transformer's held-out loss reads, and the
/// `(N, 3, S, S)` reconstructions, which the probes judge.
fn measure_dvae(
    dvae: &Dvae,
    weights: &Path,
    held: &held_out::HeldOutSet,
    job: &JobConfig,
    out: &Path,
) -> Result<(DvaeReport, Tensor, Tensor)> {
    let n = held.len();
    let bar = progress::bar(n as u64, "reconstructing");
    let batches = held.images.split(DVAE_BATCH, 0).into_iter().map(Ok);
    let r = dalle_train::eval::reconstruct_with_progress(dvae, batches, n, |done| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    // Image files named on the command line have no caption.
    let captions: Vec<&str> = (0..n)
        .map(|i| held.captions.get(i).map_or("", String::as_str))
        .collect();
    let recon = ReconReport::compute(&r.originals, &r.reconstructions, &captions)?;
    let codebook = CodebookUsage::of(
        &r.tokens,
        dvae.config().vocab_size,
        job.dvae.train.batch_size,
    )?;
    let shown = GRID_IMAGES.min(n as i64);
    let picture = reconstruction_grid(
        &r.originals.narrow(0, 0, shown),
        &r.reconstructions.narrow(0, 0, shown),
    )?;
    save_png(&picture, &out.join(GRID))?;
    let report = DvaeReport {
        weights: weights.display().to_string(),
        psnr_over_mean_colour: recon.reconstruction.psnr - recon.mean_colour_baseline.psnr,
        recon,
        codebook,
        grid: GRID.into(),
    };
    Ok((report, r.tokens, r.reconstructions))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        eval: EvalArgs,
    }

    fn candidates(args: &[&str]) -> std::result::Result<Vec<usize>, String> {
        let argv = std::iter::once("eval").chain(args.iter().copied());
        Cli::try_parse_from(argv)
            .map(|cli| cli.eval.rerank_candidates.0)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn rerank_candidates_parse_lists_and_turn_off() {
        assert_eq!(candidates(&[]).unwrap(), [8, 32]);
        assert_eq!(
            candidates(&["--rerank-candidates", "8,32"]).unwrap(),
            [8, 32]
        );
        assert_eq!(
            candidates(&["--rerank-candidates", "32, 8,8"]).unwrap(),
            [8, 32]
        );
        assert_eq!(candidates(&["--rerank-candidates=4"]).unwrap(), [4]);
        assert!(
            candidates(&["--rerank-candidates", "0"])
                .unwrap()
                .is_empty()
        );
        assert!(candidates(&["--rerank-candidates", ""]).unwrap().is_empty());
        assert!(candidates(&["--rerank-candidates="]).unwrap().is_empty());
        assert_eq!(candidates(&["--rerank-candidates", "0,16"]).unwrap(), [16]);
        let err = candidates(&["--rerank-candidates", "8,many"]).unwrap_err();
        assert!(
            err.contains("`many` is not a number of candidates"),
            "{err}"
        );
    }
}
