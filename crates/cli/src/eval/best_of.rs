//! Best of N for `dalle eval`: the reranker (trained by the optional
//! `rerank` stage) picks each sample among N candidates drawn for its
//! prompt, so that fidelity can be measured again on the picks.
//!
//! The reranker is read from its own file, not from the bundle: the one
//! beside a local `--bundle`, else the run's (`<run.dir>/reranker.safetensors`).

use super::stage2::Stage2;
use crate::progress;
use anyhow::{Context, Result};
use dalle_eval::fidelity::{RerankScores, best_of_each};
use dalle_eval::scenes;
use dalle_model::gpt::sample::SamplingConfig;
use dalle_model::rerank::Reranker;
use dalle_sample::generate::{Request, generate};
use dalle_train::config::JobConfig;
use image::RgbImage;
use std::path::PathBuf;
use tch::{Device, Tensor};

/// The reranker's file name in a bundle directory.
const IN_BUNDLE: &str = "reranker.safetensors";

/// A reranker that fits the transformer and the decoder, and its file.
pub struct Loaded {
    pub model: Reranker,
    pub path: PathBuf,
}

/// Where the reranker is read: beside `--bundle` when that is a local
/// directory holding one (the bundle's transformer is then of its own
/// run), else the run's.
pub fn path(job: &JobConfig, bundle_url: Option<&str>) -> PathBuf {
    bundle_url
        .and_then(local_dir)
        .map(|dir| dir.join(IN_BUNDLE))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| job.rerank_weights_path())
}

/// The directory of a plain-path or `file://` URL.
fn local_dir(url: &str) -> Option<PathBuf> {
    match url.strip_prefix("file://") {
        Some(path) => Some(path.into()),
        None => (!url.contains("://")).then(|| url.into()),
    }
}

/// The reranker for `stage2`, or why there is none (a note for the
/// report). A reranker file that does not load, or that does not fit the
/// transformer and the decoder, is an error naming it.
pub fn load(
    job: &JobConfig,
    bundle_url: Option<&str>,
    stage2: &Stage2,
    device: Device,
) -> Result<std::result::Result<Loaded, String>> {
    let path = path(job, bundle_url);
    if !path.is_file() {
        return Ok(Err(format!(
            "no reranker at {}; add `rerank` to run.stages",
            path.display()
        )));
    }
    let model = Reranker::load(&path, device)
        .with_context(|| format!("loading the reranker {}", path.display()))?;
    let bundle = &stage2.bundle;
    dalle_sample::bundle::check_reranker_config(
        model.config(),
        bundle.gpt.config(),
        bundle.decoder.config().image_size,
        &format!("{} (for {})", path.display(), stage2.name),
    )?;
    Ok(Ok(Loaded { model, path }))
}

/// The picture of the best of `n` samples, beside the fidelity picture.
pub fn picture(n: usize) -> String {
    format!("fidelity-best-of-{n}.png")
}

/// Each sample of `request` drawn again as the reranker's pick of `n`
/// candidates.
pub struct BestOf {
    /// Per prompt, one pick per sample, in the order of `request`'s.
    pub images: Vec<Vec<RgbImage>>,
    pub scores: RerankScores,
}

