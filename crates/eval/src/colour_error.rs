//! Where a reconstruction goes wrong, by colour: for synthetic images, the
//! mean absolute RGB error (0–255) of the background pixels and of the
//! shape pixels, per named colour of the palette. A dVAE that renders
//! flat areas well but loses one hue, or smears shapes into their
//! backgrounds, shows here while its PSNR looks fine.
//!
//! A pixel belongs to the background (or the shape) when the original
//! shows the palette colour the caption names for it, within
//! [`PALETTE_TOLERANCE`]. Edge pixels, blends of the two, match neither and
//! are left out, as are images whose captions are not synthetic.

use crate::caption::parse_caption;
use crate::image_metrics::same_size;
use crate::{EvalError, Result};
use dalle_data::synth::{BACKGROUNDS, COLORS};
use serde::Serialize;
use tch::{Kind, Tensor};

/// Per-channel distance (on [0, 1]) within which a pixel counts as a
/// palette colour. Rendering writes palette colours exactly, and an edge
/// pixel covers the shape by a multiple of 1/4, so it is at least a quarter
/// of the gap between two palette colours (≥ 25/255) from either: this
/// only absorbs noise from re-encoding the images.
pub const PALETTE_TOLERANCE: f64 = 6.0 / 255.0;

/// The error over one class of pixels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct PixelError {
    pub pixels: u64,
    /// Mean over those pixels and the three channels of |original −
    /// reconstruction|, on the 0–255 scale; `None` when no pixel counted.
    pub mean_abs_error: Option<f64>,
}

/// The errors of one palette colour, as background and as shape.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ColourRow {
    pub colour: &'static str,
    pub background: PixelError,
    /// Always empty for colours only backgrounds take (black, gray).
    pub shape: PixelError,
}

/// One row per palette colour, in the palette's order.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ColourErrors {
    /// Images that counted.
    pub images: usize,
    /// Images left out because their captions are not synthetic.
    pub skipped: usize,
    pub rows: Vec<ColourRow>,
}

/// Sums of error and counts of pixels, per palette colour.
#[derive(Clone, Copy, Default)]
struct Sums {
    error: f64,
    pixels: u64,
}

impl Sums {
    fn finish(self) -> PixelError {
        PixelError {
            pixels: self.pixels,
            mean_abs_error: (self.pixels > 0).then(|| self.error / self.pixels as f64),
        }
    }
}

