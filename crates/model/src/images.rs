//! Pixels in and out of tensors: `[0, 1]` CHW float batches ⇄ RGB images,
//! and grids of images for looking at results.

use crate::{ModelError, Result};
use image::RgbImage;
use tch::{Device, Kind, Tensor};

/// Images of CHW bytes → floats in [0, 1] of `shape` `(N, 3, H, W)` on
/// `device`. The bytes travel to a GPU from pinned memory without
/// blocking the host and are scaled there: a quarter of the floats' bytes
/// cross the bus, and the host does no per-pixel work.
pub fn from_bytes(pixels: &[u8], shape: [i64; 4], device: Device) -> Tensor {
    let bytes = Tensor::from_slice(pixels).view(shape);
    let on_device = if device.is_cuda() {
        bytes
            .pin_memory(device)
            .to_device_(device, Kind::Uint8, true, false)
    } else {
        bytes
    };
    on_device.to_kind(Kind::Float) / 255.0
}

/// `(N, 3, H, W)` floats in [0, 1] → N RGB images.
pub fn to_rgb_images(batch: &Tensor) -> Result<Vec<RgbImage>> {
    let size = batch.size();
    if size.len() != 4 || size[1] != 3 {
        return Err(ModelError::Input {
            what: "image batch shape",
            expected: "(N, 3, H, W)".into(),
            found: format!("{size:?}"),
        });
    }
    let (h, w) = (size[2] as u32, size[3] as u32);
    let bytes = (batch.detach().to_device(Device::Cpu).clamp(0.0, 1.0) * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1]) // (N, H, W, 3)
        .contiguous();
    let flat = Vec::<u8>::try_from(bytes.flatten(0, -1))?;
    Ok(flat
        .chunks((h * w * 3) as usize)
        .map(|px| RgbImage::from_raw(w, h, px.to_vec()).expect("chunk holds one image"))
        .collect())
}

/// Lays rows of equally sized images out in a grid with `gap` pixels of
/// white between them.
pub fn grid(rows: &[Vec<RgbImage>], gap: u32) -> RgbImage {
    let (w, h) = rows
        .iter()
        .flatten()
        .next()
        .map(|img| img.dimensions())
        .unwrap_or((0, 0));
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let n_rows = rows.len() as u32;
    let mut out = RgbImage::from_pixel(
        cols * (w + gap) + gap,
        n_rows * (h + gap) + gap,
        image::Rgb([255, 255, 255]),
    );
    for (r, row) in rows.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            let (x, y) = (gap + c as u32 * (w + gap), gap + r as u32 * (h + gap));
            image::imageops::replace(&mut out, img, x.into(), y.into());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_to_images_keeps_channels_and_positions() {
        let t = Tensor::zeros([1, 3, 2, 3], (Kind::Float, Device::Cpu));
        let _ = t.get(0).get(0).get(1).get(2).fill_(1.0); // red at (x=2, y=1)
        let _ = t.get(0).get(2).get(0).get(0).fill_(0.5); // half blue at (0, 0)
        let img = &to_rgb_images(&t).unwrap()[0];
        assert_eq!(img.dimensions(), (3, 2));
        assert_eq!(img.get_pixel(2, 1).0, [255, 0, 0]);
        assert_eq!(img.get_pixel(0, 0).0, [0, 0, 128]);
    }

    #[test]
    fn bytes_become_unit_floats_and_round_trip_to_images() {
        // Every byte value, as the 256 pixels of one 16×16 image's planes.
        let plane: Vec<u8> = (0..=255).collect();
        let pixels: Vec<u8> = [
            plane.clone(),
            plane.iter().rev().copied().collect(),
            plane.clone(),
        ]
        .concat();
        let t = from_bytes(&pixels, [1, 3, 16, 16], Device::Cpu);
        assert_eq!(t.kind(), Kind::Float);
        let floats = Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
        // The host's f32 division, value for value.
        assert!(
            floats
                .iter()
                .zip(&pixels)
                .all(|(f, &b)| *f == f32::from(b) / 255.0)
        );
        let img = &to_rgb_images(&t).unwrap()[0];
        let back: Vec<u8> = (0..3)
            .flat_map(|c| img.pixels().map(move |p| p.0[c]))
            .collect();
        assert_eq!(back, pixels);
    }

    #[test]
    fn grid_places_images_with_gaps() {
        let a = RgbImage::from_pixel(2, 2, image::Rgb([1, 2, 3]));
        let g = grid(&[vec![a.clone(), a.clone()], vec![a]], 1);
        assert_eq!(g.dimensions(), (7, 7));
        assert_eq!(g.get_pixel(4, 1).0, [1, 2, 3]);
        assert_eq!(
            g.get_pixel(4, 4).0,
            [255, 255, 255],
            "missing cell stays blank"
        );
    }
}
