//! The probes' fixed first stage: no weights, the same for every image. It
//! finds the background and the shape and hands the network each in the
//! form it can learn from in a few hundred steps:
//!
//! - the background colour: the median of the border pixels, which a shape
//!   never covers (its centre keeps a radius from every edge);
//! - the silhouette: how far each pixel is from that colour, relative to
//!   the farthest pixel, so it no longer depends on which two colours were
//!   drawn, and shape kind is geometry alone;
//! - the shape colour: the mean colour of the silhouette's core;
//! - the extent: the silhouette's radius of gyration, as a fraction of the
//!   side, which does not change as a shape turns;
//! - the crop: the silhouette resampled around its centroid at a scale set
//!   by that radius, so every shape, small or large, fills a `CROP`×`CROP`
//!   window at about the same size wherever it was drawn.
//!
//! Without this, a small CNN has to learn each shape separately for every
//! pair of colours and every size and position, and does not within the
//! steps a CPU affords.

use tch::{Device, Kind, Tensor};

/// Side of the silhouette crop.
pub(crate) const CROP: i64 = 32;

/// Half the crop's side in radii of gyration. Every shape's farthest point
/// lies within 2 of them from its centroid (a disc's at √2, a triangle's,
/// the farthest, at 1.99): 2.5 keeps every shape whole, with a margin.
const CROP_RADII: f64 = 2.5;

/// Distances below this share of the farthest pixel's count as background,
/// those above 1 − this share as shape: absorbs noise in generated images
/// and keeps blended edges from blurring the core.
const SILHOUETTE_MARGIN: f64 = 0.25;

/// A flat image's farthest pixel is only noise: distances are measured
/// against at least this much, so its silhouette stays empty.
const MIN_CONTRAST: f64 = 0.1;

/// What the network sees of a batch of images.
pub(crate) struct Views {
    /// `(N, 3)` background colour.
    pub background: Tensor,
    /// `(N, 3)` shape colour.
    pub shape_colour: Tensor,
    /// `(N, 1)` radius of gyration over the side.
    pub extent: Tensor,
    /// `(N, 1, CROP, CROP)` silhouette around the shape, in [0, 1].
    pub crop: Tensor,
}

impl Views {
    /// # Shapes
    /// `(N, 3, H, W)` pixels in [0, 1] → [`Views`]
    pub fn of(x: &Tensor) -> Self {
        let [n, _, h, w] = x.size()[..] else {
            unreachable!("callers check the batch shape")
        };
        let border = Tensor::cat(
            &[
                x.select(2, 0),
                x.select(2, h - 1),
                x.select(3, 0),
                x.select(3, w - 1),
            ],
            2,
        ); // (N, 3, 2W + 2H)
        let background = border.median_dim(2, false).0; // (N, 3)
        let distance = (x - background.view([n, 3, 1, 1]))
            .abs()
            .amax(&[1i64][..], false); // (N, H, W)
        let farthest = distance.amax(&[1i64, 2][..], true).clamp_min(MIN_CONTRAST);
        let silhouette = ((distance / farthest - SILHOUETTE_MARGIN)
            / (1.0 - 2.0 * SILHOUETTE_MARGIN))
            .clamp(0.0, 1.0); // (N, H, W)

        let core = silhouette.ge(1.0).to_kind(Kind::Float).unsqueeze(1); // (N, 1, H, W)
        let core_pixels = core
            .sum_dim_intlist(&[2i64, 3][..], false, Kind::Float)
            .clamp_min(1.0);
        let shape_colour =
            (x * &core).sum_dim_intlist(&[2i64, 3][..], false, Kind::Float) / core_pixels;

        // Moments of the silhouette, in pixels from the top-left corner.
        let device = x.device();
        let xs = pixel_centres(w, device).view([1, 1, w]);
        let ys = pixel_centres(h, device).view([1, h, 1]);
        let dims = &[1i64, 2][..];
        let sum = |t: Tensor| t.sum_dim_intlist(dims, false, Kind::Float);
        let mass = sum(silhouette.shallow_clone()).clamp_min(1.0); // (N,)
        let cx = sum(&silhouette * &xs) / &mass;
        let cy = sum(&silhouette * &ys) / &mass;
        let spread = (xs - cx.view([n, 1, 1])).square() + (ys - cy.view([n, 1, 1])).square();
        let gyration = (sum(&silhouette * spread) / &mass).sqrt().clamp_min(1.0); // (N,)
        let extent = (&gyration / ((h * w) as f64).sqrt()).unsqueeze(1);

        // The affine map from crop coordinates to image coordinates, both
        // in [-1, 1] as grid_sample takes them.
        let half = &gyration * CROP_RADII;
        let zero = half.zeros_like();
        let theta = Tensor::stack(
            &[
                &half * (2.0 / w as f64),
                zero.shallow_clone(),
                &cx * (2.0 / w as f64) - 1.0,
                zero,
                &half * (2.0 / h as f64),
                &cy * (2.0 / h as f64) - 1.0,
            ],
            1,
        )
        .view([n, 2, 3]);
        let grid = Tensor::affine_grid_generator(&theta, [n, 1, CROP, CROP], false);
        // Bilinear, and zeros outside the image: outside is background.
        let crop = silhouette.unsqueeze(1).grid_sampler_2d(&grid, 0, 0, false);
        Self {
            background,
            shape_colour,
            extent,
            crop,
        }
    }

