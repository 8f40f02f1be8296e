//! The discrete VAE of DALL-E: a convolutional encoder to a grid of logits
//! over a codebook, a Gumbel-softmax relaxation for training, and a
//! convolutional decoder to logit-Laplace pixel statistics.
//!
//! Compatible with OpenAI's released dVAE: same blocks, widths, init and
//! parameter names (`encoder.` / `decoder.` prefixed in our single weights
//! file; unprefixed in OpenAI's two files, see [`Dvae::load_openai`]).

mod block;
pub mod config;
mod conv;
mod decoder;
mod encoder;
pub mod loss;
pub mod relax;

pub use config::DvaeConfig;
pub use loss::ReconLoss;
pub use relax::Relaxation;

use crate::recompute::{Chain, Segment};
use crate::weights::{self, WeightFile};
use crate::{ModelError, Result};
use decoder::Decoder;
use encoder::Encoder;
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor, nn};

const FORMAT_KEY: &str = "format";
const FORMAT: &str = "dalle-rs/dvae/1";
/// A file holding only the decoder (what a sampler needs).
const DECODER_FORMAT: &str = "dalle-rs/dvae-decoder/1";
const CONFIG_KEY: &str = "dvae_config";

/// The temperature, weights and choices of one training step's objective.
#[derive(Clone, Copy, Debug)]
pub struct Objective {
    pub tau: f64,
    pub beta: f64,
    /// Weight of the codebook-usage term, KL(q̄ ‖ uniform) of the batch's
    /// mean posterior, added by [`StepOutput::add_usage_term`].
    pub usage: f64,
    pub relaxation: Relaxation,
    pub recon: ReconLoss,
}

/// What one training forward pass produces: the loss to minimise and the
/// parts it is made of.
pub struct StepOutput {
    /// recon + β · KL / (C·H·W) (+ the usage term once added), scalar,
    /// carries the graph.
    pub loss: Tensor,
    /// Reconstruction term, nats per image dimension, scalar.
    pub recon: Tensor,
    /// KL to the uniform prior, nats per image, scalar.
    pub kl: Tensor,
    /// MSE of the decoded mean on [0, 1] pixels, scalar, detached.
    pub mse: Tensor,
    /// Argmax codes of the encoder, `(N, h, w)`.
    pub tokens: Tensor,
    /// Mean posterior over codes of this batch, `(K,)`, carries the graph.
    pub mean_posterior: Tensor,
}

impl StepOutput {
    /// Adds `weight` × KL(q̄ ‖ uniform) to the loss, with q̄ the mean
    /// posterior `global` of the whole (global) batch, and returns that KL.
    ///
    /// Why: KL(q(z|x) ‖ uniform) at each position only makes each
    /// posterior less confident; it does nothing against a batch that
    /// puts all its positions on a handful of codes, which is how the
    /// codebook collapses. Spreading the batch's mean posterior keeps
    /// every code in use while each position stays confident.
    pub fn add_usage_term(&mut self, weight: f64, global: &Tensor) -> Tensor {
        let kl = loss::usage_kl(global);
        if weight > 0.0 {
            let term = loss::usage_surrogate(&self.mean_posterior, global) * weight;
            self.loss = &self.loss + term;
        }
        kl
    }
}

/// A training forward pass ([`Dvae::train_pass`]) whose backward is still
/// to run: add to `out.loss` first (the usage term), then call
/// [`TrainPass::backward`].
pub struct TrainPass<'a> {
    pub out: StepOutput,
    /// The checkpointed chains, encoder then decoder (none without
    /// checkpointing).
    chains: Vec<Chain<'a>>,
}

impl TrainPass<'_> {
    /// The backward of `scale` × `out.loss` (a micro-batch's share of the
    /// batch), accumulated into the parameters' gradients; with
    /// checkpointing, the decoder's groups are then recomputed and
    /// backpropagated, and the encoder's last. Returns `out` with its loss
    /// terms and mean posterior detached.
    pub fn backward(self, scale: f64) -> StepOutput {
        let Self { out, chains } = self;
        (&out.loss * scale).backward();
        for chain in chains.into_iter().rev() {
            chain.backward();
        }
        StepOutput {
            loss: out.loss.detach(),
            recon: out.recon.detach(),
            kl: out.kl.detach(),
            mse: out.mse,
            tokens: out.tokens,
            mean_posterior: out.mean_posterior.detach(),
        }
    }
}

/// [`Dvae::hard_reconstruction`] of a batch.
pub struct HardReconstruction {
    /// Argmax codes, `(N, h, w)`.
    pub tokens: Tensor,
    /// Decoded `[0, 1]` images, `(N, C, S, S)`.
    pub pixels: Tensor,
    /// Mean squared error on [0, 1] pixels, scalar.
    pub mse: Tensor,
    /// The reconstruction term, nats per image dimension, scalar.
    pub recon: Tensor,
}

