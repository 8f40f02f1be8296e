//! Prompt fidelity as `dalle eval` measures it: the probes learn the
//! attributes from the job's synthetic images, their accuracy on the
//! held-out images is the ceiling, then the bundle draws samples for
//! held-out captions (half of them with (colour, shape) pairs the
//! training captions never hold, when there are such pairs) and the
//! probes judge each sample against its caption; with a reranker, again
//! with each sample the reranker's best of N candidates.

use super::best_of;
use super::held_out::{self, HeldOutSet};
use super::stage2::Stage2;
use crate::dvae::save_png;
use anyhow::{Context, Result};
use dalle_data::synth::Combo;
use dalle_eval::fidelity::{self, FidelityReport, ProbeReport, Reranked, Row, Scores};
use dalle_eval::probes::MIN_SIDE;
use dalle_eval::{AttributeAccuracy, Attributes, ProbeConfig, Probes, scenes};
use dalle_model::images::grid;
use dalle_sample::generate::{Request, generate};
use dalle_train::config::JobConfig;
use indicatif::ProgressBar;
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;
use tch::{Device, Tensor};

pub const PICTURE: &str = "fidelity.png";
pub const CAPTIONS: &str = "fidelity.json";

/// What to draw and how.
pub struct Plan {
    pub prompts: usize,
    pub samples_per_prompt: usize,
    pub seed: u64,
    pub probe_images: usize,
    pub batch_size: usize,
    /// Candidates per sample of each reranked measurement.
    pub rerank_candidates: Vec<usize>,
}

/// One row of the picture, for the captions file beside it.
#[derive(Serialize)]
struct RowCaption<'a> {
    caption: &'a str,
    unseen: bool,
}

/// The held-out images the probes' ceilings are read on.
pub struct HeldOutAndReconstructions<'a> {
    pub held: &'a HeldOutSet,
    /// The dVAE's reconstructions of `held.images`, in the same order.
    pub reconstructions: &'a Tensor,
}

/// Probes trained on the job's synthetic images, with their accuracy on
/// the held-out images (the ceiling) and on the dVAE's reconstructions of
/// them: the truth of every held-out image with a synthetic caption.
pub struct TrainedProbes {
    pub probes: Probes,
    pub report: ProbeReport,
    /// The attributes of the held-out images the probes were read on.
    pub truth: Vec<Attributes>,
}

/// Trains the probes and reads them on the held-out images and their
/// reconstructions, or says why they cannot be: needs no transformer, so a
/// run with only a dVAE learns how much of each attribute its codes keep.
pub fn train_probes(
    job: &JobConfig,
    held_out: &HeldOutAndReconstructions,
    side: i64,
    plan: &Plan,
    device: Device,
) -> Result<std::result::Result<TrainedProbes, String>> {
    let (held, reconstructions) = (held_out.held, held_out.reconstructions);
    let known = held.attributes();
    if known.is_empty() {
        return Ok(Err(
            "no held-out caption is synthetic, so no image has known attributes".into(),
        ));
    }
    if side < MIN_SIDE {
        return Ok(Err(format!(
            "the probes need images of at least {MIN_SIDE} pixels, the model draws {side}"
        )));
    }
    let (images, labels, trained_on) = held_out::probe_images(job, side as u32, plan.probe_images)?;
    let config = ProbeConfig {
        seed: plan.seed,
        ..ProbeConfig::default()
    };
    let spinner = spinner(&format!("training probes on {} images", labels.len()));
    let probes = Probes::train(&images, &labels, &config, device)?;
    spinner.finish_and_clear();
    let (index, truth): (Vec<i64>, Vec<_>) = known.iter().map(|&(i, a)| (i as i64, a)).unzip();
    let index = Tensor::from_slice(&index);
    let ceiling = probes.accuracy(&held.images.index_select(0, &index), &truth)?;
    let through_dvae = probes.accuracy(&reconstructions.index_select(0, &index), &truth)?;
    let report = ProbeReport {
        trained_on: trained_on.into(),
        images: labels.len(),
        config,
        ceiling,
        ceiling_images: truth.len(),
        through_dvae,
        chance: AttributeAccuracy::chance(),
    };
    Ok(Ok(TrainedProbes {
        probes,
        report,
        truth,
    }))
}

