//! Synthetic scenes as labelled tensors: what the probes are trained and
//! checked on, drawn by the same `Scene::sample` that writes the dataset,
//! and scenes drawn to order, showing given attributes.

use crate::caption::Attributes;
use dalle_data::image_ops::append_chw;
use dalle_data::synth::{Combo, SHAPES, SIZES, Scene};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::ops::Range;
use tch::Tensor;

/// RGB images of one size → `(N, 3, H, W)` floats in [0, 1] on the CPU.
///
/// # Panics
/// If the images differ in size (a caller's bug, not a data error).
pub fn images_to_tensor(images: &[RgbImage]) -> Tensor {
    let (w, h) = images.first().map_or((0, 0), RgbImage::dimensions);
    let mut pixels = Vec::with_capacity(images.len() * (3 * w * h) as usize);
    for image in images {
        assert_eq!(
            image.dimensions(),
            (w, h),
            "images of one batch share a size"
        );
        append_chw(image, &mut pixels);
    }
    let shape = [images.len() as i64, 3, h as i64, w as i64];
    dalle_model::images::from_bytes(&pixels, shape, tch::Device::Cpu)
}

/// Scenes `indices` of `seed`, rendered at `side`×`side`, with their labels.
pub fn render(seed: u64, indices: Range<u64>, side: u32) -> (Tensor, Vec<Attributes>) {
    render_excluding(seed, indices, side, &[])
}

/// Scenes `indices` of a dataset of `seed` that leaves out the pairs of
/// `excluded` (`synth.unseen_combos`), with their labels.
pub fn render_excluding(
    seed: u64,
    indices: Range<u64>,
    side: u32,
    excluded: &[Combo],
) -> (Tensor, Vec<Attributes>) {
    let scenes: Vec<Scene> = indices
        .map(|i| Scene::sample_excluding(seed, i, excluded))
        .collect();
    render_scenes(&scenes, side)
}

/// A scene for each of `wanted`, at a position and angle drawn from
/// stream i of `seed` for the i-th: ground truth for what a caption asks.
pub fn render_attributes(wanted: &[Attributes], side: u32, seed: u64) -> (Tensor, Vec<Attributes>) {
    let scenes: Vec<Scene> = wanted
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(i as u64);
            // The dataset's own ranges: the centre keeps a radius from
            // every edge.
            let r = SIZES[a.size].1;
            Scene {
                shape: SHAPES[a.shape],
                color: a.colour,
                background: a.background,
                size: a.size,
                center: (rng.random_range(r..1.0 - r), rng.random_range(r..1.0 - r)),
                angle: rng.random_range(0.0..std::f64::consts::TAU),
            }
        })
        .collect();
    render_scenes(&scenes, side)
}

fn render_scenes(scenes: &[Scene], side: u32) -> (Tensor, Vec<Attributes>) {
    // Rendering supersamples every pixel: spread it over the cores.
    let images: Vec<RgbImage> = scenes.par_iter().map(|s| s.render(side)).collect();
    let labels = scenes.iter().map(Attributes::from_scene).collect();
    (images_to_tensor(&images), labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dalle_data::synth::BACKGROUNDS;

    #[test]
    fn rendered_tensor_keeps_pixels_channels_and_labels() {
        let (images, labels) = render(3, 5..8, 32);
        assert_eq!(images.size(), [3, 3, 32, 32]);
        assert_eq!(labels[1], Attributes::from_scene(&Scene::sample(3, 6)));
        let direct = Scene::sample(3, 6).render(32);
        for (x, y) in [(0, 0), (31, 5), (16, 16), (7, 29)] {
            let px = direct.get_pixel(x, y).0;
            for (c, &value) in px.iter().enumerate() {
                let v = images.double_value(&[1, c as i64, y as i64, x as i64]);
                assert!(
                    (v * 255.0 - f64::from(value)).abs() < 1e-3,
                    "({x}, {y}) channel {c}"
                );
            }
        }
        // A shape never reaches a corner (its centre keeps a radius from
        // every edge), so corners show the labelled background.
        for (i, label) in labels.iter().enumerate() {
            let bg = BACKGROUNDS[label.background].1;
            for (c, &value) in bg.iter().enumerate() {
                let v = images.double_value(&[i as i64, c as i64, 31, 0]);
                assert!((v * 255.0 - f64::from(value)).abs() < 1e-3, "image {i}");
            }
        }
    }

    #[test]
    fn scenes_drawn_to_order_show_what_was_asked() {
        let wanted: Vec<Attributes> = (0..6)
            .map(|i| Attributes {
                size: i % 3,
                colour: i,
                shape: 7 - i,
                background: 9 - i,
            })
            .collect();
        let (images, labels) = render_attributes(&wanted, 32, 5);
        assert_eq!(images.size(), [6, 3, 32, 32]);
        assert_eq!(labels, wanted);
        let (again, _) = render_attributes(&wanted, 32, 5);
        assert!(images.equal(&again), "a function of the seed");
        let (other, _) = render_attributes(&wanted, 32, 6);
        assert!(!images.equal(&other), "positions come from the seed");
    }

    #[test]
    fn excluded_pairs_stay_out_of_rendered_scenes() {
        let excluded = ["red circle".parse().unwrap()];
        let (_, labels) = render_excluding(3, 0..300, 16, &excluded);
        assert!(
            labels.iter().all(|l| (l.colour, l.shape) != (0, 0)),
            "no red circle"
        );
    }
}
