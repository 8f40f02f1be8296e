//! Prompts to images: encode the captions, sample image tokens for a batch
//! of (prompt, image) rows at a time, decode them with the dVAE decoder.

use crate::bundle::Bundle;
use anyhow::{Context, Result, bail};
use dalle_model::gpt::sample::{SamplingConfig, sample};
use dalle_model::images::to_rgb_images;
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

/// The images of every prompt, in prompt order. `on_token` gets the number
/// of image tokens sampled so far over all rows.
pub fn generate(
    bundle: &Bundle,
    request: &Request,
    mut on_token: impl FnMut(u64),
) -> Result<Vec<Vec<RgbImage>>> {
    if request.prompts.is_empty() || request.images_per_prompt == 0 {
        bail!("nothing to generate: give at least one prompt and one image per prompt");
    }
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
        rows.extend(std::iter::repeat_n(encoded.ids, request.images_per_prompt));
    }
    let grid = gpt.image_grid;
    let tokens_per_image = gpt.image_len() as u64;
    let mut images = Vec::with_capacity(rows.len());
    for (chunk_index, chunk) in rows.chunks(request.batch_size.max(1)).enumerate() {
        let flat: Vec<i64> = chunk.iter().flatten().copied().collect();
        let captions = Tensor::from_slice(&flat).view([chunk.len() as i64, text_len as i64]);
        // Each chunk draws from its own seed, so chunks do not share noise.
        let settings = SamplingConfig {
            seed: request.sampling.seed.wrapping_add(chunk_index as u64),
            ..request.sampling.clone()
        };
        let done_before = images.len() as u64 * tokens_per_image;
        let rows_here = chunk.len() as u64;
        let tokens = sample(&bundle.gpt, &captions, &settings, request.use_cache, |t| {
            on_token(done_before + t as u64 * rows_here)
        })?;
        let pixels = bundle.decoder.decode(&tokens.view([-1, grid, grid]))?;
        images.extend(to_rgb_images(&pixels)?);
    }
    let mut per_prompt = Vec::with_capacity(request.prompts.len());
    let mut images = images.into_iter();
    for _ in &request.prompts {
        per_prompt.push(images.by_ref().take(request.images_per_prompt).collect());
    }
    Ok(per_prompt)
}