/// Draws `n` candidates for each of `request`'s `images_per_prompt`
/// samples of each prompt, `request.batch_size` rows at a time, and keeps
/// the one the reranker scores best against its prompt. The seeds follow
/// from `request.sampling.seed` and `n` (see [`first_seed`]).
pub fn draw(stage2: &Stage2, reranker: &Reranker, request: &Request, n: usize) -> Result<BestOf> {
    let bundle = &stage2.bundle;
    let k = request.images_per_prompt;
    let per_prompt = k * n;
    let text_len = bundle.gpt.config().text_len;
    let tokens_per_image = bundle.gpt.config().image_len() as u64;
    let batch = request.batch_size.max(1);
    // Per generate call, as many whole prompts as a batch holds (at least
    // one), so that calls of few candidates still fill their batches.
    let prompts_per_call = (batch / per_prompt.max(1)).max(1);
    let total = (request.prompts.len() * per_prompt) as u64 * tokens_per_image;
    let bar = progress::bar(total, &format!("best of {n}"));
    let (mut images, mut scores, mut kept) = (Vec::new(), Vec::new(), Vec::new());
    let (mut done, mut seed) = (0u64, first_seed(request.sampling.seed, n));
    for prompts in request.prompts.chunks(prompts_per_call) {
        let rows = prompts.len() * per_prompt;
        let candidates = Request {
            prompts: prompts.to_vec(),
            images_per_prompt: per_prompt,
            batch_size: batch,
            sampling: SamplingConfig {
                seed,
                ..request.sampling.clone()
            },
            use_cache: request.use_cache,
            cuda_graph: request.cuda_graph,
            candidates: None,
            precision: request.precision,
        };
        let drawn = generate(bundle, &candidates, |t| bar.set_position(done + t))?.images;
        done += rows as u64 * tokens_per_image;
        seed = seed.wrapping_add(rows.div_ceil(batch) as u64);
        for (prompt, drawn) in prompts.iter().zip(drawn) {
            let ids = bundle.tokenizer.encode(prompt, text_len as usize)?.ids;
            let picked = pick(reranker, &ids, drawn, n, batch)?;
            images.push(picked.images);
            scores.extend(picked.scores);
            kept.extend(picked.kept);
        }
    }
    bar.finish_and_clear();
    Ok(BestOf {
        images,
        scores: RerankScores::of(&scores, n, &kept),
    })
}

/// One prompt's picks.
struct Picked {
    /// The kept candidate of each slot.
    images: Vec<RgbImage>,
    /// Every candidate's score, in the order drawn.
    scores: Vec<f32>,
    /// Which candidate of its slot each kept image is.
    kept: Vec<usize>,
}

/// Scores one prompt's candidates `drawn` (`n` per slot, slot after slot)
/// against its caption `ids` (the transformer's text ids), `batch` images
/// at a time, and keeps each slot's best.
fn pick(
    reranker: &Reranker,
    ids: &[i64],
    drawn: Vec<RgbImage>,
    n: usize,
    batch: usize,
) -> Result<Picked> {
    let caption = Tensor::from_slice(ids).view([1, ids.len() as i64]);
    let mut scores = Vec::with_capacity(drawn.len());
    for chunk in drawn.chunks(batch.max(1)) {
        let captions = caption.repeat([chunk.len() as i64, 1]);
        let s = reranker.score(&scenes::images_to_tensor(chunk), &captions)?;
        scores.extend(Vec::<f32>::try_from(s.to_device(Device::Cpu))?);
    }
    let kept = best_of_each(&scores, n);
    let mut drawn: Vec<Option<RgbImage>> = drawn.into_iter().map(Some).collect();
    let images = kept
        .iter()
        .enumerate()
        .map(|(slot, &i)| drawn[slot * n + i].take().expect("one pick per slot"))
        .collect();
    Ok(Picked {
        images,
        scores,
        kept,
    })
}