/// Measures fidelity with `trained` probes, or says why it cannot be
/// measured; with a `reranker`, again for each N of `plan.rerank_candidates`.
pub fn measure(
    job: &JobConfig,
    stage2: &Stage2,
    trained: &TrainedProbes,
    plan: &Plan,
    reranker: Option<&best_of::Loaded>,
    out: &Path,
    device: Device,
) -> Result<std::result::Result<FidelityReport, String>> {
    if plan.prompts == 0 || plan.samples_per_prompt == 0 {
        return Ok(Err("--prompts or --samples-per-prompt is 0".into()));
    }
    let (probes, truth) = (&trained.probes, &trained.truth);
    let (seen, seen_from) = match held_out::training_combos(job) {
        Ok(seen) => (seen, "training captions"),
        Err(e) => {
            tracing::warn!("cannot read the training captions ({e:#}); taking synth.unseen_combos");
            let excluded = &job.synth.unseen_combos;
            let seen: BTreeSet<Combo> = Combo::all().filter(|c| !excluded.contains(c)).collect();
            (seen, "synth.unseen_combos")
        }
    };
    let unseen = fidelity::unseen_combos(&seen);

    let prompts = fidelity::prompt_set(truth, &unseen, plan.prompts);
    let k = plan.samples_per_prompt;
    let mut sampling = stage2.bundle.manifest.sampling.clone();
    sampling.seed = plan.seed;
    let request = Request {
        prompts: prompts.iter().map(|p| p.caption.clone()).collect(),
        images_per_prompt: k,
        batch_size: plan.batch_size,
        sampling: sampling.clone(),
        use_cache: true,
        cuda_graph: true,
        candidates: None,
        precision: job.run.precision_on(device),
    };
    let tokens = (prompts.len() * k) as u64 * stage2.bundle.gpt.config().image_len() as u64;
    let bar = crate::progress::bar(tokens, "sampling");
    let samples = generate(&stage2.bundle, &request, |done| bar.set_position(done))?.images;
    bar.finish_and_clear();

    let wanted: Vec<_> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.attributes, k))
        .collect();
    let flags: Vec<bool> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.unseen, k))
        .collect();
    // Judges one sample per (prompt, slot) and saves them as `picture`.
    let judge = |samples: &[Vec<image::RgbImage>], picture: &str| -> Result<Scores> {
        let flat: Vec<_> = samples.iter().flatten().cloned().collect();
        let scores = fidelity::judge(probes, &scenes::images_to_tensor(&flat), &wanted, &flags)?;
        save_png(&grid(samples, 2), &out.join(picture))?;
        Ok(scores)
    };
    let scores = judge(&samples, PICTURE)?;
    let mut reranked = Vec::new();
    if let Some(r) = reranker {
        for &n in &plan.rerank_candidates {
            let best = best_of::draw(stage2, &r.model, &request, n)?;
            let picture = best_of::picture(n);
            reranked.push(Reranked {
                candidates: n,
                scores: judge(&best.images, &picture)?,
                reranker_score: best.scores,
                picture,
            });
        }
    }
    let rows = prompts
        .iter()
        .zip(scores.predicted.chunks(k))
        .map(|(p, predicted)| Row {
            caption: p.caption.clone(),
            unseen: p.unseen,
            judged: predicted.iter().map(|a| a.caption()).collect(),
        })
        .collect();

    let captions: Vec<RowCaption> = prompts
        .iter()
        .map(|p| RowCaption {
            caption: &p.caption,
            unseen: p.unseen,
        })
        .collect();
    let path = out.join(CAPTIONS);
    crate::dvae::write_atomically(&path, &serde_json::to_vec_pretty(&captions)?)
        .with_context(|| format!("writing {}", path.display()))?;

    Ok(Ok(FidelityReport {
        prompts: prompts.len(),
        samples_per_prompt: k,
        sampling,
        unseen_combos: unseen,
        seen_from: seen_from.into(),
        scores,
        reranker: reranker.map(|r| r.path.display().to_string()),
        reranked,
        rows,
        picture: PICTURE.into(),
        captions: CAPTIONS.into(),
    }))
}

/// A spinner for work that reports no progress of its own.
fn spinner(what: &str) -> ProgressBar {
    let spinner = ProgressBar::new_spinner();
    spinner.set_message(what.to_string());
    spinner.enable_steady_tick(Duration::from_millis(200));
    spinner
}
