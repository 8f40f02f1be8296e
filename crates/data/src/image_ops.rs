//! Image bytes → training pixels: decode (JPEG, PNG, WebP) with a guard
//! against decompression bombs, convert to RGB, resize the shorter side to
//! the target size and crop the square, lay out as CHW floats in [0, 1].

use crate::{DataError, Result};
use image::imageops::FilterType;
use image::{ImageReader, Limits, RgbImage};
use serde::{Deserialize, Serialize};
use std::io::Cursor;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Crop {
    Center,
    /// A seeded random square; the loader derives the seed per sample.
    Random,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Preprocess {
    /// Side of the square output, in pixels.
    pub size: u32,
    /// Images with more pixels than this are refused before decoding.
    pub max_pixels: u64,
    pub crop: Crop,
}

/// Decodes image bytes to RGB, refusing images over `max_pixels`.
pub fn decode_rgb(bytes: &[u8], max_pixels: u64, key: &str) -> Result<RgbImage> {
    let err = |reason: String| DataError::Image {
        key: key.to_string(),
        reason,
    };
    let reader = || {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| err(format!("unreadable: {e}")))
    };
    // Read the header first: a bomb is refused before any pixel is allocated.
    let (w, h) = reader()?
        .into_dimensions()
        .map_err(|e| err(format!("undecodable header: {e}")))?;
    if u64::from(w) * u64::from(h) > max_pixels {
        return Err(err(format!(
            "{w}×{h} = {} pixels exceeds the limit of {max_pixels} (decompression-bomb guard)",
            u64::from(w) * u64::from(h)
        )));
    }
    let mut decoder = reader()?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    decoder.limits(limits);
    let image = decoder
        .decode()
        .map_err(|e| err(format!("undecodable: {e}")))?;
    Ok(image.into_rgb8())
}

/// Resizes the shorter side to `size` and crops a `size`×`size` square;
/// `offset_seed` picks the random crop's position.
pub fn resize_crop(image: RgbImage, size: u32, crop: Crop, offset_seed: u64) -> RgbImage {
    let (w, h) = image.dimensions();
    if (w, h) == (size, size) {
        return image;
    }
    let scale = size as f64 / w.min(h) as f64;
    let (nw, nh) = (
        ((w as f64 * scale).round() as u32).max(size),
        ((h as f64 * scale).round() as u32).max(size),
    );
    let resized = image::imageops::resize(&image, nw, nh, FilterType::Triangle);
    let (slack_x, slack_y) = (nw - size, nh - size);
    let (x, y) = match crop {
        Crop::Center => (slack_x / 2, slack_y / 2),
        Crop::Random => (
            (offset_seed % (u64::from(slack_x) + 1)) as u32,
            ((offset_seed >> 32) % (u64::from(slack_y) + 1)) as u32,
        ),
    };
    image::imageops::crop_imm(&resized, x, y, size, size).to_image()
}

/// Appends the image as CHW bytes to `out`. Batches stay bytes until they
/// reach the device, a quarter of the floats' size, and are scaled to
/// [0, 1] there (`dalle_model::images::from_bytes`).
pub fn append_chw(image: &RgbImage, out: &mut Vec<u8>) {
    let plane = (image.width() * image.height()) as usize;
    let start = out.len();
    out.resize(start + 3 * plane, 0);
    for (i, px) in image.pixels().enumerate() {
        for c in 0..3 {
            out[start + c * plane + i] = px[c];
        }
    }
}

impl Preprocess {
    /// Encoded image bytes → CHW pixel bytes of `size`×`size`, appended
    /// to `out`.
    pub fn apply(&self, bytes: &[u8], key: &str, crop_seed: u64, out: &mut Vec<u8>) -> Result<()> {
        let rgb = decode_rgb(bytes, self.max_pixels, key)?;
        append_chw(&resize_crop(rgb, self.size, self.crop, crop_seed), out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageFormat, Rgb};

    fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    #[test]
    fn resizes_shorter_side_and_center_crops() {
        // Left third red, rest blue, 300×150: the centre crop loses the
        // outer quarter on each side, so the crop is mostly blue.
        let img = RgbImage::from_fn(300, 150, |x, _| {
            if x < 100 {
                Rgb([255, 0, 0])
            } else {
                Rgb([0, 0, 255])
            }
        });
        let out = resize_crop(img, 32, Crop::Center, 0);
        assert_eq!(out.dimensions(), (32, 32));
        assert_eq!(out.get_pixel(0, 16)[0], 255, "left edge still red");
        assert_eq!(out.get_pixel(31, 16)[2], 255, "right edge blue");
    }

    #[test]
    fn chw_layout() {
        let img = RgbImage::from_fn(2, 1, |x, _| Rgb([255, (x * 200) as u8, 7]));
        let mut out = Vec::new();
        append_chw(&img, &mut out);
        assert_eq!(out, vec![255, 255, 0, 200, 7, 7]);
    }

    #[test]
    fn decodes_png_jpeg_and_converts_gray_to_rgb() {
        let rgb = RgbImage::from_pixel(8, 8, Rgb([10, 200, 30]));
        for format in [ImageFormat::Png, ImageFormat::Jpeg] {
            let decoded = decode_rgb(&encode(&rgb, format), 1 << 20, "k").unwrap();
            assert_eq!(decoded.dimensions(), (8, 8));
        }
        let gray = image::GrayImage::from_pixel(4, 4, image::Luma([77]));
        let mut bytes = Cursor::new(Vec::new());
        gray.write_to(&mut bytes, ImageFormat::Png).unwrap();
        let decoded = decode_rgb(bytes.get_ref(), 1 << 20, "k").unwrap();
        assert_eq!(decoded.get_pixel(0, 0).0, [77, 77, 77]);
    }

    #[test]
    fn refuses_bombs_and_garbage_naming_the_key() {
        let big = encode(&RgbImage::new(100, 100), ImageFormat::Png);
        let err = decode_rgb(&big, 5_000, "bomb-7").unwrap_err().to_string();
        assert!(
            err.contains("bomb-7") && err.contains("10000 pixels"),
            "{err}"
        );
        let err = decode_rgb(b"definitely not an image", 1 << 20, "junk-1").unwrap_err();
        assert!(err.to_string().contains("junk-1"), "{err}");
        let mut truncated = encode(&RgbImage::new(64, 64), ImageFormat::Png);
        truncated.truncate(truncated.len() / 2);
        assert!(decode_rgb(&truncated, 1 << 20, "cut").is_err());
    }
}