/// The seed of the first batch of the best of `n`: the batches of every
/// generate call of it take the seeds after it in turn, as those of one
/// long call would, `n`·2³² away from the plain samples' (`seed` plus their
/// batch index) and from those of every other `n`.
fn first_seed(seed: u64, n: usize) -> u64 {
    seed.wrapping_add((n as u64) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dalle_model::dvae::{Dvae, DvaeConfig};
    use dalle_model::gpt::{AttentionLayout, Gpt, GptArch, GptConfig};
    use dalle_model::rerank::{RerankArch, RerankConfig};
    use dalle_model::text::{TextConfig, TextTokenizer};
    use std::path::Path;

    const TEXT_LEN: i64 = 8;
    const SIDE: i64 = 16;

    /// A run directory with a tiny random dVAE, transformer and tokenizer
    /// (no bundle: eval assembles one from them), and the job of it.
    fn tiny_run(dir: &Path) -> (JobConfig, Stage2) {
        let mut job = JobConfig::default();
        job.run.dir = dir.to_path_buf();
        let captions = ["a red circle", "a blue square", "a green star"];
        let text = TextConfig {
            vocab_size: 300,
            text_len: TEXT_LEN as usize,
            ..TextConfig::default()
        };
        let tokenizer =
            TextTokenizer::train(captions.iter().map(|c| c.to_string()), &text).unwrap();
        tokenizer.save(&job.tokenizer_path()).unwrap();
        tch::manual_seed(0);
        let dvae = Dvae::new(
            DvaeConfig {
                image_size: SIDE,
                n_hid: 8,
                n_blk_per_group: 1,
                vocab_size: 32,
                n_init: 8,
                ..DvaeConfig::default()
            },
            Device::Cpu,
        )
        .unwrap();
        let gpt = Gpt::new(
            GptConfig {
                arch: GptArch {
                    dim: 16,
                    depth: 1,
                    heads: 2,
                    attention: AttentionLayout::Dense,
                    ..GptArch::default()
                },
                text_vocab: tokenizer.vocab_size() as i64,
                text_len: TEXT_LEN,
                image_vocab: 32,
                image_grid: 2,
            },
            Device::Cpu,
        )
        .unwrap();
        gpt.save(&job.gpt_weights_path()).unwrap();
        let stage2 = super::super::stage2::load(&job, None, &dvae, Device::Cpu)
            .unwrap()
            .unwrap();
        (job, stage2)
    }

    fn reranker_config(stage2: &Stage2, text_len: i64, image_size: i64) -> RerankConfig {
        RerankConfig {
            arch: RerankArch {
                image_width: 8,
                dim: 16,
                depth: 1,
                heads: 2,
                embed_dim: 8,
            },
            text_vocab: stage2.bundle.gpt.config().text_vocab,
            text_len,
            image_size,
        }
    }

    fn save_reranker(config: RerankConfig, path: &Path) {
        tch::manual_seed(1);
        Reranker::new(config, Device::Cpu)
            .unwrap()
            .save(path)
            .unwrap();
    }

    /// [`tiny_run`] with a reranker that fits, where the run keeps it.
    fn tiny_run_with_reranker(dir: &Path) -> (JobConfig, Stage2, Loaded) {
        let (job, stage2) = tiny_run(dir);
        let config = reranker_config(&stage2, TEXT_LEN, SIDE);
        save_reranker(config, &job.rerank_weights_path());
        let loaded = load(&job, None, &stage2, Device::Cpu).unwrap().unwrap();
        (job, stage2, loaded)
    }

    fn request(prompts: &[&str], images_per_prompt: usize, batch_size: usize) -> Request {
        Request {
            prompts: prompts.iter().map(|p| p.to_string()).collect(),
            images_per_prompt,
            batch_size,
            sampling: SamplingConfig::default(),
            use_cache: true,
            cuda_graph: true,
            candidates: None,
            precision: dalle_precision::Precision::Fp32,
        }
    }

    #[test]
    fn the_reranker_is_the_local_bundles_else_the_runs() {
        let dir = tempfile::tempdir().unwrap();
        let mut job = JobConfig::default();
        job.run.dir = dir.path().join("run");
        let bundle = dir.path().join("bundle");
        std::fs::create_dir_all(&bundle).unwrap();
        let bundle_url = bundle.to_str().unwrap();
        let run = job.rerank_weights_path();
        // A bundle without one, a remote one, none: the run's.
        assert_eq!(path(&job, None), run);
        assert_eq!(path(&job, Some(bundle_url)), run);
        assert_eq!(path(&job, Some("s3://bucket/bundle")), run);
        std::fs::write(bundle.join(IN_BUNDLE), b"weights").unwrap();
        assert_eq!(path(&job, Some(bundle_url)), bundle.join(IN_BUNDLE));
        let file_url = format!("file://{bundle_url}");
        assert_eq!(path(&job, Some(&file_url)), bundle.join(IN_BUNDLE));
        assert_eq!(picture(8), "fidelity-best-of-8.png");
    }

    #[test]
    fn a_missing_reranker_is_a_note_and_one_that_does_not_fit_names_its_file() {
        tch::set_num_threads(1);
        let dir = tempfile::tempdir().unwrap();
        let (job, stage2) = tiny_run(dir.path());
        let path = job.rerank_weights_path();
        let note = load(&job, None, &stage2, Device::Cpu)
            .unwrap()
            .err()
            .unwrap();
        assert_eq!(
            note,
            format!(
                "no reranker at {}; add `rerank` to run.stages",
                path.display()
            )
        );
        for (text_len, side, key) in [(4, SIDE, "text_len"), (TEXT_LEN, 32, "image_size")] {
            save_reranker(reranker_config(&stage2, text_len, side), &path);
            let err = load(&job, None, &stage2, Device::Cpu)
                .err()
                .unwrap()
                .to_string();
            assert!(
                err.contains(&path.display().to_string()) && err.contains(key),
                "{err}"
            );
        }
        let (job, _, loaded) = tiny_run_with_reranker(dir.path());
        assert_eq!(loaded.path, job.rerank_weights_path());
    }

    #[test]
    fn each_slot_keeps_the_candidate_the_reranker_scores_best() {
        tch::set_num_threads(1);
        let dir = tempfile::tempdir().unwrap();
        let (_, stage2, loaded) = tiny_run_with_reranker(dir.path());
        let reranker = &loaded.model;
        let ids = stage2
            .bundle
            .tokenizer
            .encode("a red circle", TEXT_LEN as usize)
            .unwrap()
            .ids;
        // Three slots of five noise images, scored three at a time.
        tch::manual_seed(3);
        let noise = Tensor::rand([15, 3, SIDE, SIDE], (tch::Kind::Float, Device::Cpu));
        let drawn = dalle_model::images::to_rgb_images(&noise).unwrap();
        let picked = pick(reranker, &ids, drawn.clone(), 5, 3).unwrap();
        assert_eq!((picked.images.len(), picked.scores.len()), (3, 15));
        let alone = |image: &RgbImage| {
            let caption = Tensor::from_slice(&ids).view([1, TEXT_LEN]);
            let images = scenes::images_to_tensor(std::slice::from_ref(image));
            reranker
                .score(&images, &caption)
                .unwrap()
                .double_value(&[0]) as f32
        };
        for (slot, (&i, image)) in picked.kept.iter().zip(&picked.images).enumerate() {
            let candidates: Vec<f32> = drawn[slot * 5..][..5].iter().map(alone).collect();
            let max = candidates.iter().copied().fold(f32::MIN, f32::max);
            assert!(
                (candidates[i] - max).abs() < 1e-5,
                "{candidates:?} kept {i}"
            );
            assert_eq!(image, &drawn[slot * 5 + i]);
            // Batched scores are each image's own.
            for (a, b) in candidates.iter().zip(&picked.scores[slot * 5..][..5]) {
                assert!((a - b).abs() < 1e-5, "{candidates:?} {:?}", picked.scores);
            }
        }
    }

    #[test]
    fn best_of_n_draws_a_pick_per_sample_deterministically() {
        tch::set_num_threads(1);
        let dir = tempfile::tempdir().unwrap();
        let (_, stage2, reranker) = tiny_run_with_reranker(dir.path());
        let prompts = ["a red circle", "a blue square", "a green star"];
        // 2 samples × 3 candidates per prompt: one prompt a call with
        // batches of 4, two with batches of 16.
        for batch in [4, 16] {
            let request = request(&prompts, 2, batch);
            let a = draw(&stage2, &reranker.model, &request, 3).unwrap();
            assert_eq!(a.images.len(), 3);
            for row in &a.images {
                assert_eq!(row.len(), 2);
                assert!(
                    row.iter()
                        .all(|i| i.dimensions() == (SIDE as u32, SIDE as u32))
                );
            }
            assert!(a.scores.kept >= a.scores.drawn, "{:?}", a.scores);
            let b = draw(&stage2, &reranker.model, &request, 3).unwrap();
            assert_eq!(a.images, b.images, "the same seed draws the same");
            assert_eq!(a.scores, b.scores);
        }
        // Other seeds and other N draw other candidates.
        let request = request(&prompts, 2, 16);
        let a = draw(&stage2, &reranker.model, &request, 3).unwrap();
        let mut other = request.sampling.clone();
        other.seed += 1;
        let reseeded = Request {
            sampling: other,
            ..request
        };
        let b = draw(&stage2, &reranker.model, &reseeded, 3).unwrap();
        assert_ne!(a.scores, b.scores);
        assert_ne!(first_seed(0, 8), first_seed(0, 32));
        assert_ne!(first_seed(0, 8), 0);
    }
}