pub struct Dvae {
    config: DvaeConfig,
    vs: nn::VarStore,
    encoder: Encoder,
    decoder: Decoder,
}

impl Dvae {
    /// A freshly initialised model; seed with `tch::manual_seed` first for
    /// reproducible weights.
    pub fn new(config: DvaeConfig, device: Device) -> Result<Self> {
        config.validate()?;
        let vs = nn::VarStore::new(device);
        let encoder = Encoder::new(vs.root() / "encoder", &config);
        let decoder = Decoder::new(vs.root() / "decoder", &config);
        Ok(Self {
            config,
            vs,
            encoder,
            decoder,
        })
    }

    pub fn config(&self) -> &DvaeConfig {
        &self.config
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Checks a batch of images: float `(N, C, S, S)` with the config's C and S.
    fn check_images(&self, images: &Tensor) -> Result<()> {
        let size = images.size();
        let (c, s) = (self.config.channels, self.config.image_size);
        let expected = format!("(N, {c}, {s}, {s})");
        if size.len() != 4 || size[1] != c || size[2] != s || size[3] != s {
            return Err(ModelError::Input {
                what: "image batch shape",
                expected,
                found: format!("{size:?}"),
            });
        }
        if !images.is_floating_point() {
            return Err(ModelError::Input {
                what: "image dtype",
                expected: "a float tensor of [0, 1] pixels".into(),
                found: format!("{:?}", images.kind()),
            });
        }
        Ok(())
    }

    /// Encoder logits for `[0, 1]` images.
    ///
    /// # Shapes
    /// `(N, C, S, S)` → `(N, vocab, S/d, S/d)`
    pub fn encoder_logits(&self, images: &Tensor) -> Result<Tensor> {
        self.check_images(images)?;
        let x = images.to_device(self.device()).to_kind(Kind::Float);
        // fp32 out of a bf16 autocast region too: the posterior, its KL and
        // the codebook terms are computed on these.
        Ok(self
            .encoder
            .forward(&loss::map_pixels(&x))
            .to_kind(Kind::Float))
    }

    /// Image tokens: the argmax code at each grid position, no noise.
    ///
    /// # Shapes
    /// `(N, C, S, S)` → `(N, S/d, S/d)` int64, d = `downsample`
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        tch::no_grad(|| Ok(self.encoder_logits(images)?.argmax(1, false)))
    }

    /// Images `[0, 1]` for a grid of tokens.
    ///
    /// # Shapes
    /// `(N, h, w)` int64 → `(N, C, d·h, d·w)`
    pub fn decode(&self, tokens: &Tensor) -> Result<Tensor> {
        decode_tokens(&self.decoder, &self.config, self.device(), tokens)
    }

    /// Encode then decode: what the model keeps of an image.
    pub fn reconstruct(&self, images: &Tensor) -> Result<Tensor> {
        self.decode(&self.encode(images)?)
    }

    /// What stage 2 sees of `[0, 1]` images: argmax tokens decoded without
    /// noise, and `recon`'s reconstruction term for that decoding.
    pub fn hard_reconstruction(
        &self,
        images: &Tensor,
        recon: ReconLoss,
    ) -> Result<HardReconstruction> {
        tch::no_grad(|| {
            let tokens = self.encode(images)?;
            let x = images.to_device(self.device()).to_kind(Kind::Float);
            let z = relax::one_hot_codes(&tokens, self.config.vocab_size);
            let stats = self.decoder.forward(&z).to_kind(Kind::Float);
            let pixels = loss::stats_to_pixels(&stats);
            let mse = (&pixels - &x).square().mean(Kind::Float);
            let recon = match recon {
                ReconLoss::LogitLaplace => loss::logit_laplace_nll(&stats, &loss::map_pixels(&x)),
                ReconLoss::Mse => loss::gaussian_nll(&mse),
            };
            Ok(HardReconstruction {
                tokens,
                pixels,
                mse,
                recon,
            })
        })
    }

    /// One training forward pass on `[0, 1]` images.
    pub fn train_forward(&self, images: &Tensor, objective: &Objective) -> Result<StepOutput> {
        Ok(self.train_pass(images, objective, false)?.out)
    }

