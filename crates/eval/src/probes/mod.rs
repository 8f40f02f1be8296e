//! Attribute probes: a small classifier that reads the four attributes of
//! a synthetic caption back out of an image (background colour, shape
//! colour, shape kind, size). Trained on rendered scenes, it is how
//! `dalle eval` judges whether a generated image shows what its prompt
//! asked for; trained on random labels, it shows what chance looks like.
//!
//! `views` turns each image into what the network learns from (the two
//! colours, the shape's extent, and its silhouette cropped and scaled
//! around it); `net` is the network; this module trains, applies, saves
//! and loads it.
//!
//! The synthetic dataset's square (|u|, |v| ≤ 0.75 r) and diamond
//! (|u| + |v| ≤ r) are both squares drawn at a random angle, 6 % apart in
//! side. The probes tell them from every other kind but not reliably from
//! each other, so about half of them score as the wrong one of the two.

mod net;
mod views;

use crate::caption::Attributes;
use crate::{EvalError, Result};
use dalle_data::synth::{BACKGROUNDS, COLORS, SHAPES, SIZES};
use dalle_model::weights;
use net::Net;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use views::Views;

const FORMAT_KEY: &str = "format";
const FORMAT: &str = "dalle-rs/probes/1";
const CONFIG_KEY: &str = "probe_config";

/// Smallest image side the probes accept: a small shape is then 4–5
/// pixels in radius, about the least that shows its kind.
pub const MIN_SIDE: i64 = 32;

/// Images per pass of the fixed first stage and of prediction.
const CHUNK: i64 = 256;

/// How the probes are built and trained.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    pub steps: usize,
    pub batch_size: usize,
    /// Peak learning rate, decayed to zero along a cosine.
    pub lr: f64,
    pub weight_decay: f64,
    /// Seeds the weights, the batches and the augmentation.
    pub seed: u64,
    /// Channels of the first convolution; the next layers have 2× and 4×.
    pub width: i64,
    /// Random flips and quarter turns of each batch's silhouettes. Every
    /// attribute is invariant under them (shapes are drawn at random
    /// angles), so they multiply the training images for free.
    pub augment: bool,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            steps: 400,
            batch_size: 32,
            lr: 6e-3,
            weight_decay: 1e-4,
            seed: 0,
            width: 8,
            augment: true,
        }
    }
}

impl ProbeConfig {
    fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.batch_size == 0 || self.width <= 0 || self.lr <= 0.0 {
            return Err(EvalError::Config(format!(
                "steps, batch_size, width and lr must be positive, got {self:?}"
            )));
        }
        Ok(())
    }
}

/// Share of images whose attribute each probe got right.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct AttributeAccuracy {
    pub background: f64,
    pub shape_colour: f64,
    pub shape_kind: f64,
    pub size: f64,
}

impl AttributeAccuracy {
    /// The share of `predicted` that matches `labels`, attribute by
    /// attribute.
    pub fn of(predicted: &[Attributes], labels: &[Attributes]) -> Result<Self> {
        if labels.len() != predicted.len() || labels.is_empty() {
            return Err(EvalError::Input {
                what: "probe labels",
                expected: format!("one per image ({})", predicted.len()),
                found: labels.len().to_string(),
            });
        }
        let share = |f: fn(&Attributes) -> usize| {
            let right = predicted.iter().zip(labels).filter(|(p, l)| f(p) == f(l));
            right.count() as f64 / labels.len() as f64
        };
        Ok(Self {
            background: share(|a| a.background),
            shape_colour: share(|a| a.colour),
            shape_kind: share(|a| a.shape),
            size: share(|a| a.size),
        })
    }

    /// What guessing uniformly scores: one over each attribute's classes.
    pub fn chance() -> Self {
        Self {
            background: 1.0 / BACKGROUNDS.len() as f64,
            shape_colour: 1.0 / COLORS.len() as f64,
            shape_kind: 1.0 / SHAPES.len() as f64,
            size: 1.0 / SIZES.len() as f64,
        }
    }
}

