//! Held-out evaluation during training: the stage's validation set (this
//! rank's slice, read and decoded once, kept in memory), when an evaluation
//! is due, and what each stage measures on it.
//!
//! The set is `data.validation`'s: the samples the key-hash split holds out
//! of the stage's own training data, or a dataset of its own (see
//! `dalle_data::validation`). Every rank evaluates its slice; sums travel
//! through the collective and the figures are means over every rank's
//! samples, so they do not depend on the world size. Nothing here draws
//! random numbers (no Gumbel noise, no dropout), so evaluating changes no
//! training step: a run with evaluations trains exactly as one without.

use crate::config::JobConfig;
use crate::ddp::DataParallel;
use crate::feed::batch_tensor;
use crate::gpt::{CaptionEncoder, ImageTokens};
use crate::{Result, TrainError};
use dalle_data::columns::Payload;
use dalle_data::image_ops::{Crop, Preprocess};
use dalle_data::validation::{self, Selection, ValidationRead, ValidationSet};
use dalle_model::dvae::{Dvae, ReconLoss, loss};
use dalle_model::gpt::Gpt;
use dalle_store::Location;
use serde::Serialize;
use std::fmt;
use tch::{Kind, Tensor};

/// A stage's validation set and its evaluation schedule.
pub struct HeldOut {
    pub set: ValidationSet,
    /// Where it was read from (for logs).
    pub url: String,
    every: u64,
    steps: u64,
}

impl HeldOut {
    /// This rank's slice of the validation set of a stage that trains on
    /// `data` for `steps` steps and evaluates every `every`; `None` when
    /// there is nothing to evaluate (no `data.validation`, `every` = 0, or
    /// no step left to train). Images are decoded at `image_size`, centre
    /// cropped, whatever `data.crop` says: the set stays the same.
    pub fn open(
        job: &JobConfig,
        data: &Location,
        image_size: u32,
        every: u64,
        (first_step, steps): (u64, u64),
        ddp: &DataParallel,
    ) -> Result<Option<Self>> {
        let config = &job.data.validation;
        if !config.is_configured() || every == 0 || first_step >= steps {
            return Ok(None);
        }
        let own = job.validation_location()?;
        let (location, selection) = match &own {
            Some(location) => (location, Selection::All),
            None => (data, Selection::HeldOut(config.holdout())),
        };
        let request = ValidationRead {
            selection,
            max_samples: config.max_samples,
            slice: (ddp.rank(), ddp.world_size()),
            preprocess: Preprocess {
                size: image_size,
                max_pixels: job.data.max_pixels,
                crop: Crop::Center,
            },
            columns: job.data.columns.clone(),
            decode_threads: job.data.decode_threads.resolve(),
        };
        let set = validation::read(location, &request)?;
        tracing::info!(
            data = %location.url, samples = set.total, this_rank = set.len(),
            skipped = set.skipped.skipped(), every,
            "validation set read"
        );
        Ok(Some(Self {
            set,
            url: location.url.clone(),
            every,
            steps,
        }))
    }

    /// Refuses a set of token grids where a stage evaluates images (a
    /// `data.validation.url` of pre-tokenized data, for the dVAE or the
    /// reranker).
    pub fn expect_images(&self) -> Result<()> {
        match self.set.payload {
            Payload::EncodedImage => Ok(()),
            other => Err(TrainError::Config(format!(
                "the validation set at {} holds {other}; this stage evaluates on images",
                self.url
            ))),
        }
    }

    /// Whether to evaluate after `done` steps: every `every` steps and
    /// after the last.
    pub fn due(&self, done: u64) -> bool {
        done.is_multiple_of(self.every) || done == self.steps
    }

    /// Consecutive ranges of at most `chunk` samples of this rank's slice.
    pub fn chunks(&self, chunk: usize) -> impl Iterator<Item = std::ops::Range<usize>> + use<> {
        let n = self.set.len();
        let chunk = chunk.max(1);
        (0..n).step_by(chunk).map(move |i| i..(i + chunk).min(n))
    }
}

/// Marks a metrics-file line as held-out figures, apart from the training
/// lines beside it.
const KIND: &str = "validation";

