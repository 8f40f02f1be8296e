//! How close reconstructions come to their originals, on `(N, 3, H, W)`
//! float batches in [0, 1]: PSNR, SSIM, and two baselines a model must beat
//! to have learnt anything: each image painted its own mean colour (three
//! numbers per image), and every image replaced by the batch's mean image
//! (the best any model that ignores its input can do under MSE).

use crate::colour_error::{self, ColourErrors};
use crate::{EvalError, Result};
use serde::Serialize;
use tch::{Kind, Tensor};

/// Peak signal-to-noise ratio in dB of a mean squared error on [0, 1]
/// pixels (the one the dVAE's training metrics use).
pub use dalle_model::dvae::loss::psnr;

/// Side of SSIM's Gaussian window and its standard deviation (Wang et al.
/// 2004), and the stabilising constants for a dynamic range of 1.
const SSIM_WINDOW: i64 = 11;
const SSIM_SIGMA: f64 = 1.5;
const SSIM_C1: f64 = 0.01 * 0.01;
const SSIM_C2: f64 = 0.03 * 0.03;

/// Images per SSIM chunk: bounds the memory of its five filtered copies.
const SSIM_CHUNK: i64 = 256;

/// Checks that `t` is a non-empty `(N, C, H, W)` batch and returns its size.
pub(crate) fn batch_size(what: &'static str, t: &Tensor) -> Result<[i64; 4]> {
    match t.size()[..] {
        [n, c, h, w] if n > 0 && c > 0 => Ok([n, c, h, w]),
        _ => Err(EvalError::Input {
            what,
            expected: "a non-empty (N, C, H, W) batch".into(),
            found: format!("{:?}", t.size()),
        }),
    }
}

/// Checks that two batches have one shape and returns it.
pub(crate) fn same_size(a: &Tensor, b: &Tensor) -> Result<[i64; 4]> {
    let size = batch_size("originals", a)?;
    if b.size() != size {
        return Err(EvalError::Input {
            what: "reconstructions",
            expected: format!("the originals' shape {size:?}"),
            found: format!("{:?}", b.size()),
        });
    }
    Ok(size)
}

/// Mean squared error between two batches of one shape.
pub fn mse(a: &Tensor, b: &Tensor) -> Result<f64> {
    same_size(a, b)?;
    Ok((a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .square()
        .mean(Kind::Double)
        .double_value(&[]))
}

/// Each image painted its own per-channel mean colour.
pub fn mean_colour_baseline(images: &Tensor) -> Tensor {
    images
        .mean_dim(&[2i64, 3][..], true, Kind::Float)
        .expand_as(images)
        .contiguous()
}

/// Every image replaced by the batch's mean image.
pub fn dataset_mean_baseline(images: &Tensor) -> Tensor {
    images
        .mean_dim(&[0i64][..], true, Kind::Float)
        .expand_as(images)
        .contiguous()
}

/// The normalised 2-D Gaussian window, one copy per channel, as a
/// depthwise convolution weight `(C, 1, 11, 11)`.
fn gaussian_window(channels: i64, like: &Tensor) -> Tensor {
    let half = (SSIM_WINDOW / 2) as f64;
    let g: Vec<f64> = (0..SSIM_WINDOW)
        .map(|i| (-((i as f64 - half).powi(2)) / (2.0 * SSIM_SIGMA * SSIM_SIGMA)).exp())
        .collect();
    let total: f64 = g.iter().sum();
    let g = Tensor::from_slice(&g).to_device(like.device()) / total; // (11,)
    let window = g.unsqueeze(1).matmul(&g.unsqueeze(0)); // (11, 11), outer product
    window
        .view([1, 1, SSIM_WINDOW, SSIM_WINDOW])
        .repeat([channels, 1, 1, 1])
}

/// Mean structural similarity of two batches: the 11×11 Gaussian window
/// (σ = 1.5) slid over each channel separately, over the 'valid' region
/// only (no padding invents pixels), averaged over positions, channels and
/// images. 1 means identical.
pub fn ssim(a: &Tensor, b: &Tensor) -> Result<f64> {
    let [n, c, h, w] = same_size(a, b)?;
    if h < SSIM_WINDOW || w < SSIM_WINDOW {
        return Err(EvalError::Input {
            what: "images for SSIM",
            expected: format!("at least {SSIM_WINDOW}×{SSIM_WINDOW} pixels"),
            found: format!("{h}×{w}"),
        });
    }
    // Double precision: σ² is a small difference of two large filtered
    // values, and float32 cancellation would show on flat images.
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    let window = gaussian_window(c, &a);
    let filter = |x: &Tensor| x.conv2d(&window, None::<Tensor>, [1, 1], [0, 0], [1, 1], c);
    let mut total = 0.0;
    for start in (0..n).step_by(SSIM_CHUNK as usize) {
        let len = SSIM_CHUNK.min(n - start);
        let (x, y) = (a.narrow(0, start, len), b.narrow(0, start, len));
        let (mu_x, mu_y) = (filter(&x), filter(&y)); // (n, C, H-10, W-10)
        let var_x = filter(&x.square()) - mu_x.square();
        let var_y = filter(&y.square()) - mu_y.square();
        let cov = filter(&(&x * &y)) - &mu_x * &mu_y;
        let numerator = (&mu_x * &mu_y * 2.0 + SSIM_C1) * (cov * 2.0 + SSIM_C2);
        let denominator = (mu_x.square() + mu_y.square() + SSIM_C1) * (var_x + var_y + SSIM_C2);
        // Every chunk's map has the same size per image, so a count-weighted
        // mean of chunk means is the mean over the whole batch.
        total += (numerator / denominator)
            .mean(Kind::Double)
            .double_value(&[])
            * len as f64;
    }
    Ok(total / n as f64)
}

/// PSNR (dB) and SSIM of one set of images against the originals.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Scores {
    pub psnr: f64,
    pub ssim: f64,
}