/// One label column per head, in the order of [`net::HEADS`].
fn label_columns(labels: &[Attributes], device: Device) -> [Tensor; 4] {
    let column = |f: fn(&Attributes) -> usize| {
        let v: Vec<i64> = labels.iter().map(|a| f(a) as i64).collect();
        Tensor::from_slice(&v).to_device(device)
    };
    [
        column(|a| a.background),
        column(|a| a.colour),
        column(|a| a.shape),
        column(|a| a.size),
    ]
}

/// Trained attribute probes.
#[derive(Debug)]
pub struct Probes {
    config: ProbeConfig,
    vs: nn::VarStore,
    net: Net,
}

impl Probes {
    fn build(config: &ProbeConfig, device: Device) -> Result<Self> {
        config.validate()?;
        let vs = nn::VarStore::new(device);
        let net = Net::new(&vs.root(), config.width);
        Ok(Self {
            config: config.clone(),
            vs,
            net,
        })
    }

    pub fn config(&self) -> &ProbeConfig {
        &self.config
    }

    /// Trains probes on `(N, 3, H, W)` images in [0, 1] and their labels.
    ///
    /// Training is a pure function of the inputs and `config` (and of
    /// libtorch's thread count, which orders its float sums): the initial
    /// weights, batches and augmentations come from a ChaCha stream of
    /// `config.seed`, not from libtorch's process-wide generator, which
    /// other threads may be drawing from at the same time.
    pub fn train(
        images: &Tensor,
        labels: &[Attributes],
        config: &ProbeConfig,
        device: Device,
    ) -> Result<Self> {
        let n = check_images(images)?;
        if labels.len() != n {
            return Err(EvalError::Input {
                what: "probe labels",
                expected: format!("one per image ({n})"),
                found: labels.len().to_string(),
            });
        }
        let probes = Self::build(config, device)?;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        Net::initialise(&probes.vs, &mut rng);
        // The first stage has no weights: run it once, not every step.
        let views = tch::no_grad(|| Views::of_chunks(images, CHUNK, device));
        let targets = label_columns(labels, device);
        let mut opt = nn::AdamW {
            wd: config.weight_decay,
            ..Default::default()
        }
        .build(&probes.vs, config.lr)?;
        let mut order: Vec<i64> = (0..n as i64).collect();
        let mut cursor = order.len();
        for step in 0..config.steps {
            // Epochs of a seeded permutation: every image once per epoch.
            let mut batch = Vec::with_capacity(config.batch_size);
            while batch.len() < config.batch_size.min(n) {
                if cursor == order.len() {
                    order.shuffle(&mut rng);
                    cursor = 0;
                }
                batch.push(order[cursor]);
                cursor += 1;
            }
            let index = Tensor::from_slice(&batch).to_device(device);
            let mut v = views.select(&index);
            if config.augment {
                v.crop = dihedral(&v.crop, rng.random_range(0..8));
            }
            // Cosine decay to zero: the last steps settle instead of bouncing.
            let progress = step as f64 / config.steps as f64;
            opt.set_lr(config.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()));
            let loss = probes
                .net
                .forward(&v)
                .iter()
                .zip(&targets)
                .map(|(l, t)| l.cross_entropy_for_logits(&t.index_select(0, &index)))
                .reduce(|a, b| a + b)
                .expect("four heads");
            opt.backward_step(&loss);
            if step % 100 == 0 || step + 1 == config.steps {
                tracing::debug!(step, loss = loss.double_value(&[]), "probe training");
            }
        }
        Ok(probes)
    }

    /// The four heads' logits for `(N, 3, H, W)` images, in chunks.
    fn logits(&self, images: &Tensor) -> Result<Vec<Tensor>> {
        let n = check_images(images)? as i64;
        let device = self.vs.device();
        let chunks: Vec<Vec<Tensor>> = tch::no_grad(|| {
            (0..n)
                .step_by(CHUNK as usize)
                .map(|start| {
                    let x = images.narrow(0, start, CHUNK.min(n - start));
                    self.net
                        .forward(&Views::of(&x.to_kind(Kind::Float).to_device(device)))
                })
                .collect()
        });
        Ok((0..net::HEADS.len())
            .map(|head| Tensor::cat(&chunks.iter().map(|c| &c[head]).collect::<Vec<_>>(), 0))
            .collect())
    }

    /// The attributes each of `(N, 3, H, W)` images (in [0, 1]) shows.
    pub fn predict(&self, images: &Tensor) -> Result<Vec<Attributes>> {
        let classes: Vec<Vec<i64>> = self
            .logits(images)?
            .iter()
            .map(|l| Vec::<i64>::try_from(l.argmax(1, false).to_device(Device::Cpu)))
            .collect::<Result<_, _>>()?;
        let [background, colour, shape, size] = &classes[..] else {
            unreachable!("four heads")
        };
        Ok((0..background.len())
            .map(|i| Attributes {
                size: size[i] as usize,
                colour: colour[i] as usize,
                shape: shape[i] as usize,
                background: background[i] as usize,
            })
            .collect())
    }

    /// How often each probe is right on `images` with true `labels`.
    pub fn accuracy(&self, images: &Tensor, labels: &[Attributes]) -> Result<AttributeAccuracy> {
        AttributeAccuracy::of(&self.predict(images)?, labels)
    }

    /// Writes the weights as safetensors with the config in the metadata,
    /// so [`Probes::load`] can rebuild the network.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let config = serde_json::to_string(&self.config).expect("config serialises");
        let metadata = HashMap::from([
            (FORMAT_KEY.to_string(), FORMAT.to_string()),
            (CONFIG_KEY.to_string(), config),
        ]);
        Ok(weights::save(path, &tensors, metadata)?)
    }

    /// Loads probes written by [`Probes::save`] onto `device`.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let file = weights::read(path)?;
        let format_err = |reason: String| EvalError::Format {
            path: path.to_path_buf(),
            reason,
        };
        match file.metadata.get(FORMAT_KEY) {
            Some(f) if f == FORMAT => {}
            other => {
                return Err(format_err(format!(
                    "`{FORMAT_KEY}` metadata is {other:?}, expected `{FORMAT}`"
                )));
            }
        }
        let json = file
            .metadata
            .get(CONFIG_KEY)
            .ok_or_else(|| format_err(format!("no `{CONFIG_KEY}` metadata")))?;
        let config: ProbeConfig = serde_json::from_str(json)
            .map_err(|e| format_err(format!("bad `{CONFIG_KEY}`: {e}")))?;
        let probes = Self::build(&config, device)?;
        file.assign(&probes.vs.variables(), "", "")?;
        Ok(probes)
    }
}

/// One of the eight symmetries of the square on `(N, C, S, S)`: `k & 4`
/// transposes, then `k & 1` and `k & 2` flip the width and the height.
fn dihedral(x: &Tensor, k: u32) -> Tensor {
    let mut x = if k & 4 != 0 {
        x.transpose(2, 3)
    } else {
        x.shallow_clone()
    };
    if k & 1 != 0 {
        x = x.flip([3]);
    }
    if k & 2 != 0 {
        x = x.flip([2]);
    }
    x
}

/// Checks that `images` is a non-empty `(N, 3, H, W)` batch the probes
/// take and returns N.
fn check_images(images: &Tensor) -> Result<usize> {
    match images.size()[..] {
        [n, 3, h, w] if n > 0 && h >= MIN_SIDE && w >= MIN_SIDE => Ok(n as usize),
        _ => Err(EvalError::Input {
            what: "probe images",
            expected: format!("a non-empty (N, 3, H, W) batch with H, W ≥ {MIN_SIDE}"),
            found: format!("{:?}", images.size()),
        }),
    }
}

#[cfg(test)]
mod tests;