/// The dVAE on its validation set, through the hard path stage 2 sees:
/// argmax tokens, decoded (no Gumbel noise).
#[derive(Clone, Debug, Serialize)]
pub struct DvaeValidation {
    /// Always "validation".
    pub kind: &'static str,
    /// Steps finished when evaluated.
    pub step: u64,
    /// Held-out images evaluated, over every rank.
    pub val_samples: usize,
    /// The configured reconstruction loss of the hard path, nats per image
    /// dimension.
    pub val_recon: f64,
    /// MSE of the decoded images on [0, 1] pixels.
    pub val_mse: f64,
    /// PSNR (dB) of the decoded images.
    pub val_psnr: f64,
    /// Distinct codes over the whole set.
    pub val_codes_used: i64,
    /// Perplexity of the code histogram of the whole set.
    pub val_code_perplexity: f64,
}

impl fmt::Display for DvaeValidation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "step {} | validation | recon {:.4}",
            self.step, self.val_recon
        )?;
        write!(
            f,
            " | mse {:.5} | psnr {:.2} dB | codes {} ppl {:.1} | {} images",
            self.val_mse,
            self.val_psnr,
            self.val_codes_used,
            self.val_code_perplexity,
            self.val_samples
        )
    }
}

/// Evaluates `model` on the held-out images after `step` steps, `batch`
/// images at a time.
pub fn evaluate_dvae(
    model: &Dvae,
    held: &HeldOut,
    recon: ReconLoss,
    batch: usize,
    ddp: &mut DataParallel,
    step: u64,
) -> Result<DvaeValidation> {
    let vocab = model.config().vocab_size;
    let device = model.device();
    let n = held.set.len();
    let (mut sums, mut counts) = ([0.0; 2], Tensor::zeros([vocab], (Kind::Int64, device)));
    for range in held.chunks(batch) {
        let x = batch_tensor(&held.set.batch(range.clone()), device);
        let out = model.hard_reconstruction(&x, recon)?;
        for (sum, value) in sums.iter_mut().zip([&out.mse, &out.recon]) {
            *sum += value.double_value(&[]) * range.len() as f64;
        }
        counts += out.tokens.flatten(0, -1).bincount(None::<Tensor>, vocab);
    }
    let local_means = sums.map(|sum| if n == 0 { 0.0 } else { sum / n as f64 });
    let (means, samples) = ddp.global_means(&local_means, n)?;
    let mut histogram =
        Vec::<f32>::try_from(counts.to_kind(Kind::Float).to_device(tch::Device::Cpu))?;
    ddp.sum(&mut histogram)?;
    // Not the training steps' communication: keep it out of their share.
    ddp.take_comm_time();
    let (codes_used, code_perplexity) = loss::histogram_usage(&Tensor::from_slice(&histogram));
    let mse = means[0];
    if !mse.is_finite() {
        return Err(TrainError::Diverged { step, loss: mse });
    }
    Ok(DvaeValidation {
        kind: KIND,
        step,
        val_samples: samples,
        val_recon: means[1],
        val_mse: mse,
        val_psnr: loss::psnr(mse),
        val_codes_used: codes_used,
        val_code_perplexity: code_perplexity,
    })
}

/// The transformer on its validation set: each kind's cross-entropy per
/// token, with captions as they are (no caption dropout) and dropout off.
#[derive(Clone, Debug, Serialize)]
pub struct GptValidation {
    /// Always "validation".
    pub kind: &'static str,
    /// Steps finished when evaluated.
    pub step: u64,
    /// Held-out samples evaluated, over every rank.
    pub val_samples: usize,
    /// The training objective's weighting of the two.
    pub val_loss: f64,
    /// Nats per caption position.
    pub val_text_loss: f64,
    /// Nats per image token.
    pub val_image_loss: f64,
    /// Bits per caption position.
    pub val_text_bits: f64,
    /// Bits per image token.
    pub val_image_bits: f64,
}

impl GptValidation {
    /// From means over every rank's `samples` samples, in nats.
    pub fn new(step: u64, samples: usize, text: f64, image: f64, text_weight: f64) -> Self {
        let bits = |nats: f64| nats / std::f64::consts::LN_2;
        Self {
            kind: KIND,
            step,
            val_samples: samples,
            val_loss: text * text_weight + image * (1.0 - text_weight),
            val_text_loss: text,
            val_image_loss: image,
            val_text_bits: bits(text),
            val_image_bits: bits(image),
        }
    }
}

