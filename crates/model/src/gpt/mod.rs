//! The transformer of stage 2: one decoder-only sequence of a caption's
//! text tokens followed by an image's dVAE tokens.
//!
//! Sequence layout (T text positions, an image grid of g × g = N tokens):
//!
//! ```text
//! input:   BOS t0 t1 … t(T-1) | i0 i1 … i(N-2)
//! targets: t0  t1 …   t(T-1)  | i0 i1 … i(N-1)
//! ```
//!
//! Text ids are `0..V` for BPE tokens and `V + p` for the pad of position
//! `p` (the paper's per-position padding); BOS is `V + T`. Text positions
//! get learned positional embeddings, image tokens a row plus a column
//! embedding. Text positions predict over the text vocabulary (BPE ids and
//! pads), image positions over the image codebook only: two output heads.

pub(crate) mod block;
pub mod cache;
pub mod config;
pub(crate) mod decode;
pub mod masks;
pub mod sample;
#[cfg(test)]
mod tests;

pub use cache::KvCache;
pub use config::{AttentionLayout, GptArch, GptConfig};

use crate::recompute::{Chain, Segment};
use crate::weights::{self, WeightFile};
use crate::{ModelError, Result};
use block::{Block, INIT_STD, Visibility};
use cache::{CacheWrite, LayerCache, Slot};
use masks::Pattern;
use std::collections::HashMap;
use std::path::Path;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

const FORMAT: &str = "dalle-rs/gpt/1";
const CONFIG_KEY: &str = "gpt_config";

/// Logits of one forward pass over whole sequences.
pub struct Logits {
    /// `(B, T, V + T)`: predictions of the caption's tokens.
    pub text: Tensor,
    /// `(B, N, image_vocab)`: predictions of the image's tokens.
    pub image: Tensor,
}

/// The stage-2 loss and its parts (mean cross-entropy per kind, nats).
pub struct Loss {
    pub loss: Tensor,
    pub text: Tensor,
    pub image: Tensor,
}

pub struct Gpt {
    config: GptConfig,
    vs: nn::VarStore,
    text_emb: nn::Embedding,
    text_pos: nn::Embedding,
    image_emb: nn::Embedding,
    image_row: nn::Embedding,
    image_col: nn::Embedding,
    blocks: Vec<Block>,
    ln_f: nn::LayerNorm,
    text_head: nn::Linear,
    image_head: nn::Linear,
    patterns: Vec<Pattern>,
    /// Full-sequence masks of the sparse patterns in use.
    masks: HashMap<Pattern, Tensor>,
}

fn embedding(path: nn::Path, count: i64, dim: i64) -> nn::Embedding {
    let config = nn::EmbeddingConfig {
        ws_init: nn::Init::Randn {
            mean: 0.0,
            stdev: INIT_STD,
        },
        ..Default::default()
    };
    nn::embedding(path, count, dim, config)
}

/// Seeds of the blocks' random draws (dropout) in one training pass.
///
/// A checkpointed block runs twice, forward and recomputed in backward, and
/// must draw the same dropout masks both times; tch cannot read or restore
/// the generator's state, only seed it. So every training pass whose blocks
/// draw, checkpointed or not, takes one number from the generator, seeds it
/// from that number before each block, and seeds it once more after the
/// last: both kinds of pass then draw the same masks and leave the
/// generator in the same state. Passes without dropout draw nothing and
/// touch no seed.
#[derive(Clone, Copy)]
struct DropoutSeeds {
    base: i64,
}

