//! Reconstruction quality of a trained dVAE: encode → decode images and
//! compare with two baselines: the best any model that ignores its input
//! can do (the mean image of the set), and each image replaced by its own
//! mean colour (three numbers of information per image).

use crate::Result;
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
}

/// Reconstructs the `(N, 3, S, S)` image batches of `batches` until
/// `count` images are done.
pub fn reconstruct(
    model: &Dvae,
    batches: impl Iterator<Item = Result<Tensor>>,
    count: usize,
) -> Result<ReconReport> {
    let (mut originals, mut recons) = (Vec::new(), Vec::new());
    let mut done = 0;
    for batch in batches {
        let x = batch?.to_device(tch::Device::Cpu);
        let take = (count - done).min(x.size()[0] as usize) as i64;
        let x = x.narrow(0, 0, take);
        recons.push(model.reconstruct(&x)?.to_device(tch::Device::Cpu));
        originals.push(x);
        done += take as usize;
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
    let mean_colour = originals
        .mean_dim(&[2i64, 3][..], true, Kind::Float)
        .expand_as(&originals);
    let mean_image = originals
        .mean_dim(&[0i64][..], true, Kind::Float)
        .expand_as(&originals);
    Ok(ReconReport {
        blind_psnr: psnr(mse(&mean_image)),
        images: done,
        psnr: psnr(mse(&reconstructions)),
        baseline_psnr: psnr(mse(&mean_colour)),
        originals,
        reconstructions,
    })
}