impl fmt::Display for GptValidation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "step {} | validation | loss {:.4} | text {:.4} nats ({:.3} bits) | image {:.4} nats \
             ({:.3} bits) per token | {} samples",
            self.step,
            self.val_loss,
            self.val_text_loss,
            self.val_text_bits,
            self.val_image_loss,
            self.val_image_bits,
            self.val_samples
        )
    }
}

/// The transformer's validation set as model inputs, encoded once (the
/// captions by BPE without dropout, images by the frozen dVAE where the set
/// holds images): `(caption ids (n, T), image tokens (n, L))` per chunk of
/// at most `chunk` samples, on the training device.
pub struct GptHeldOut {
    pub held: HeldOut,
    chunks: Vec<(Tensor, Tensor)>,
}

impl GptHeldOut {
    pub fn encode(
        held: HeldOut,
        captions: &mut CaptionEncoder,
        images: &ImageTokens,
        chunk: usize,
        device: tch::Device,
    ) -> Result<Self> {
        let chunks = held
            .chunks(chunk)
            .map(|range| {
                let batch = held.set.batch(range);
                let (text, _) = captions.encode(&batch, 0)?;
                Ok((text.to_device(device), images.of(&batch, device)?))
            })
            .collect::<Result<_>>()?;
        Ok(Self { held, chunks })
    }
}

/// Evaluates `model` on the held-out samples after `step` steps, with
/// dropout off; `text_weight` weighs `val_loss` as training does.
pub fn evaluate_gpt(
    model: &Gpt,
    set: &GptHeldOut,
    text_weight: f64,
    ddp: &mut DataParallel,
    step: u64,
) -> Result<GptValidation> {
    let n = set.held.set.len();
    let (mut text_sum, mut image_sum) = (0.0, 0.0);
    tch::no_grad(|| -> Result<()> {
        for (text, image) in &set.chunks {
            let m = text.size()[0] as f64;
            let loss = model.loss(text, image, text_weight, false)?;
            text_sum += loss.text.double_value(&[]) * m;
            image_sum += loss.image.double_value(&[]) * m;
        }
        Ok(())
    })?;
    let local = if n == 0 {
        [0.0, 0.0]
    } else {
        [text_sum / n as f64, image_sum / n as f64]
    };
    let (means, samples) = ddp.global_means(&local, n)?;
    ddp.take_comm_time();
    if let Some(&bad) = means.iter().find(|v| !v.is_finite()) {
        return Err(TrainError::Diverged { step, loss: bad });
    }
    Ok(GptValidation::new(
        step,
        samples,
        means[0],
        means[1],
        text_weight,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(counts: &[f32]) -> (i64, f64) {
        loss::histogram_usage(&Tensor::from_slice(counts))
    }

    #[test]
    fn code_usage_of_a_histogram() {
        assert_eq!(usage(&[0.0, 0.0]), (0, 0.0));
        let (used, ppl) = usage(&[5.0, 0.0, 5.0, 0.0]);
        assert_eq!(used, 2);
        assert!((ppl - 2.0).abs() < 1e-9);
        let (used, ppl) = usage(&[9.0, 1.0]);
        assert!(used == 2 && ppl > 1.0 && ppl < 2.0);
    }

    #[test]
    fn lines_say_they_are_validation_in_nats_and_bits() {
        let line = GptValidation::new(40, 64, 2.0, std::f64::consts::LN_2 * 3.0, 0.25);
        assert!((line.val_image_bits - 3.0).abs() < 1e-12);
        assert!((line.val_loss - (0.5 + 0.75 * line.val_image_loss)).abs() < 1e-12);
        let json = serde_json::to_value(&line).unwrap();
        assert_eq!(json["kind"], "validation");
        assert_eq!(json["step"], 40);
        let text = line.to_string();
        assert!(
            text.starts_with("step 40 | validation |") && text.contains("bits"),
            "{text}"
        );
        let dvae = DvaeValidation {
            kind: KIND,
            step: 8,
            val_samples: 10,
            val_recon: -1.5,
            val_mse: 0.01,
            val_psnr: 20.0,
            val_codes_used: 3,
            val_code_perplexity: 2.5,
        };
        let json = serde_json::to_value(&dvae).unwrap();
        assert!(json["val_recon"] == -1.5 && json["val_psnr"] == 20.0);
        assert!(dvae.to_string().contains("psnr 20.00 dB | codes 3 ppl 2.5"));
    }
}
