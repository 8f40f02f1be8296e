//! Prompts to images: encode the captions, sample image tokens for a batch
//! of (prompt, image) rows at a time, decode them with the dVAE decoder;
//! with reranking, draw more candidates than kept, score each against its
//! prompt with the bundle's reranker and keep the best.

use crate::bundle::Bundle;
pub use crate::rerank::PromptScores;
use crate::rerank::{check_counts, no_reranker};
use anyhow::{Context, Result, bail};
use dalle_model::gpt::sample::{Decoding, SamplingConfig, sample_decoding};
use dalle_model::images::to_rgb_images;
use dalle_precision::{Autocast, Precision};
use image::RgbImage;
use std::path::Path;
use tch::Tensor;

/// What to generate.
pub struct Request {
    pub prompts: Vec<String>,
    pub images_per_prompt: usize,
    /// (prompt, image) rows sampled together.
    pub batch_size: usize,
    pub sampling: SamplingConfig,
    /// Decode with the KV cache (off: recompute every prefix, for comparison).
    pub use_cache: bool,
    /// On a GPU, replay the cached decoding step from a CUDA graph (off:
    /// run it op by op).
    pub cuda_graph: bool,
    /// Draw this many candidates per prompt and keep the
    /// `images_per_prompt` the bundle's reranker scores best (None: keep
    /// every image drawn).
    pub candidates: Option<usize>,
    /// What the transformer, the decoder and the reranker compute in
    /// (bf16: autocast, the weights as loaded).
    pub precision: Precision,
}

impl Request {
    /// Images drawn per prompt.
    pub fn drawn_per_prompt(&self) -> usize {
        self.candidates.unwrap_or(self.images_per_prompt)
    }
}

/// The images of every prompt, in prompt order (with reranking, the kept
/// ones, best first), and the scores when reranked.
pub struct Generated {
    pub images: Vec<Vec<RgbImage>>,
    pub scores: Option<Vec<PromptScores>>,
}

/// Prompts from a file: one per line; blank lines and lines starting with
/// `#` are skipped.
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read prompt file {}", path.display()))?;
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if prompts.is_empty() {
        bail!("prompt file {} holds no prompts", path.display());
    }
    Ok(prompts)
}

/// The images of every prompt (see [`Generated`]). `on_token` gets the
/// number of image tokens sampled so far over all rows.
pub fn generate(
    bundle: &Bundle,
    request: &Request,
    mut on_token: impl FnMut(u64),
) -> Result<Generated> {
    if request.prompts.is_empty() || request.images_per_prompt == 0 {
        bail!("nothing to generate: give at least one prompt and one image per prompt");
    }
    check_counts(request.candidates, request.images_per_prompt)?;
    let reranker = match request.candidates {
        None => None,
        Some(_) => Some(
            bundle
                .reranker
                .as_ref()
                .with_context(|| no_reranker("the bundle"))?,
        ),
    };
    let drawn = request.drawn_per_prompt();
    let gpt = bundle.gpt.config();
    let text_len = gpt.text_len as usize;
    let mut rows: Vec<Vec<i64>> = Vec::new();
    for (i, prompt) in request.prompts.iter().enumerate() {
        if prompt.trim().is_empty() {
            bail!("prompt {} is empty", i + 1);
        }
        let encoded = bundle.tokenizer.encode(prompt, text_len)?;
        if encoded.truncated {
            tracing::warn!(
                prompt = i + 1,
                "prompt is longer than the model's {text_len} text tokens; truncated"
            );
        }
        rows.extend(std::iter::repeat_n(encoded.ids, drawn));
    }
    let grid = gpt.image_grid;
    let tokens_per_image = gpt.image_len() as u64;
    let keep = request.images_per_prompt;
    let mut per_prompt: Vec<Vec<RgbImage>> = Vec::with_capacity(request.prompts.len());
    let mut all_scores = Vec::new();
    // Images (and scores) drawn but not yet chosen among: each prompt's
    // candidates are chosen among as soon as its last one is decoded, so
    // at most a batch and a prompt's candidates are held at once.
    let mut pending: Vec<RgbImage> = Vec::new();
    let mut pending_scores: Vec<f32> = Vec::new();
    let mut rows_done = 0u64;
    let device = bundle.gpt.device();
    let decoding = match (request.use_cache, request.cuda_graph) {
        (false, _) => Decoding::Recompute,
        (true, true) => Decoding::cached_on(device),
        (true, false) => Decoding::Cache,
    };
    for (chunk_index, chunk) in rows.chunks(request.batch_size.max(1)).enumerate() {
        let flat: Vec<i64> = chunk.iter().flatten().copied().collect();
        let captions = Tensor::from_slice(&flat).view([chunk.len() as i64, text_len as i64]);
        // Each chunk draws from its own seed, so chunks do not share noise.
        let settings = SamplingConfig {
            seed: request.sampling.seed.wrapping_add(chunk_index as u64),
            ..request.sampling.clone()
        };
        let done_before = rows_done * tokens_per_image;
        let rows_here = chunk.len() as u64;
        // One region per chunk: its weight casts serve every token of the
        // chunk, and are dropped with it.
        let _autocast = Autocast::enter(device, request.precision);
        let tokens = sample_decoding(&bundle.gpt, &captions, &settings, decoding, |t| {
            on_token(done_before + t as u64 * rows_here)
        })?;
        rows_done += rows_here;
        let pixels = bundle.decoder.decode(&tokens.view([-1, grid, grid]))?;
        if let Some(reranker) = reranker {
            // The same caption ids the transformer was given.
            let scores = reranker.score(&pixels, &captions)?;
            pending_scores.extend(Vec::<f32>::try_from(scores.to_device(tch::Device::Cpu))?);
        }
        pending.extend(to_rgb_images(&pixels)?);
        while pending.len() >= drawn {
            let candidates: Vec<RgbImage> = pending.drain(..drawn).collect();
            if reranker.is_none() {
                per_prompt.push(candidates);
                continue;
            }
            let prompt = &request.prompts[per_prompt.len()];
            let ranked = PromptScores::rank(prompt, pending_scores.drain(..drawn).collect(), keep);
            per_prompt.push(ranked.select(candidates));
            all_scores.push(ranked);
        }
    }
    debug_assert_eq!(per_prompt.len(), request.prompts.len());
    Ok(Generated {
        images: per_prompt,
        scores: reranker.map(|_| all_scores),
    })
}
