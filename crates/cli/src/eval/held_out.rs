//! The images `dalle eval` measures on, never trained on: those named on
//! the command line, else the job's validation set (`data.validation`),
//! else fresh synthetic scenes of another seed than the training data's.
//! Also the job's training data as the eval reads it: the (colour, shape)
//! pairs of its captions, and images with known attributes for the probes.

use crate::dvae::read_inputs;
use anyhow::{Context, Result, bail};
use dalle_data::columns::Payload;
use dalle_data::image_ops::{Crop, Preprocess};
use dalle_data::parquet_source;
use dalle_data::synth::Combo;
use dalle_data::validation::{self, Selection, ValidationRead, ValidationSet};
use dalle_eval::fidelity::combo_of;
use dalle_eval::report::HeldOutSource;
use dalle_eval::{Attributes, parse_caption, scenes};
use dalle_model::dvae::Dvae;
use dalle_model::images::from_bytes;
use dalle_store::Location;
use dalle_train::config::JobConfig;
use dalle_train::ddp::DataParallel;
use dalle_train::feed::batch_tensor;
use dalle_train::validation::HeldOut;
use std::collections::BTreeSet;
use std::path::Path;
use tch::{Device, Tensor};

/// Fresh synthetic held-out scenes use the training data's seed plus this,
/// so they are other scenes of the same distribution.
const SYNTHETIC_SEED_OFFSET: u64 = 1;

/// Fewer training images with synthetic captions than this, and the
/// probes learn from rendered scenes instead: a few hundred is what it
/// takes to see every class of every attribute several times.
const MIN_PROBE_IMAGES: usize = 200;

/// Held-out images with their keys and captions.
pub struct HeldOutSet {
    pub source: HeldOutSource,
    pub keys: Vec<String>,
    /// Empty for image files named on the command line.
    pub captions: Vec<String>,
    /// `(N, 3, S, S)` in [0, 1], on the CPU.
    pub images: Tensor,
}

impl HeldOutSet {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Indexes and attributes of the images whose captions are synthetic.
    pub fn attributes(&self) -> Vec<(usize, Attributes)> {
        self.captions
            .iter()
            .enumerate()
            .filter_map(|(i, c)| parse_caption(c).ok().map(|a| (i, a)))
            .collect()
    }
}

/// How images are decoded for a dVAE of `side` pixels: centre-cropped, so
/// every run sees the same pixels.
fn preprocess(job: &JobConfig, side: u32) -> Preprocess {
    Preprocess {
        size: side,
        max_pixels: job.data.max_pixels,
        crop: Crop::Center,
    }
}

/// The first `max` samples of a dataset, every one of them.
fn read_dataset(
    job: &JobConfig,
    location: &Location,
    side: u32,
    max: usize,
) -> Result<ValidationSet> {
    let request = ValidationRead {
        selection: Selection::All,
        max_samples: max,
        slice: (0, 1),
        preprocess: preprocess(job, side),
        columns: job.data.columns.clone(),
        decode_threads: job.data.decode_threads.resolve(),
    };
    let set = validation::read(location, &request)
        .with_context(|| format!("reading images of {}", location.url))?;
    expect_images(&set, &location.url)?;
    Ok(set)
}

fn expect_images(set: &ValidationSet, url: &str) -> Result<()> {
    if let payload @ Payload::Tokens { .. } = set.payload {
        bail!("{url} holds {payload}; `dalle eval` needs images (a dataset with an image column)");
    }
    Ok(())
}

/// A set's images as one `(N, 3, S, S)` tensor on the CPU.
fn set_tensor(set: &ValidationSet) -> Tensor {
    batch_tensor(&set.batch(0..set.len()), Device::Cpu)
}