    /// One training forward pass on `[0, 1]` images whose backward is
    /// [`TrainPass::backward`], so that terms needing every rank's batch
    /// (the usage term) can join the loss in between.
    ///
    /// With `checkpointing`, each encoder group and each decoder group
    /// keeps only its input and is recomputed in backward
    /// ([`crate::recompute`]): the first group of each takes the input conv
    /// with it (its full-resolution output is the largest activation of
    /// all), the last the output conv. The Gumbel noise is drawn between
    /// the two chains, once, so recomputation replays no random draw. The
    /// loss terms on the logits (KL, the usage term) and the decoder's
    /// backward both reach the logits, the encoder chain's output, whose
    /// gradient sums them before the encoder's backward runs last.
    pub fn train_pass(
        &self,
        images: &Tensor,
        objective: &Objective,
        checkpointing: bool,
    ) -> Result<TrainPass<'_>> {
        self.check_images(images)?;
        let x = images.to_device(self.device()).to_kind(Kind::Float);
        let mut chains = Vec::new();
        let mapped = loss::map_pixels(&x);
        let logits = if checkpointing {
            let segments = (0..self.encoder.group_count())
                .map(|g| Box::new(move |h: &Tensor| self.encoder.segment(g, h)) as Segment)
                .collect();
            let chain = Chain::forward(&mapped, segments);
            let logits = chain.output().shallow_clone();
            chains.push(chain);
            logits
        } else {
            self.encoder.forward(&mapped)
        };
        drop(mapped);
        // Under bf16 autocast the convolutions hand back bf16: the noise,
        // the KL and the reconstruction term are computed in fp32 (a no-op
        // in fp32), as autocast itself would do for losses on CUDA.
        let logits = logits.to_kind(Kind::Float);
        let z = relax::gumbel_softmax(&logits, objective.tau, objective.relaxation);
        let stats = if checkpointing {
            let segments = (0..self.decoder.group_count())
                .map(|g| Box::new(move |h: &Tensor| self.decoder.segment(g, h)) as Segment)
                .collect();
            let chain = Chain::forward(&z, segments);
            let stats = chain.output().shallow_clone();
            chains.push(chain);
            stats
        } else {
            self.decoder.forward(&z)
        };
        drop(z);
        let stats = stats.to_kind(Kind::Float);
        // The MSE is a metric unless it is the loss: then it needs no graph.
        let mse_of = |stats: &Tensor| {
            (loss::stats_to_pixels(stats) - &x)
                .square()
                .mean(Kind::Float)
        };
        let (recon, mse) = match objective.recon {
            ReconLoss::LogitLaplace => (
                loss::logit_laplace_nll(&stats, &loss::map_pixels(&x)),
                tch::no_grad(|| mse_of(&stats.detach())),
            ),
            ReconLoss::Mse => {
                let mse = mse_of(&stats);
                (loss::gaussian_nll(&mse), mse)
            }
        };
        let (kl, mean_posterior) = loss::posterior_terms(&logits);
        let dims = (x.numel() / x.size()[0] as usize) as f64;
        let loss = &recon + &kl * (objective.beta / dims);
        let out = StepOutput {
            loss,
            recon,
            kl,
            mse: mse.detach(),
            tokens: logits.detach().argmax(1, false),
            mean_posterior,
        };
        Ok(TrainPass { out, chains })
    }

    /// Named parameters, sorted by name.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut vars: Vec<_> = self.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// The decoder alone as a safetensors file (names keep their
    /// `decoder.` prefix), loadable by [`DvaeDecoder`].
    pub fn decoder_bytes(&self) -> Result<Vec<u8>> {
        let tensors: Vec<(String, Tensor)> = self
            .named_parameters()
            .into_iter()
            .filter(|(name, _)| name.starts_with("decoder."))
            .collect();
        weights::to_bytes(
            &tensors,
            self.metadata(DECODER_FORMAT),
            Path::new("dvae decoder"),
        )
    }

    fn metadata(&self, format: &str) -> HashMap<String, String> {
        let config = serde_json::to_string(&self.config).expect("config serialises");
        HashMap::from([
            (FORMAT_KEY.to_string(), format.to_string()),
            (CONFIG_KEY.to_string(), config),
        ])
    }

    /// Writes the weights with the config in the file's metadata, so the
    /// file alone rebuilds the model.
    pub fn save(&self, path: &Path) -> Result<()> {
        weights::save(path, &self.named_parameters(), self.metadata(FORMAT))
    }

    /// Rebuilds a model from a file written by [`Dvae::save`].
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let file = weights::read(path)?;
        let config = Self::config_from_metadata(&file)?;
        let model = Self::new(config, device)?;
        file.assign(&model.vs.variables(), "", "")?;
        Ok(model)
    }

    /// Reads only the config of a weights file.
    pub fn read_config(path: &Path) -> Result<DvaeConfig> {
        Self::config_from_metadata(&weights::read(path)?)
    }

    fn config_from_metadata(file: &WeightFile) -> Result<DvaeConfig> {
        config_from_metadata(file, &[FORMAT])
    }

    /// Loads OpenAI's released encoder and decoder, converted to safetensors
    /// with their original (unprefixed) state-dict names. The architecture
    /// is read off the tensor shapes; `image_size` is what inputs will be.
    pub fn load_openai(
        encoder: &Path,
        decoder: &Path,
        image_size: i64,
        device: Device,
    ) -> Result<Self> {
        let enc = weights::read(encoder)?;
        let dec = weights::read(decoder)?;
        let shape = |file: &WeightFile, name: &str| -> Result<Vec<i64>> {
            file.tensors
                .get(name)
                .map(|t| t.size())
                .ok_or_else(|| ModelError::MissingTensor {
                    path: file.path.clone(),
                    name: name.to_string(),
                    expected: vec![],
                })
        };
        let input = shape(&enc, "blocks.input.w")?; // (n_hid, C, 7, 7)
        let codebook = shape(&dec, "blocks.input.w")?; // (n_init, vocab, 1, 1)
        let n_blk_per_group = enc
            .tensors
            .keys()
            .filter(|n| n.starts_with("blocks.group_1.") && n.ends_with(".res_path.conv_1.w"))
            .count() as i64;
        let config = DvaeConfig {
            image_size,
            downsample: config::MAX_DOWNSAMPLE,
            channels: input[1],
            n_hid: input[0],
            n_blk_per_group,
            vocab_size: codebook[1],
            n_init: codebook[0],
            post_gain: None,
        };
        let model = Self::new(config, device)?;
        let vars = model.vs.variables();
        enc.assign(&vars, "encoder.", "")?;
        dec.assign(&vars, "decoder.", "")?;
        Ok(model)
    }
}