    /// Views on `device` of `(N, 3, H, W)` images on any device, `chunk`
    /// images at a time, so that only the views of a large set need to fit
    /// there.
    pub fn of_chunks(x: &Tensor, chunk: i64, device: Device) -> Self {
        let n = x.size()[0];
        let parts: Vec<Views> = (0..n)
            .step_by(chunk as usize)
            .map(|start| {
                let part = x.narrow(0, start, chunk.min(n - start));
                Self::of(&part.to_kind(Kind::Float).to_device(device))
            })
            .collect();
        let cat =
            |f: fn(&Views) -> &Tensor| Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), 0);
        Self {
            background: cat(|v| &v.background),
            shape_colour: cat(|v| &v.shape_colour),
            extent: cat(|v| &v.extent),
            crop: cat(|v| &v.crop),
        }
    }

    /// The views of the images at `index`.
    pub fn select(&self, index: &Tensor) -> Self {
        Self {
            background: self.background.index_select(0, index),
            shape_colour: self.shape_colour.index_select(0, index),
            extent: self.extent.index_select(0, index),
            crop: self.crop.index_select(0, index),
        }
    }
}

/// Coordinates of pixel centres along a side of `len` pixels.
fn pixel_centres(len: i64, device: Device) -> Tensor {
    Tensor::arange(len, (Kind::Float, device)) + 0.5
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenes;
    use dalle_data::synth::{BACKGROUNDS, COLORS, SIZES, Scene};

    #[test]
    fn views_find_the_scene_and_centre_the_shape() {
        let (x, labels) = scenes::render(21, 0..32, 64);
        let v = Views::of(&x);
        assert_eq!(v.crop.size(), [32, 1, CROP, CROP]);
        for (i, label) in labels.iter().enumerate() {
            let i = i as i64;
            for c in 0..3 {
                let bg = f64::from(BACKGROUNDS[label.background].1[c as usize]) / 255.0;
                let fg = f64::from(COLORS[label.colour].1[c as usize]) / 255.0;
                assert!((v.background.double_value(&[i, c]) - bg).abs() < 1e-6);
                // The core takes in edge pixels of ≥ 3/4 cover.
                assert!((v.shape_colour.double_value(&[i, c]) - fg).abs() < 0.1);
            }
            // The shape's centre lands in the crop's centre.
            let crop = v.crop.get(i).get(0);
            let mass = crop.sum(Kind::Float).double_value(&[]);
            let centres = pixel_centres(CROP, Device::Cpu);
            let cx = (&crop * centres.view([1, CROP]))
                .sum(Kind::Float)
                .double_value(&[])
                / mass;
            let cy = (&crop * centres.view([CROP, 1]))
                .sum(Kind::Float)
                .double_value(&[])
                / mass;
            let mid = CROP as f64 / 2.0;
            assert!(
                (cx - mid).abs() < 1.5 && (cy - mid).abs() < 1.5,
                "{i}: ({cx}, {cy})"
            );
        }
    }

    #[test]
    fn extent_follows_the_size_not_the_turn() {
        let square = |size, angle| {
            let scene = Scene {
                shape: "square",
                color: 0,
                background: 2,
                size,
                center: (0.5, 0.5),
                angle,
            };
            let x = scenes::images_to_tensor(&[scene.render(64)]);
            Views::of(&x).extent.double_value(&[0, 0])
        };
        for (size, &(_, radius)) in SIZES.iter().enumerate() {
            let (a, b) = (square(size, 0.0), square(size, 0.7));
            // Pixels quantise the edges differently at each angle, most for
            // small shapes; sizes are 40 % and more apart.
            assert!((a - b).abs() < 0.05 * a, "size {size}: {a} vs {b}");
            // A square of half-side 0.75 r: gyration radius √(2/3)·0.75 r.
            let expected = (2.0f64 / 3.0).sqrt() * 0.75 * radius;
            assert!(
                (a - expected).abs() < 0.05 * expected,
                "size {size}: {a} vs {expected}"
            );
        }
    }

    #[test]
    fn a_flat_image_has_an_empty_silhouette() {
        // Flat grey with a faint ripple, as a generator might leave it: no
        // pixel is more than 0.02 from the background, a fifth of the
        // least contrast measured against, under the silhouette's margin.
        let ripple = (Tensor::arange(3 * 32 * 32, (Kind::Float, Device::Cpu)) * 0.7).sin();
        let x = ripple.view([1, 3, 32, 32]) * 0.01 + 0.4;
        let v = Views::of(&x);
        assert_eq!(v.crop.max().double_value(&[]), 0.0);
    }
}