impl DropoutSeeds {
    fn draw(draws: bool) -> Option<Self> {
        draws.then(|| Self {
            base: Tensor::randint(i64::MAX, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]),
        })
    }

    /// Seeds the generator for block `i` (`i` = depth: after the blocks).
    fn enter(&self, i: usize) {
        // SplitMix64's finaliser: distinct, well-mixed seeds per block.
        let mut z =
            (self.base as u64).wrapping_add((i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        tch::manual_seed(((z ^ (z >> 31)) >> 1) as i64);
    }

    /// Seeds the generator for what follows the blocks.
    fn leave(&self, depth: usize) {
        self.enter(depth);
    }
}

impl Gpt {
    /// A freshly initialised model; seed with `tch::manual_seed` first for
    /// reproducible weights.
    pub fn new(config: GptConfig, device: Device) -> Result<Self> {
        config.validate()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let d = config.arch.dim;
        let patterns = masks::layer_patterns(&config);
        let masks = patterns
            .iter()
            .filter(|p| **p != Pattern::Causal)
            .map(|&p| (p, masks::mask(p, &config, device)))
            .collect();
        Ok(Self {
            text_emb: embedding(&root / "text_emb", config.text_targets() + 1, d),
            text_pos: embedding(&root / "text_pos", config.text_len + 1, d),
            image_emb: embedding(&root / "image_emb", config.image_vocab, d),
            image_row: embedding(&root / "image_row", config.image_grid, d),
            image_col: embedding(&root / "image_col", config.image_grid, d),
            blocks: (0..config.arch.depth)
                .map(|i| Block::new(&root / "blocks" / i, &config.arch))
                .collect(),
            ln_f: nn::layer_norm(&root / "ln_f", vec![d], Default::default()),
            text_head: block::linear(&root / "text_head", d, config.text_targets(), INIT_STD),
            image_head: block::linear(&root / "image_head", d, config.image_vocab, INIT_STD),
            patterns,
            masks,
            config,
            vs,
        })
    }

    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Named parameters, sorted by name.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut vars: Vec<_> = self.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    fn check_ids(&self, ids: &Tensor, what: &'static str, len: i64, vocab: i64) -> Result<Tensor> {
        let size = ids.size();
        if size.len() != 2 || size[1] != len {
            return Err(ModelError::Input {
                what,
                expected: format!("(B, {len})"),
                found: format!("{size:?}"),
            });
        }
        // Ids on the host are range-checked here; ids already on a GPU were
        // made in range (the tokenizer, the dVAE's argmax, sampling) or
        // checked where they were read (pre-tokenized data), and reading
        // them back would stall every step on the device.
        if ids.device() == Device::Cpu && ids.numel() > 0 {
            let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
            if lo < 0 || hi >= vocab {
                return Err(ModelError::Input {
                    what,
                    expected: format!("ids in [0, {vocab})"),
                    found: format!("ids in [{lo}, {hi}]"),
                });
            }
        }
        let ids = ids.to_device(self.device()).to_kind(Kind::Int64);
        Ok(ids)
    }

    /// Embeds BOS + caption `(B, T)` and the first `m` image tokens
    /// `(B, m)`: `(B, T + 1 + m, D)`.
    fn embed(&self, text: &Tensor, image: &Tensor) -> Tensor {
        let (b, device) = (text.size()[0], self.device());
        let bos = Tensor::full([b, 1], self.config.bos(), (Kind::Int64, device));
        let text = Tensor::cat(&[bos, text.shallow_clone()], 1);
        let positions = Tensor::arange(self.config.text_len + 1, (Kind::Int64, device));
        let text = self.text_emb.forward(&text) + self.text_pos.forward(&positions);
        let m = image.size()[1];
        if m == 0 {
            return text;
        }
        Tensor::cat(&[text, self.embed_image(image, 0)], 1)
    }

    /// Embeds image tokens `(B, m)` that sit at grid indices `first..first + m`.
    fn embed_image(&self, tokens: &Tensor, first: i64) -> Tensor {
        let m = tokens.size()[1];
        let index = Tensor::arange_start(first, first + m, (Kind::Int64, self.device()));
        self.embed_image_at(tokens, &index)
    }

    /// Embeds image tokens `(B, m)` at the grid indices `(m,)` held on the
    /// device (so a captured decoding step can advance them itself).
    fn embed_image_at(&self, tokens: &Tensor, index: &Tensor) -> Tensor {
        let g = self.config.image_grid;
        self.image_emb.forward(tokens)
            + self
                .image_row
                .forward(&index.divide_scalar_mode(g, "floor"))
            + self.image_col.forward(&index.remainder(g))
    }

    /// Runs block `i` over positions `start..start + n` held in `x`.
    fn run_block(
        &self,
        i: usize,
        x: &Tensor,
        start: i64,
        layer: Option<&mut LayerCache>,
        train: bool,
    ) -> Tensor {
        let n = x.size()[1];
        let slice;
        let visibility = match (self.patterns[i], start, n) {
            (Pattern::Causal, 0, _) => Visibility::Causal,
            (Pattern::Causal, _, 1) => Visibility::All,
            (pattern, _, _) => {
                let full = match pattern {
                    Pattern::Causal => self.causal_mask(),
                    other => self.masks[&other].shallow_clone(),
                };
                slice = full.narrow(0, start, n).narrow(1, 0, start + n);
                Visibility::Mask(&slice)
            }
        };
        let cache = layer.map(|layer| CacheWrite {
            layer,
            slot: Slot::From(start),
        });
        self.blocks[i].forward(x, &visibility, cache, train)
    }

    /// Whether a training pass draws random numbers inside the blocks.
    fn blocks_draw(&self, train: bool) -> bool {
        let a = &self.config.arch;
        train && (a.dropout > 0.0 || a.attn_dropout > 0.0)
    }

    /// Runs the blocks over positions `start..start + n` held in `x`.
    fn run_blocks(
        &self,
        x: Tensor,
        start: i64,
        mut cache: Option<&mut KvCache>,
        train: bool,
    ) -> Tensor {
        let n = x.size()[1];
        let mut x = x.dropout(self.config.arch.dropout, train);
        let seeds = DropoutSeeds::draw(self.blocks_draw(train));
        for i in 0..self.blocks.len() {
            if let Some(seeds) = &seeds {
                seeds.enter(i);
            }
            let layer = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = self.run_block(i, &x, start, layer, train);
        }
        if let Some(seeds) = &seeds {
            seeds.leave(self.blocks.len());
        }
        if let Some(cache) = cache {
            cache.len = start + n;
        }
        self.ln_f.forward(&x)
    }

    fn causal_mask(&self) -> Tensor {
        let n = self.config.seq_len();
        Tensor::ones([n, n], (Kind::Bool, self.device())).tril(0)
    }

    /// Logits for whole sequences: captions `(B, T)` and image tokens
    /// `(B, N)` (the last image token is only a target).
    pub fn forward_t(&self, text: &Tensor, image: &Tensor, train: bool) -> Result<Logits> {
        let c = &self.config;
        let text = self.check_ids(text, "caption ids", c.text_len, c.text_targets())?;
        let image = self.check_ids(image, "image tokens", c.image_len(), c.image_vocab)?;
        let inputs = image.narrow(1, 0, c.image_len() - 1);
        let h = self.run_blocks(self.embed(&text, &inputs), 0, None, train);
        Ok(Logits {
            text: self.text_head.forward(&h.narrow(1, 0, c.text_len)),
            image: self
                .image_head
                .forward(&h.narrow(1, c.text_len, c.image_len())),
        })
    }

    /// The training loss: cross-entropy of text and image predictions,
    /// each averaged over its own positions, weighted `text_weight` and
    /// `1 - text_weight` (the paper: 1/8 and 7/8).
    pub fn loss(
        &self,
        text: &Tensor,
        image: &Tensor,
        text_weight: f64,
        train: bool,
    ) -> Result<Loss> {
        let logits = self.forward_t(text, image, train)?;
        Ok(self.loss_of(&logits, text, image, text_weight))
    }

    fn loss_of(&self, logits: &Logits, text: &Tensor, image: &Tensor, text_weight: f64) -> Loss {
        let device = self.device();
        // The logits come out of the heads in bf16 under autocast: the
        // softmax and the loss run in fp32 (a no-op in fp32).
        let ce = |logits: &Tensor, targets: &Tensor| {
            let v = logits.size()[2];
            logits
                .to_kind(Kind::Float)
                .reshape([-1, v])
                .cross_entropy_for_logits(&targets.to_device(device).reshape([-1]))
        };
        let text_loss = ce(&logits.text, &text.to_kind(Kind::Int64));
        let image_loss = ce(&logits.image, &image.to_kind(Kind::Int64));
        let loss = &text_loss * text_weight + &image_loss * (1.0 - text_weight);
        Loss {
            loss,
            text: text_loss,
            image: image_loss,
        }
    }

    /// One training pass: [`Gpt::loss`] in training mode, then the
    /// backward of `scale` × its loss (a micro-batch's share of the batch),
    /// which accumulates into the parameters' gradients. Returns the loss
    /// and its parts, detached.
    ///
    /// With `checkpointing`, each transformer block keeps only its input
    /// during the forward pass and is recomputed in backward
    /// ([`crate::recompute`]): activation memory of one block instead of
    /// all of them, for one more forward pass of the blocks. The gradients
    /// are those of the plain pass (the same dropout draws too, see
    /// `DropoutSeeds`), and the generator is left where the plain pass
    /// leaves it.
    pub fn loss_backward(
        &self,
        text: &Tensor,
        image: &Tensor,
        text_weight: f64,
        scale: f64,
        checkpointing: bool,
    ) -> Result<Loss> {
        let loss = if checkpointing {
            self.loss_checkpointed(text, image, text_weight, scale)?
        } else {
            let loss = self.loss(text, image, text_weight, true)?;
            (&loss.loss * scale).backward();
            loss
        };
        Ok(Loss {
            loss: loss.loss.detach(),
            text: loss.text.detach(),
            image: loss.image.detach(),
        })
    }

    /// [`Gpt::loss_backward`] with the blocks checkpointed. The same ops in
    /// the same order as `forward_t` + `loss`, so the same numbers: the
    /// embeddings (and their dropout) before the chain keep their graph,
    /// the final norm, the heads and the loss after it run on the chain's
    /// output with autograd on; their backward comes first, then the
    /// chain's, which ends in the embeddings.
    fn loss_checkpointed(
        &self,
        text: &Tensor,
        image: &Tensor,
        text_weight: f64,
        scale: f64,
    ) -> Result<Loss> {
        let c = &self.config;
        let text = self.check_ids(text, "caption ids", c.text_len, c.text_targets())?;
        let image = self.check_ids(image, "image tokens", c.image_len(), c.image_vocab)?;
        let inputs = image.narrow(1, 0, c.image_len() - 1);
        let x = self
            .embed(&text, &inputs)
            .dropout(self.config.arch.dropout, true);
        let seeds = DropoutSeeds::draw(self.blocks_draw(true));
        let segments: Vec<Segment> = (0..self.blocks.len())
            .map(|i| {
                Box::new(move |x: &Tensor| {
                    if let Some(seeds) = &seeds {
                        seeds.enter(i);
                    }
                    self.run_block(i, x, 0, None, true)
                }) as Segment
            })
            .collect();
        let chain = Chain::forward(&x, segments);
        drop(x);
        if let Some(seeds) = &seeds {
            seeds.leave(self.blocks.len());
        }
        let h = self.ln_f.forward(chain.output());
        let logits = Logits {
            text: self.text_head.forward(&h.narrow(1, 0, c.text_len)),
            image: self
                .image_head
                .forward(&h.narrow(1, c.text_len, c.image_len())),
        };
        drop(h);
        let loss = self.loss_of(&logits, &text, &image, text_weight);
        drop(logits);
        (&loss.loss * scale).backward();
        chain.backward();
        // The recomputation re-seeded the generator for each block; leave
        // it where the forward pass (and so the plain pass) left it.
        if let Some(seeds) = &seeds {
            seeds.leave(self.blocks.len());
        }
        Ok(loss)
    }

    /// An empty cache for decoding `batch` sequences.
    pub fn new_cache(&self, batch: i64) -> KvCache {
        let a = &self.config.arch;
        // Keys and values come out of autocast's matmuls in its dtype: a
        // cache of that dtype stores them without a cast and hands them to
        // attention without another.
        let kind = dalle_precision::autocast_kind(self.device()).unwrap_or_else(|| {
            self.vs
                .variables()
                .values()
                .next()
                .map_or(Kind::Float, Tensor::kind)
        });
        KvCache::new(
            a.depth,
            batch,
            a.heads,
            self.config.seq_len(),
            a.dim / a.heads,
            kind,
            self.device(),
        )
    }

    /// Starts decoding: runs BOS + captions `(B, T)` into an empty cache
    /// and returns the logits of the first image token, `(B, image_vocab)`.
    pub fn prefill(&self, text: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let c = &self.config;
        let text = self.check_ids(text, "caption ids", c.text_len, c.text_targets())?;
        if !cache.is_empty() {
            return Err(ModelError::Input {
                what: "cache",
                expected: "an empty cache".into(),
                found: format!("{} positions", cache.len()),
            });
        }
        let empty = Tensor::zeros([text.size()[0], 0], (Kind::Int64, self.device()));
        let h = self.run_blocks(self.embed(&text, &empty), 0, Some(cache), false);
        Ok(self.image_head.forward(&h.select(1, c.text_len)))
    }

    /// Feeds the next image token `(B,)` (grid index = image tokens already
    /// in the cache) and returns the logits of the one after it.
    pub fn step(&self, token: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let c = &self.config;
        let index = cache.len() - (c.text_len + 1);
        if index < 0 || cache.len() >= cache.capacity {
            return Err(ModelError::Input {
                what: "cache",
                expected: format!(
                    "between {} and {} positions",
                    c.text_len + 1,
                    cache.capacity - 1
                ),
                found: format!("{} positions", cache.len()),
            });
        }
        let token = token
            .to_device(self.device())
            .to_kind(Kind::Int64)
            .view([-1, 1]);
        let x = self.embed_image(&token, index);
        let h = self.run_blocks(x, cache.len(), Some(cache), false);
        Ok(self.image_head.forward(&h.select(1, 0)))
    }

    /// The logits of the next image token after captions `(B, T)` and an
    /// image prefix `(B, m)`, recomputed from scratch (no cache): what
    /// [`Gpt::step`] must agree with, and the reference it is timed against.
    pub fn next_image_logits(&self, text: &Tensor, prefix: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let text = self.check_ids(text, "caption ids", c.text_len, c.text_targets())?;
        let m = prefix.size()[1];
        if m >= c.image_len() {
            return Err(ModelError::Input {
                what: "image prefix",
                expected: format!("fewer than {} tokens", c.image_len()),
                found: m.to_string(),
            });
        }
        let prefix = self.check_ids(prefix, "image tokens", m, c.image_vocab)?;
        let h = self.run_blocks(self.embed(&text, &prefix), 0, None, false);
        Ok(self.image_head.forward(&h.select(1, c.text_len + m)))
    }

    /// Writes the weights with the config in the file's metadata.
    pub fn save(&self, path: &Path) -> Result<()> {
        weights::save(path, &self.named_parameters(), self.metadata())
    }

    /// The metadata a weights file carries: format and config.
    pub fn metadata(&self) -> HashMap<String, String> {
        weights::tagged_metadata(FORMAT, CONFIG_KEY, &self.config)
    }

    /// Rebuilds a model from a file written by [`Gpt::save`].
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        Self::from_weights(&weights::read(path)?, device)
    }

    /// Rebuilds a model from weights already read (from a file or a store).
    pub fn from_weights(file: &WeightFile, device: Device) -> Result<Self> {
        let model = Self::new(Self::config_from_metadata(file)?, device)?;
        file.assign(&model.vs.variables(), "", "")?;
        Ok(model)
    }

    pub fn config_from_metadata(file: &WeightFile) -> Result<GptConfig> {
        weights::tagged_config(file, FORMAT, CONFIG_KEY, "transformer")
    }
}
