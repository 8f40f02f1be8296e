//! Reconstruction quality of a trained dVAE: encode → decode images and
//! compare with two baselines: the best any model that ignores its input
//! can do (the mean image of the set), and each image replaced by its own
//! mean colour (three numbers of information per image). The baselines are
//! `dalle_eval`'s, which `dalle eval` reports next to SSIM and per-colour
//! errors; this is the quick figure of `dalle dvae reconstruct` and tests.

use crate::Result;
use dalle_eval::image_metrics::{dataset_mean_baseline, mean_colour_baseline};
use dalle_model::dvae::{Dvae, loss::psnr};
use tch::{Kind, Tensor};

pub struct ReconReport {
    pub images: usize,
    /// PSNR (dB) of the reconstructions.
    pub psnr: f64,
    /// PSNR (dB) of the mean-colour baseline.
    pub baseline_psnr: f64,
    /// PSNR (dB) of the input-blind baseline: the set's mean image.
    pub blind_psnr: f64,
    /// `(N, 3, S, S)` originals and reconstructions, on the CPU.
    pub originals: Tensor,
    pub reconstructions: Tensor,
    /// `(N, S/8, S/8)` the argmax tokens the reconstructions decode, on the
    /// CPU.
    pub tokens: Tensor,
}

/// Reconstructs the `(N, 3, S, S)` image batches of `batches` until
/// `count` images are done, calling `on_batch` with the images done so far.
pub fn reconstruct_with_progress(
    model: &Dvae,
    batches: impl Iterator<Item = Result<Tensor>>,
    count: usize,
    mut on_batch: impl FnMut(usize),
) -> Result<ReconReport> {
    let (mut originals, mut recons, mut tokens) = (Vec::new(), Vec::new(), Vec::new());
    let mut done = 0;
    for batch in batches {
        let x = batch?.to_device(tch::Device::Cpu);
        let take = (count - done).min(x.size()[0] as usize) as i64;
        let x = x.narrow(0, 0, take);
        let codes = model.encode(&x)?;
        recons.push(model.decode(&codes)?.to_device(tch::Device::Cpu));
        tokens.push(codes.to_device(tch::Device::Cpu));
        originals.push(x);
        done += take as usize;
        on_batch(done);
        if done >= count {
            break;
        }
    }
    let originals = Tensor::cat(&originals, 0);
    let reconstructions = Tensor::cat(&recons, 0);
    let mse = |a: &Tensor| {
        (a - &originals)
            .square()
            .mean(Kind::Float)
            .double_value(&[])
    };
    Ok(ReconReport {
        blind_psnr: psnr(mse(&dataset_mean_baseline(&originals))),
        images: done,
        psnr: psnr(mse(&reconstructions)),
        baseline_psnr: psnr(mse(&mean_colour_baseline(&originals))),
        originals,
        reconstructions,
        tokens: Tensor::cat(&tokens, 0),
    })
}

/// [`reconstruct_with_progress`] without progress.
pub fn reconstruct(
    model: &Dvae,
    batches: impl Iterator<Item = Result<Tensor>>,
    count: usize,
) -> Result<ReconReport> {
    reconstruct_with_progress(model, batches, count, |_| {})
}
