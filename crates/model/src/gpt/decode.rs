//! Cached decoding with every shape and address fixed, so that one token's
//! step can be captured in a CUDA graph and replayed: at batch 1 a step is
//! a few hundred small kernels, and launching them one by one from the
//! host takes longer than running them.
//!
//! What differs from [`Gpt::step`]: the position is a device scalar that
//! the step advances itself, attention reads the whole preallocated cache
//! under a mask of the keys visible from that position (the slots not
//! written yet are masked, so they change nothing), and the step draws its
//! token, stores it and feeds it to the next step on the device. The host
//! only launches.

use super::Gpt;
use super::block::Visibility;
use super::cache::{CacheWrite, KvCache, Slot};
use super::masks::Pattern;
use super::sample::{SamplingConfig, next_token};
use tch::nn::Module;
use tch::{Device, Kind, Tensor};

/// The state of one fixed-shape decoding run; [`FixedDecoder::step`]
/// decodes one more token into it.
pub(super) struct FixedDecoder<'a> {
    gpt: &'a Gpt,
    config: &'a SamplingConfig,
    guided: bool,
    cache: KvCache,
    /// Each distinct pattern of the layers, with its full `(S, S)` mask of
    /// visible keys.
    masks: Vec<(Pattern, Tensor)>,
    /// The grid index of the image token fed next, `(1,)`.
    index: Tensor,
    /// The image token fed next, `(rows, 1)` (twice over with guidance).
    fed: Tensor,
    /// Every image token, `(B, N)`, filled in as they are drawn.
    tokens: Tensor,
    /// The draws' uniforms, `(N, B)`.
    uniforms: Tensor,
}

impl<'a> FixedDecoder<'a> {
    /// Starts after the prefill and the first token: `cache` holds the
    /// captions, `first` `(B,)` is image token 0.
    pub(super) fn new(
        gpt: &'a Gpt,
        config: &'a SamplingConfig,
        guided: bool,
        cache: KvCache,
        first: &Tensor,
        uniforms: Tensor,
    ) -> Self {
        let device = gpt.device();
        let b = first.size()[0];
        let n = gpt.config().image_len();
        let mut masks: Vec<(Pattern, Tensor)> = Vec::new();
        for &pattern in &gpt.patterns {
            if masks.iter().all(|(p, _)| *p != pattern) {
                let full = match pattern {
                    Pattern::Causal => gpt.causal_mask(),
                    other => gpt.masks[&other].shallow_clone(),
                };
                masks.push((pattern, full));
            }
        }
        let tokens = Tensor::zeros([b, n], (Kind::Int64, device));
        tokens.narrow(1, 0, 1).copy_(&first.view([b, 1]));
        Self {
            gpt,
            config,
            guided,
            cache,
            masks,
            index: Tensor::zeros([1], (Kind::Int64, device)),
            fed: fed(first, guided).view([-1, 1]),
            tokens,
            uniforms,
        }
    }

    /// Feeds the token at the current index, draws the next one and stores
    /// it, then moves the index on: only device work, the same kernels on
    /// the same buffers every time.
    pub(super) fn step(&mut self) {
        let gpt = self.gpt;
        let c = gpt.config();
        let position = &self.index + (c.text_len + 1);
        let visible: Vec<(Pattern, Tensor)> = self
            .masks
            .iter()
            .map(|(p, full)| (*p, full.index_select(0, &position)))
            .collect();
        let mut x = gpt.embed_image_at(&self.fed, &self.index);
        for (i, block) in gpt.blocks.iter().enumerate() {
            let mask = &visible
                .iter()
                .find(|(p, _)| *p == gpt.patterns[i])
                .expect("every layer's pattern has a mask")
                .1;
            let cache = CacheWrite {
                layer: &mut self.cache.layers[i],
                slot: Slot::At(&position),
            };
            x = block.forward(&x, &Visibility::Mask(mask), Some(cache), false);
        }
        let logits = gpt.image_head.forward(&gpt.ln_f.forward(&x).select(1, 0));
        let next = &self.index + 1;
        let uniforms = self.uniforms.index_select(0, &next).view([-1]);
        let token = next_token(&logits, self.config, self.guided, &uniforms);
        let b = token.size()[0];
        let _ = self.tokens.index_copy_(1, &next, &token.view([b, 1]));
        self.fed.copy_(&fed(&token, self.guided).view([-1, 1]));
        self.index.copy_(&next);
    }

    /// The image tokens `(B, N)` (complete once N − 1 steps ran).
    pub(super) fn tokens(&self) -> &Tensor {
        &self.tokens
    }

    pub(super) fn device(&self) -> Device {
        self.gpt.device()
    }
}

/// The rows a drawn token `(B,)` is fed to: twice over with guidance (the
/// conditional and the null caption's rows).
pub(super) fn fed(token: &Tensor, guided: bool) -> Tensor {
    if guided {
        Tensor::cat(&[token, token], 0)
    } else {
        token.shallow_clone()
    }
}
