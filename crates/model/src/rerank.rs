//! The reranker: a small contrastive text–image model in the manner of
//! CLIP (Radford et al. 2021), which the DALL-E paper used to pick the best
//! of N samples for a caption.
//!
//! Images go through a strided convolutional net pooled to one vector;
//! captions (the transformer's text ids: BPE tokens and per-position pads)
//! through a few transformer blocks that see the whole caption at once,
//! pooled over the real tokens. Both are projected to a shared space and
//! normalised; the logit of an (image, caption) pair is their cosine times
//! a learned scale. Training pulls matching pairs together and pushes every
//! other pair of the batch apart, in both directions.

use crate::gpt::GptArch;
use crate::gpt::block::{Block, INIT_STD, Visibility, linear};
use crate::weights::{self, WeightFile};
use crate::{ModelError, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

const FORMAT: &str = "dalle-rs/reranker/1";
const CONFIG_KEY: &str = "rerank_config";
/// The logit scale starts at 1/0.07 and is clamped at 100, as in CLIP:
/// beyond that the loss can be driven down by sharpening alone.
const INITIAL_SCALE: f64 = 1.0 / 0.07;
const MAX_SCALE: f64 = 100.0;

/// What a user chooses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RerankArch {
    /// Channels of the image net's first layer; each halving of the
    /// resolution doubles them.
    pub image_width: i64,
    /// Width of the caption encoder.
    pub dim: i64,
    pub depth: i64,
    pub heads: i64,
    /// Dimension of the shared embedding space.
    pub embed_dim: i64,
}

impl Default for RerankArch {
    /// A small model: the reranker only has to judge what the captions
    /// say, not draw it.
    fn default() -> Self {
        Self {
            image_width: 64,
            dim: 512,
            depth: 6,
            heads: 8,
            embed_dim: 512,
        }
    }
}

/// The architecture plus what the data fixes; what a weights file carries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RerankConfig {
    pub arch: RerankArch,
    /// BPE vocabulary of the caption tokenizer.
    pub text_vocab: i64,
    pub text_len: i64,
    /// Side of the square RGB images it scores.
    pub image_size: i64,
}

impl RerankConfig {
    /// Text ids: BPE tokens then one pad per position (as the transformer's).
    fn text_ids(&self) -> i64 {
        self.text_vocab + self.text_len
    }

    /// Stride-2 convolutions from `image_size` down to 4×4 (or less for
    /// images smaller than 8 px).
    fn downsamplings(&self) -> i64 {
        let mut side = self.image_size;
        let mut n = 0;
        while side > 4 {
            side = (side + 1) / 2;
            n += 1;
        }
        n.max(1)
    }

    pub fn validate(&self) -> Result<()> {
        let a = &self.arch;
        let positive = [
            ("rerank.model.image_width", a.image_width),
            ("rerank.model.dim", a.dim),
            ("rerank.model.depth", a.depth),
            ("rerank.model.heads", a.heads),
            ("rerank.model.embed_dim", a.embed_dim),
            ("text vocabulary", self.text_vocab),
            ("text.text_len", self.text_len),
            ("image size", self.image_size),
        ];
        if let Some((key, v)) = positive.iter().find(|(_, v)| *v <= 0) {
            return Err(ModelError::Config(format!(
                "{key} must be positive, got {v}"
            )));
        }
        if a.dim % a.heads != 0 {
            return Err(ModelError::Config(format!(
                "rerank.model.dim ({}) must be a multiple of rerank.model.heads ({})",
                a.dim, a.heads
            )));
        }
        Ok(())
    }

    /// The caption encoder's blocks as the transformer's block type knows
    /// them (no dropout: the reranker trains on few, clean pairs).
    fn block_arch(&self) -> GptArch {
        GptArch {
            dim: self.arch.dim,
            depth: self.arch.depth,
            heads: self.arch.heads,
            mlp_ratio: 4,
            dropout: 0.0,
            attn_dropout: 0.0,
            ..GptArch::default()
        }
    }
}

/// One stride-2 stage of the image net: conv, group norm, GELU.
struct Down {
    conv: nn::Conv2D,
    norm: nn::GroupNorm,
}