impl Scores {
    pub fn of(originals: &Tensor, images: &Tensor) -> Result<Self> {
        Ok(Self {
            psnr: psnr(mse(originals, images)?),
            ssim: ssim(originals, images)?,
        })
    }
}

/// Reconstruction quality next to both baselines, with the per-colour
/// errors of the images whose captions are synthetic.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReconReport {
    pub images: usize,
    pub reconstruction: Scores,
    /// Each image painted its own mean colour.
    pub mean_colour_baseline: Scores,
    /// Every image replaced by the batch's mean image.
    pub dataset_mean_baseline: Scores,
    /// Per-colour errors; absent when no caption is synthetic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub colours: Option<ColourErrors>,
}

impl ReconReport {
    /// Compares `(N, 3, H, W)` reconstructions with their originals;
    /// `captions[i]` is image i's caption.
    pub fn compute(
        originals: &Tensor,
        reconstructions: &Tensor,
        captions: &[impl AsRef<str>],
    ) -> Result<Self> {
        let [n, ..] = same_size(originals, reconstructions)?;
        Ok(Self {
            images: n as usize,
            reconstruction: Scores::of(originals, reconstructions)?,
            mean_colour_baseline: Scores::of(originals, &mean_colour_baseline(originals))?,
            dataset_mean_baseline: Scores::of(originals, &dataset_mean_baseline(originals))?,
            colours: Some(colour_error::colour_errors(
                originals,
                reconstructions,
                captions,
            )?)
            .filter(|c| c.images > 0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenes;
    use tch::Device;

    /// `x` plus uniform noise in ±`amplitude`, clamped to [0, 1]; drawn
    /// from a seeded stream so that tests running side by side (and
    /// sharing libtorch's generator) still see the same noise.
    fn noisy(x: &Tensor, amplitude: f64, seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let noise: Vec<f32> = (0..x.numel())
            .map(|_| rng.random_range(-amplitude..amplitude) as f32)
            .collect();
        (x + Tensor::from_slice(&noise).view(x.size().as_slice())).clamp(0.0, 1.0)
    }

    /// SSIM by direct summation over each window, written independently of
    /// the convolution path: one image pair, one channel at a time.
    fn ssim_by_hand(a: &[Vec<Vec<f64>>], b: &[Vec<Vec<f64>>]) -> f64 {
        let k = SSIM_WINDOW as usize;
        let g: Vec<f64> = (0..k)
            .map(|i| (-((i as f64 - 5.0).powi(2)) / 4.5).exp())
            .collect();
        let norm: f64 = g.iter().sum::<f64>().powi(2);
        let (h, w) = (a[0].len(), a[0][0].len());
        let (mut total, mut count) = (0.0, 0.0);
        for c in 0..a.len() {
            for y in 0..=h - k {
                for x in 0..=w - k {
                    let (mut mx, mut my, mut sxx, mut syy, mut sxy) = (0.0, 0.0, 0.0, 0.0, 0.0);
                    for i in 0..k {
                        for j in 0..k {
                            let wt = g[i] * g[j] / norm;
                            let (p, q) = (a[c][y + i][x + j], b[c][y + i][x + j]);
                            mx += wt * p;
                            my += wt * q;
                            sxx += wt * p * p;
                            syy += wt * q * q;
                            sxy += wt * p * q;
                        }
                    }
                    let (vx, vy, cxy) = (sxx - mx * mx, syy - my * my, sxy - mx * my);
                    total += ((2.0 * mx * my + SSIM_C1) * (2.0 * cxy + SSIM_C2))
                        / ((mx * mx + my * my + SSIM_C1) * (vx + vy + SSIM_C2));
                    count += 1.0;
                }
            }
        }
        total / count
    }

    fn to_nested(t: &Tensor) -> Vec<Vec<Vec<f64>>> {
        let [c, h, w] = t.size()[..] else { panic!() };
        (0..c)
            .map(|c| {
                (0..h)
                    .map(|y| (0..w).map(|x| t.double_value(&[c, y, x])).collect())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn ssim_of_an_image_with_itself_is_one() {
        let (x, _) = scenes::render(1, 0..4, 32);
        assert!((ssim(&x, &x).unwrap() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn ssim_falls_as_noise_grows_and_is_symmetric() {
        let (x, _) = scenes::render(2, 0..4, 32);
        let scores: Vec<f64> = [0.05, 0.1, 0.2, 0.5]
            .iter()
            .map(|&s| ssim(&x, &noisy(&x, s, 0)).unwrap())
            .collect();
        assert!(scores.windows(2).all(|p| p[0] > p[1]), "{scores:?}");
        assert!(scores[0] < 1.0 && scores[3] < 0.5, "{scores:?}");
        let y = noisy(&x, 0.1, 1);
        assert!((ssim(&x, &y).unwrap() - ssim(&y, &x).unwrap()).abs() < 1e-12);
    }

    #[test]
    fn ssim_of_two_flat_images_matches_the_formula() {
        // Flat images have no variance or covariance, so SSIM is the
        // luminance term alone: (2·0.2·0.6 + C1) / (0.2² + 0.6² + C1)
        // = 0.2401 / 0.4001.
        let opts = (Kind::Float, Device::Cpu);
        let a = Tensor::full([2, 3, 16, 16], 0.2, opts);
        let b = Tensor::full([2, 3, 16, 16], 0.6, opts);
        assert!((ssim(&a, &b).unwrap() - 0.600_099_975_006_248_5).abs() < 1e-6);
    }

    #[test]
    fn ssim_matches_direct_summation() {
        let (x, _) = scenes::render(4, 0..1, 16);
        let y = noisy(&x, 0.2, 2);
        let by_hand = ssim_by_hand(&to_nested(&x.get(0)), &to_nested(&y.get(0)));
        let fast = ssim(&x, &y).unwrap();
        assert!((fast - by_hand).abs() < 1e-9, "{fast} vs {by_hand}");
    }

    #[test]
    fn ssim_refuses_small_or_mismatched_images() {
        let opts = (Kind::Float, Device::Cpu);
        let small = Tensor::zeros([1, 3, 10, 10], opts);
        assert!(
            ssim(&small, &small)
                .unwrap_err()
                .to_string()
                .contains("10×10")
        );
        let big = Tensor::zeros([1, 3, 16, 16], opts);
        let other = Tensor::zeros([2, 3, 16, 16], opts);
        assert!(
            ssim(&big, &other)
                .unwrap_err()
                .to_string()
                .contains("[2, 3, 16, 16]")
        );
    }

    #[test]
    fn baselines_keep_what_they_promise() {
        let (x, _) = scenes::render(5, 0..6, 32);
        let colour = mean_colour_baseline(&x);
        let blind = dataset_mean_baseline(&x);
        assert_eq!(colour.size(), x.size());
        assert_eq!(blind.size(), x.size());
        // Per image and channel, the baseline is flat at that image's mean.
        let means = x.mean_dim(&[2i64, 3][..], true, Kind::Float);
        assert!(f64::try_from((&colour - &means).abs().max()).unwrap() < 1e-6);
        // The blind baseline is one image for all, the batch mean.
        let first = blind.get(0);
        for i in 1..6 {
            assert!(blind.get(i).allclose(&first, 0.0, 0.0, false));
        }
        assert!(first.allclose(
            &x.mean_dim(&[0i64][..], false, Kind::Float),
            1e-6,
            1e-6,
            false
        ));
        // Its own mean colour is the best flat image under MSE: moving it
        // away in any channel costs.
        let base = mse(&x, &colour).unwrap();
        for shift in [-0.05, 0.05] {
            assert!(mse(&x, &(&colour + shift)).unwrap() > base);
        }
    }

    #[test]
    fn report_puts_a_good_reconstruction_above_both_baselines() {
        let (x, labels) = scenes::render(6, 0..16, 32);
        let captions: Vec<String> = labels.iter().map(|l| l.caption()).collect();
        let good = noisy(&x, 0.02, 3);
        let report = ReconReport::compute(&x, &good, &captions).unwrap();
        assert_eq!(report.images, 16);
        assert_eq!(report.colours.as_ref().unwrap().images, 16);
        let (r, c, d) = (
            report.reconstruction,
            report.mean_colour_baseline,
            report.dataset_mean_baseline,
        );
        assert!(r.psnr > c.psnr && r.psnr > d.psnr, "{report:?}");
        assert!(r.ssim > c.ssim && r.ssim > d.ssim, "{report:?}");
        // Uniform noise in ±0.02 (clamped) has an MSE of at most 0.02²/3: ≥ 38.7 dB.
        assert!(r.psnr > 38.7, "{report:?}");
        let json = serde_json::to_value(&report).unwrap();
        assert!(json["mean_colour_baseline"]["ssim"].is_number());
        assert!(json["colours"]["rows"].is_array());
        // Without synthetic captions there is no colour table at all.
        let photos = vec!["a photo"; 16];
        let report = ReconReport::compute(&x, &good, &photos).unwrap();
        assert!(report.colours.is_none());
        assert!(
            serde_json::to_value(&report)
                .unwrap()
                .get("colours")
                .is_none()
        );
    }
}