/// Up to `count` held-out images for `dvae`.
pub fn read(job: &JobConfig, inputs: &[String], dvae: &Dvae, count: usize) -> Result<HeldOutSet> {
    if count == 0 {
        bail!("--count must be positive");
    }
    let side = dvae.config().image_size as u32;
    let (source, keys, captions, parts) = if !inputs.is_empty() {
        let (mut keys, mut captions, mut parts) = (Vec::new(), Vec::new(), Vec::new());
        for input in inputs {
            let left = count - keys.len();
            if left == 0 {
                break;
            }
            // An image file has no caption; anything else is a dataset.
            if Path::new(input).is_file() && !input.ends_with(".parquet") {
                let image = read_inputs(dvae, job, std::slice::from_ref(input), Some(1))?.remove(0);
                let s = i64::from(side);
                parts.push(from_bytes(&image.pixels, [1, 3, s, s], Device::Cpu));
                keys.push(image.key);
                captions.push(String::new());
                continue;
            }
            let location = Location::parse(input, &job.store)?;
            let set = read_dataset(job, &location, side, left)?;
            parts.push(set_tensor(&set));
            keys.extend(set.keys);
            captions.extend(set.captions);
        }
        let source = HeldOutSource::Inputs {
            inputs: inputs.to_vec(),
        };
        (source, keys, captions, parts)
    } else if job.data.validation.is_configured() {
        // The set training evaluates on (its first `count` samples).
        let mut wanted = job.clone();
        wanted.data.validation.max_samples = count;
        let data = job.data_location()?;
        let held = HeldOut::open(&wanted, &data, side, 1, (0, 1), &DataParallel::solo())?
            .context("data.validation is configured but opened no validation set")?;
        expect_images(&held.set, &held.url)?;
        let images = set_tensor(&held.set);
        let source = HeldOutSource::Validation { url: held.url };
        (source, held.set.keys, held.set.captions, vec![images])
    } else {
        let seed = job.synth.seed.wrapping_add(SYNTHETIC_SEED_OFFSET);
        let (images, labels) =
            scenes::render_excluding(seed, 0..count as u64, side, &job.synth.unseen_combos);
        let keys = (0..count)
            .map(|i| format!("synthetic-{seed}-{i:09}"))
            .collect();
        let captions = labels.iter().map(Attributes::caption).collect();
        (
            HeldOutSource::Synthetic { seed },
            keys,
            captions,
            vec![images],
        )
    };
    if keys.is_empty() {
        bail!("no held-out images could be read from {source:?}");
    }
    Ok(HeldOutSet {
        source,
        keys,
        captions,
        images: Tensor::cat(&parts, 0),
    })
}

/// The (colour, shape) pairs of the job's training captions: the caption
/// column only, held-out samples left out.
pub fn training_combos(job: &JobConfig) -> Result<BTreeSet<Combo>> {
    let location = job.data_location()?;
    let holdout = job.data.validation.holdout();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let units = runtime.block_on(parquet_source::plan_units(&location, &job.data.columns))?;
    let mut combos = BTreeSet::new();
    for unit in &units {
        for (key, caption) in runtime.block_on(parquet_source::read_captions(unit))? {
            if holdout.holds_out(&key) {
                continue;
            }
            if let Some(a) = caption.and_then(|c| parse_caption(&c).ok()) {
                combos.insert(combo_of(&a));
            }
        }
    }
    Ok(combos)
}

/// Images the probes learn from, with their attributes and where they
/// came from: up to `max` of the job's training images whose captions are
/// synthetic (none held out), or as many rendered scenes when the data
/// holds fewer than a few hundred.
pub fn probe_images(
    job: &JobConfig,
    side: u32,
    max: usize,
) -> Result<(Tensor, Vec<Attributes>, &'static str)> {
    let from_data = job
        .data_location()
        .map_err(anyhow::Error::from)
        .and_then(|location| read_dataset(job, &location, side, max));
    match from_data {
        Ok(set) => {
            let holdout = job.data.validation.holdout();
            let (index, labels): (Vec<i64>, Vec<Attributes>) = (0..set.len())
                .filter(|&i| !holdout.holds_out(&set.keys[i]))
                .filter_map(|i| parse_caption(&set.captions[i]).ok().map(|a| (i as i64, a)))
                .unzip();
            if labels.len() >= MIN_PROBE_IMAGES {
                let images = set_tensor(&set).index_select(0, &Tensor::from_slice(&index));
                return Ok((images, labels, "training data"));
            }
            tracing::warn!(
                data = %job.data_url(), synthetic = labels.len(),
                "too few training images with synthetic captions for the probes; rendering scenes"
            );
        }
        Err(e) => tracing::warn!(
            "cannot read the training data for the probes ({e:#}); rendering scenes instead"
        ),
    }
    let (images, labels) = scenes::render_excluding(
        job.synth.seed,
        0..max as u64,
        side,
        &job.synth.unseen_combos,
    );
    Ok((images, labels, "rendered scenes"))
}