impl Down {
    fn new(path: nn::Path, inputs: i64, outputs: i64) -> Self {
        let config = nn::ConvConfig {
            stride: 2,
            padding: 1,
            ..Default::default()
        };
        Self {
            conv: nn::conv2d(&path / "conv", inputs, outputs, 3, config),
            norm: nn::group_norm(&path / "norm", 8.min(outputs), outputs, Default::default()),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.norm.forward(&self.conv.forward(x)).gelu("none")
    }
}

pub struct Reranker {
    config: RerankConfig,
    vs: nn::VarStore,
    image_stem: nn::Conv2D,
    image_down: Vec<Down>,
    image_proj: nn::Linear,
    text_emb: nn::Embedding,
    text_pos: nn::Embedding,
    blocks: Vec<Block>,
    ln_f: nn::LayerNorm,
    text_proj: nn::Linear,
    log_scale: Tensor,
}

impl Reranker {
    /// A freshly initialised model; seed with `tch::manual_seed` first for
    /// reproducible weights.
    pub fn new(config: RerankConfig, device: Device) -> Result<Self> {
        config.validate()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let a = &config.arch;
        let stem_config = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let image_stem = nn::conv2d(&root / "image_stem", 3, a.image_width, 3, stem_config);
        let mut channels = a.image_width;
        let image_down = (0..config.downsamplings())
            .map(|i| {
                let down = Down::new(&root / "image_down" / i, channels, channels * 2);
                channels *= 2;
                down
            })
            .collect();
        let embedding = |path: nn::Path, count: i64| {
            let init = nn::EmbeddingConfig {
                ws_init: nn::Init::Randn {
                    mean: 0.0,
                    stdev: INIT_STD,
                },
                ..Default::default()
            };
            nn::embedding(path, count, a.dim, init)
        };
        let block_arch = config.block_arch();
        let log_scale = root.var("log_scale", &[], nn::Init::Const(INITIAL_SCALE.ln()));
        Ok(Self {
            image_stem,
            image_down,
            image_proj: linear(&root / "image_proj", channels, a.embed_dim, INIT_STD),
            text_emb: embedding(&root / "text_emb", config.text_ids()),
            text_pos: embedding(&root / "text_pos", config.text_len),
            blocks: (0..a.depth)
                .map(|i| Block::new(&root / "blocks" / i, &block_arch))
                .collect(),
            ln_f: nn::layer_norm(&root / "ln_f", vec![a.dim], Default::default()),
            text_proj: linear(&root / "text_proj", a.dim, a.embed_dim, INIT_STD),
            log_scale,
            config,
            vs,
        })
    }

