//! Synthetic scenes as labelled tensors: what the probes are trained and
//! checked on, drawn by the same `Scene::sample` that writes the dataset.

use crate::caption::Attributes;
use dalle_data::image_ops::append_chw;
use dalle_data::synth::Scene;
use image::RgbImage;
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
    Tensor::from_slice(&pixels).view([images.len() as i64, 3, h as i64, w as i64])
}

/// Scenes `indices` of `seed`, rendered at `side`×`side`, with their labels.
pub fn render(seed: u64, indices: Range<u64>, side: u32) -> (Tensor, Vec<Attributes>) {
    let scenes: Vec<Scene> = indices.map(|i| Scene::sample(seed, i)).collect();
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
}