/// Fills the colour table from `(N, 3, H, W)` originals and reconstructions
/// in [0, 1]; `captions[i]` is image i's caption.
pub fn colour_errors(
    originals: &Tensor,
    reconstructions: &Tensor,
    captions: &[impl AsRef<str>],
) -> Result<ColourErrors> {
    let [n, c, ..] = same_size(originals, reconstructions)?;
    if c != 3 || captions.len() != n as usize {
        return Err(EvalError::Input {
            what: "images and captions",
            expected: "(N, 3, H, W) images and N captions".into(),
            found: format!("{:?} and {} captions", originals.size(), captions.len()),
        });
    }
    // Which images count, with the palette colours of their two regions.
    let (mut keep, mut background, mut shape) = (Vec::new(), Vec::new(), Vec::new());
    for (i, caption) in captions.iter().enumerate() {
        // A shape on a background of its own colour (a caption the dataset
        // never writes) would have no pixels to tell apart.
        if let Ok(a) = parse_caption(caption.as_ref())
            && BACKGROUNDS[a.background].0 != COLORS[a.colour].0
        {
            keep.push(i as i64);
            background.push(a.background);
            shape.push(a.colour);
        }
    }
    let mut bg_sums = vec![Sums::default(); BACKGROUNDS.len()];
    let mut shape_sums = vec![Sums::default(); BACKGROUNDS.len()];
    if !keep.is_empty() {
        let device = originals.device();
        let index = Tensor::from_slice(&keep).to_device(device);
        let o = originals.to_kind(Kind::Float).index_select(0, &index);
        let r = reconstructions.to_kind(Kind::Float).index_select(0, &index);
        let error = (&o - &r).abs().mean_dim(&[1i64][..], false, Kind::Float) * 255.0; // (K, H, W)
        let region = |colours: Vec<[u8; 3]>| -> Result<(Vec<f64>, Vec<i64>)> {
            let rgb: Vec<f32> = colours
                .iter()
                .flatten()
                .map(|&v| f32::from(v) / 255.0)
                .collect();
            let rgb = Tensor::from_slice(&rgb)
                .view([-1, 3, 1, 1])
                .to_device(device);
            let mask = (&o - rgb)
                .abs()
                .amax(&[1i64][..], false)
                .le(PALETTE_TOLERANCE); // (K, H, W)
            let dims = &[1i64, 2][..];
            let errors = (&error * &mask).sum_dim_intlist(dims, false, Kind::Double);
            let pixels = mask.sum_dim_intlist(dims, false, Kind::Int64);
            Ok((Vec::try_from(errors)?, Vec::try_from(pixels)?))
        };
        let bg_colours = background.iter().map(|&b| BACKGROUNDS[b].1).collect();
        let (bg_errors, bg_pixels) = region(bg_colours)?;
        let (shape_errors, shape_pixels) = region(shape.iter().map(|&s| COLORS[s].1).collect())?;
        for k in 0..keep.len() {
            let sums = &mut bg_sums[background[k]];
            sums.error += bg_errors[k];
            sums.pixels += bg_pixels[k] as u64;
            // Shape colours are the palette's first entries, so a shape
            // colour index is also its palette row.
            let sums = &mut shape_sums[shape[k]];
            sums.error += shape_errors[k];
            sums.pixels += shape_pixels[k] as u64;
        }
    }
    let rows = BACKGROUNDS
        .iter()
        .enumerate()
        .map(|(i, &(colour, _))| ColourRow {
            colour,
            background: bg_sums[i].finish(),
            shape: shape_sums[i].finish(),
        })
        .collect();
    Ok(ColourErrors {
        images: keep.len(),
        skipped: captions.len() - keep.len(),
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenes;
    use dalle_data::synth::Scene;

    fn captions(seed: u64, n: u64) -> Vec<String> {
        (0..n).map(|i| Scene::sample(seed, i).caption()).collect()
    }

    #[test]
    fn shape_colours_are_the_palettes_first_rows() {
        for (i, colour) in COLORS.iter().enumerate() {
            assert_eq!(BACKGROUNDS[i], *colour);
        }
    }

    #[test]
    fn black_reconstructions_cost_each_colour_its_mean_value() {
        // Against black, a pixel's error is its own mean channel value, so
        // each row's error is known from the palette alone.
        let (x, _) = scenes::render(11, 0..40, 32);
        let black = x.zeros_like();
        let table = colour_errors(&x, &black, &captions(11, 40)).unwrap();
        assert_eq!((table.images, table.skipped), (40, 0));
        for (row, &(name, rgb)) in table.rows.iter().zip(BACKGROUNDS) {
            let expected = rgb.iter().map(|&v| f64::from(v)).sum::<f64>() / 3.0;
            for region in [row.background, row.shape] {
                if let Some(e) = region.mean_abs_error {
                    assert!((e - expected).abs() < 1e-3, "{name}: {e} vs {expected}");
                }
            }
        }
        assert!(table.rows.iter().any(|r| r.shape.pixels > 0));
        let gray = table.rows.iter().find(|r| r.colour == "gray").unwrap();
        assert_eq!(gray.shape.pixels, 0, "no shape is gray");
    }

    #[test]
    fn pixel_counts_match_the_rendered_images_and_leave_edges_out() {
        let (seed, n, side) = (12, 30, 32);
        let (x, _) = scenes::render(seed, 0..n, side);
        let table = colour_errors(&x, &x, &captions(seed, n)).unwrap();
        let (mut bg, mut fg, mut edges) = (vec![0u64; 10], vec![0u64; 10], 0);
        for i in 0..n {
            let scene = Scene::sample(seed, i);
            for px in scene.render(side).pixels() {
                if px.0 == BACKGROUNDS[scene.background].1 {
                    bg[scene.background] += 1;
                } else if px.0 == COLORS[scene.color].1 {
                    fg[scene.color] += 1;
                } else {
                    edges += 1;
                }
            }
        }
        assert!(edges > 0, "shapes have blended edges");
        for (k, row) in table.rows.iter().enumerate() {
            assert_eq!(row.background.pixels, bg[k], "{}", row.colour);
            assert_eq!(row.shape.pixels, fg[k], "{}", row.colour);
            for region in [row.background, row.shape] {
                assert_eq!(region.mean_abs_error.is_some(), region.pixels > 0);
                assert!(region.mean_abs_error.unwrap_or(0.0) < 1e-6, "perfect copy");
            }
        }
    }

    #[test]
    fn other_captions_are_skipped_without_touching_the_table() {
        let (x, _) = scenes::render(13, 0..8, 32);
        let noise = x.ones_like() * 0.5;
        let mut caps = captions(13, 8);
        let full = colour_errors(&x, &noise, &caps).unwrap();
        // Image 0 gets a caption of another grammar and a wrong picture.
        caps[0] = "a photo of a cat".into();
        let _ = x.get(0).fill_(0.3);
        let partial = colour_errors(&x, &noise, &caps).unwrap();
        assert_eq!((partial.images, partial.skipped), (7, 1));
        let without_first =
            colour_errors(&x.narrow(0, 1, 7), &noise.narrow(0, 1, 7), &caps[1..]).unwrap();
        assert_eq!(without_first.skipped, 0);
        assert_eq!(partial.rows, without_first.rows);
        assert_ne!(partial.rows, full.rows);
    }

    #[test]
    fn mismatched_inputs_are_refused() {
        let (x, _) = scenes::render(14, 0..2, 16);
        let e = colour_errors(&x, &x, &captions(14, 3)).unwrap_err();
        assert!(e.to_string().contains("3 captions"), "{e}");
    }
}