/// Decodes a token grid with `decoder`, checking its shape and ids.
fn decode_tokens(
    decoder: &Decoder,
    config: &DvaeConfig,
    device: Device,
    tokens: &Tensor,
) -> Result<Tensor> {
    let size = tokens.size();
    if size.len() != 3 {
        return Err(ModelError::Input {
            what: "token grid shape",
            expected: "(N, h, w)".into(),
            found: format!("{size:?}"),
        });
    }
    let tokens = tokens.to_device(device).to_kind(Kind::Int64);
    let (lo, hi) = (tokens.min().int64_value(&[]), tokens.max().int64_value(&[]));
    if lo < 0 || hi >= config.vocab_size {
        return Err(ModelError::Input {
            what: "token ids",
            expected: format!("values in [0, {})", config.vocab_size),
            found: format!("values in [{lo}, {hi}]"),
        });
    }
    tch::no_grad(|| {
        let z = relax::one_hot_codes(&tokens, config.vocab_size);
        Ok(loss::stats_to_pixels(
            &decoder.forward(&z).to_kind(Kind::Float),
        ))
    })
}

/// The config in a weights file's metadata, if its format is one of `formats`.
fn config_from_metadata(file: &WeightFile, formats: &[&str]) -> Result<DvaeConfig> {
    let format_err = |reason: String| ModelError::Format {
        path: file.path.clone(),
        reason,
    };
    match file.metadata.get(FORMAT_KEY) {
        Some(f) if formats.contains(&f.as_str()) => {}
        Some(other) => {
            return Err(format_err(format!(
                "format `{other}`, expected {}",
                formats.join(" or ")
            )));
        }
        None => {
            return Err(format_err(format!(
                "no `{FORMAT_KEY}` metadata: not a dalle-rs dVAE file (OpenAI's converted \
                 encoder/decoder files load with `Dvae::load_openai`)"
            )));
        }
    }
    let json = file
        .metadata
        .get(CONFIG_KEY)
        .ok_or_else(|| format_err(format!("no `{CONFIG_KEY}` metadata")))?;
    serde_json::from_str(json).map_err(|e| format_err(format!("bad `{CONFIG_KEY}`: {e}")))
}

/// The dVAE's decoder alone: token grids to images, for sampling. Loads a
/// decoder file ([`Dvae::decoder_bytes`]) or a whole dVAE file.
pub struct DvaeDecoder {
    config: DvaeConfig,
    vs: nn::VarStore,
    decoder: Decoder,
}

impl DvaeDecoder {
    pub fn from_weights(file: &WeightFile, device: Device) -> Result<Self> {
        let config = config_from_metadata(file, &[DECODER_FORMAT, FORMAT])?;
        config.validate()?;
        let vs = nn::VarStore::new(device);
        let decoder = Decoder::new(vs.root() / "decoder", &config);
        file.assign(&vs.variables(), "decoder.", "decoder.")?;
        Ok(Self {
            config,
            vs,
            decoder,
        })
    }

    pub fn config(&self) -> &DvaeConfig {
        &self.config
    }

    /// Images `[0, 1]` for token grids `(N, h, w)`.
    pub fn decode(&self, tokens: &Tensor) -> Result<Tensor> {
        decode_tokens(&self.decoder, &self.config, self.vs.device(), tokens)
    }
}

#[cfg(test)]
mod tests;