    pub fn config(&self) -> &RerankConfig {
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

    /// Unit-norm embeddings `(B, E)` of images `(B, 3, S, S)` in [0, 1].
    pub fn embed_images(&self, images: &Tensor) -> Result<Tensor> {
        let s = self.config.image_size;
        let size = images.size();
        if size.len() != 4 || size[1] != 3 || size[2] != s || size[3] != s {
            return Err(ModelError::Input {
                what: "reranker images",
                expected: format!("(B, 3, {s}, {s})"),
                found: format!("{size:?}"),
            });
        }
        let x = images.to_device(self.device()).to_kind(Kind::Float) * 2.0 - 1.0;
        let mut h = self.image_stem.forward(&x).gelu("none");
        for down in &self.image_down {
            h = down.forward(&h);
        }
        let pooled = h.mean_dim(&[2i64, 3][..], false, Kind::Float);
        Ok(normalise(
            &self.image_proj.forward(&pooled).to_kind(Kind::Float),
        ))
    }

    /// Unit-norm embeddings `(B, E)` of captions `(B, T)` (the
    /// transformer's text ids), pooled over their real tokens.
    pub fn embed_captions(&self, ids: &Tensor) -> Result<Tensor> {
        let (t, vocab) = (self.config.text_len, self.config.text_ids());
        let size = ids.size();
        if size.len() != 2 || size[1] != t {
            return Err(ModelError::Input {
                what: "reranker caption ids",
                expected: format!("(B, {t})"),
                found: format!("{size:?}"),
            });
        }
        let ids = ids.to_device(self.device()).to_kind(Kind::Int64);
        if ids.numel() > 0 {
            let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
            if lo < 0 || hi >= vocab {
                return Err(ModelError::Input {
                    what: "reranker caption ids",
                    expected: format!("ids in [0, {vocab})"),
                    found: format!("ids in [{lo}, {hi}]"),
                });
            }
        }
        let positions = Tensor::arange(t, (Kind::Int64, self.device()));
        let mut h = self.text_emb.forward(&ids) + self.text_pos.forward(&positions);
        for block in &self.blocks {
            h = block.forward(&h, &Visibility::All, None, false);
        }
        let h = self.ln_f.forward(&h);
        // Mean over BPE tokens (ids below the vocabulary; pads above):
        // how many pads follow a caption says nothing of what it shows.
        let real = ids
            .lt(self.config.text_vocab)
            .to_kind(Kind::Float)
            .unsqueeze(-1);
        let count = real.sum_dim_intlist(1, false, Kind::Float).clamp_min(1.0);
        let pooled = (h * &real).sum_dim_intlist(1, false, Kind::Float) / count;
        Ok(normalise(
            &self.text_proj.forward(&pooled).to_kind(Kind::Float),
        ))
    }

    /// The learned logit scale, clamped (see [`MAX_SCALE`]).
    pub fn logit_scale(&self) -> Tensor {
        self.log_scale.clamp_max(MAX_SCALE.ln()).exp()
    }

    /// `(images, captions)` logits of every pair of two embedding sets.
    pub fn logits(&self, images: &Tensor, captions: &Tensor) -> Tensor {
        cosine_similarities(images, captions) * self.logit_scale()
    }

    /// The symmetric contrastive loss of a batch whose `i`-th image and
    /// `i`-th caption match, averaged over every row of both directions.
    pub fn loss(&self, images: &Tensor, captions: &Tensor) -> Tensor {
        contrastive_loss(&self.logits(images, captions))
    }

    /// The cosine of each image `(N, 3, S, S)` with its own caption
    /// `(N, T)`: the score candidates are ranked by, `(N,)`.
    pub fn score(&self, images: &Tensor, captions: &Tensor) -> Result<Tensor> {
        tch::no_grad(|| {
            let i = self.embed_images(images)?;
            let c = self.embed_captions(captions)?;
            Ok((i * c).sum_dim_intlist(1, false, Kind::Float))
        })
    }

    /// Writes the weights with the config in the file's metadata.
    pub fn save(&self, path: &Path) -> Result<()> {
        weights::save(path, &self.named_parameters(), self.metadata())
    }

    pub fn metadata(&self) -> HashMap<String, String> {
        weights::tagged_metadata(FORMAT, CONFIG_KEY, &self.config)
    }

    pub fn load(path: &Path, device: Device) -> Result<Self> {
        Self::from_weights(&weights::read(path)?, device)
    }

    pub fn from_weights(file: &WeightFile, device: Device) -> Result<Self> {
        let model = Self::new(Self::config_from_metadata(file)?, device)?;
        file.assign(&model.vs.variables(), "", "")?;
        Ok(model)
    }

    pub fn config_from_metadata(file: &WeightFile) -> Result<RerankConfig> {
        weights::tagged_config(file, FORMAT, CONFIG_KEY, "reranker")
    }
}

/// `(images, captions)` cosines of two sets of unit embeddings, computed
/// in fp32 even inside a bf16 autocast region: scaled by up to
/// [`MAX_SCALE`], bf16's rounding of a cosine (~0.004) would move a logit
/// by a third of a nat. The product is small (batch² · embedding width).
pub fn cosine_similarities(images: &Tensor, captions: &Tensor) -> Tensor {
    dalle_precision::full_precision(images.device(), || {
        images
            .to_kind(Kind::Float)
            .matmul(&captions.to_kind(Kind::Float).tr())
    })
}

/// Embeddings scaled to unit length (in fp32: they come from the
/// projections in bf16 under autocast, and their norm is a reduction).
fn normalise(x: &Tensor) -> Tensor {
    let norm = x
        .norm_scalaropt_dim(2.0, &[-1i64][..], true)
        .clamp_min(1e-8);
    x / norm
}

/// Cross-entropy of each row of `logits` `(B, B)` against the diagonal,
/// and of each column, averaged (CLIP's loss).
pub fn contrastive_loss(logits: &Tensor) -> Tensor {
    let n = logits.size()[0];
    let targets = Tensor::arange(n, (Kind::Int64, logits.device()));
    let rows = logits.cross_entropy_for_logits(&targets);
    let columns = logits.tr().cross_entropy_for_logits(&targets);
    (rows + columns) * 0.5
}

/// Of `n` candidate scores, the indices of the best `keep`, best first.
pub fn best(scores: &[f32], keep: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order.truncate(keep);
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::OptimizerConfig;

    fn tiny() -> RerankConfig {
        RerankConfig {
            arch: RerankArch {
                image_width: 8,
                dim: 16,
                depth: 1,
                heads: 2,
                embed_dim: 8,
            },
            text_vocab: 10,
            text_len: 4,
            image_size: 16,
        }
    }

    #[test]
    fn embeddings_are_unit_vectors_and_pads_do_not_count() {
        tch::manual_seed(0);
        let model = Reranker::new(tiny(), Device::Cpu).unwrap();
        let images = Tensor::rand([3, 3, 16, 16], (Kind::Float, Device::Cpu));
        let e = model.embed_images(&images).unwrap();
        assert_eq!(e.size(), [3, 8]);
        let norms = e.norm_scalaropt_dim(2.0, &[1i64][..], false);
        assert!(norms.allclose(
            &Tensor::ones([3], (Kind::Float, Device::Cpu)),
            1e-5,
            1e-5,
            false
        ));
        // Two captions with the same tokens and different pads attend
        // differently but must at least run; a caption of other tokens
        // must embed elsewhere.
        let ids = Tensor::from_slice(&[1i64, 2, 12, 13, 3, 4, 12, 13]).view([2, 4]);
        let c = model.embed_captions(&ids).unwrap();
        assert_eq!(c.size(), [2, 8]);
        assert!((c.get(0) - c.get(1)).abs().max().double_value(&[]) > 1e-4);
        let bad = Tensor::from_slice(&[1i64, 2, 3, 14]).view([1, 4]);
        let err = model.embed_captions(&bad).unwrap_err().to_string();
        assert!(err.contains("[1, 14]"), "{err}");
        let err = model
            .embed_images(&Tensor::zeros([1, 3, 8, 8], (Kind::Float, Device::Cpu)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("16"), "{err}");
    }

    #[test]
    fn contrastive_loss_is_low_on_the_diagonal_and_symmetric() {
        let eye = Tensor::eye(4, (Kind::Float, Device::Cpu)) * 20.0;
        assert!(contrastive_loss(&eye).double_value(&[]) < 1e-6);
        let flat = Tensor::zeros([4, 4], (Kind::Float, Device::Cpu));
        let uniform = contrastive_loss(&flat).double_value(&[]);
        assert!((uniform - 4f64.ln()).abs() < 1e-6);
        let random = Tensor::randn([5, 5], (Kind::Float, Device::Cpu));
        let a = contrastive_loss(&random).double_value(&[]);
        let b = contrastive_loss(&random.tr()).double_value(&[]);
        assert!((a - b).abs() < 1e-6);
    }

    #[test]
    fn a_few_steps_learn_to_match_colours() {
        // Images of one flat colour each, captions naming it: after a few
        // updates each image must rank its own caption first.
        tch::manual_seed(1);
        let model = Reranker::new(tiny(), Device::Cpu).unwrap();
        let colours = [
            [1.0f32, 0.0, 0.0],
            [0.0, 1.0, 0.0],
            [0.0, 0.0, 1.0],
            [1.0, 1.0, 0.0],
        ];
        let images = Tensor::stack(
            &colours
                .iter()
                .map(|c| {
                    Tensor::from_slice(c)
                        .view([3, 1, 1])
                        .expand([3, 16, 16], false)
                })
                .collect::<Vec<_>>(),
            0,
        );
        let ids = Tensor::from_slice(&[
            1i64, 11, 12, 13, 2, 11, 12, 13, 3, 11, 12, 13, 4, 11, 12, 13,
        ])
        .view([4, 4]);
        let mut opt = nn::Adam::default().build(model.var_store(), 3e-3).unwrap();
        for _ in 0..60 {
            let loss = model.loss(
                &model.embed_images(&images).unwrap(),
                &model.embed_captions(&ids).unwrap(),
            );
            opt.backward_step(&loss);
        }
        let logits = model.logits(
            &model.embed_images(&images).unwrap(),
            &model.embed_captions(&ids).unwrap(),
        );
        let picked = Vec::<i64>::try_from(logits.argmax(1, false)).unwrap();
        assert_eq!(picked, [0, 1, 2, 3]);
        let scores = Vec::<f32>::try_from(model.score(&images, &ids).unwrap()).unwrap();
        let swapped = Vec::<f32>::try_from(model.score(&images, &ids.flip([0])).unwrap()).unwrap();
        assert!(
            scores.iter().zip(&swapped).all(|(s, w)| s > w),
            "{scores:?} {swapped:?}"
        );
    }

    #[test]
    fn weights_round_trip_and_foreign_files_are_named() {
        tch::manual_seed(2);
        let model = Reranker::new(tiny(), Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reranker.safetensors");
        model.save(&path).unwrap();
        let back = Reranker::load(&path, Device::Cpu).unwrap();
        assert_eq!(back.config(), model.config());
        let images = Tensor::rand([2, 3, 16, 16], (Kind::Float, Device::Cpu));
        let ids = Tensor::from_slice(&[1i64, 2, 12, 13, 3, 4, 5, 13]).view([2, 4]);
        let (a, b) = (
            model.score(&images, &ids).unwrap(),
            back.score(&images, &ids).unwrap(),
        );
        assert!(a.equal(&b));
        let other = dir.path().join("other.safetensors");
        weights::save(&other, &model.named_parameters(), HashMap::new()).unwrap();
        let err = Reranker::load(&other, Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not a dalle-rs reranker"), "{err}");
    }

    #[test]
    fn best_keeps_the_highest_scores_in_order() {
        assert_eq!(best(&[0.1, 0.9, -0.2, 0.5], 2), [1, 3]);
        assert_eq!(best(&[0.3, 0.3], 5), [0, 1]);
    }
}
