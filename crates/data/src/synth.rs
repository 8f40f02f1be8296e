//! A deterministic synthetic dataset of coloured shapes with captions such
//! as "a small red circle on a blue background", written as Parquet in
//! img2dataset's layout (`key`, `png` or `jpg`, `caption`).
//!
//! Sample i depends only on (seed, i), never on how samples are split into
//! files, so the same seed gives the same samples at any file size.
//!
//! `unseen_combos` keeps some (colour, shape) pairs out of the dataset, so
//! that `dalle eval` can ask a model for combinations it never saw and
//! measure how well it composes what it learnt apart.

use crate::{DataError, Result};
use arrow_array::{ArrayRef, BinaryArray, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use image::{ImageFormat, Rgb, RgbImage};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

pub const SHAPES: &[&str] = &[
    "circle", "square", "triangle", "diamond", "cross", "ring", "hexagon", "star",
];

/// Every colour of the dataset: shapes take the first eight, backgrounds
/// all ten (never the shape's own).
const PALETTE: &[(&str, [u8; 3])] = &[
    ("red", [220, 40, 40]),
    ("green", [40, 180, 60]),
    ("blue", [40, 70, 220]),
    ("yellow", [240, 220, 40]),
    ("purple", [140, 50, 190]),
    ("cyan", [40, 200, 220]),
    ("orange", [245, 140, 30]),
    ("white", [245, 245, 245]),
    ("black", [15, 15, 15]),
    ("gray", [128, 128, 128]),
];

pub const COLORS: &[(&str, [u8; 3])] = PALETTE.split_at(8).0;
pub const BACKGROUNDS: &[(&str, [u8; 3])] = PALETTE;

/// Shape radius as a fraction of the image side.
pub const SIZES: &[(&str, f64)] = &[("small", 0.14), ("medium", 0.24), ("large", 0.34)];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SynthFormat {
    Png,
    Jpg,
}

/// A shape colour and a shape kind, as indexes into `COLORS` and
/// `SHAPES`; written "red star" in configs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Combo {
    pub colour: usize,
    pub shape: usize,
}

impl Combo {
    /// Every (colour, shape) pair, colour-major.
    pub fn all() -> impl Iterator<Item = Combo> {
        (0..COLORS.len())
            .flat_map(|colour| (0..SHAPES.len()).map(move |shape| Combo { colour, shape }))
    }
}

impl fmt::Display for Combo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", COLORS[self.colour].0, SHAPES[self.shape])
    }
}

impl FromStr for Combo {
    type Err = String;

    /// "COLOUR SHAPE"; the error names the entry and what is wrong with it.
    fn from_str(text: &str) -> Result<Self, String> {
        let err = |reason: String| format!("synth.unseen_combos entry `{text}`: {reason}");
        let words: Vec<&str> = text.split_whitespace().collect();
        let [colour, shape] = words[..] else {
            return Err(err(
                "expected two words, \"COLOUR SHAPE\" (e.g. \"red star\")".into(),
            ));
        };
        let colour = COLORS.iter().position(|c| c.0 == colour).ok_or_else(|| {
            let names: Vec<&str> = COLORS.iter().map(|c| c.0).collect();
            err(format!(
                "unknown shape colour `{colour}` (one of {})",
                names.join(", ")
            ))
        })?;
        let shape = SHAPES.iter().position(|&s| s == shape).ok_or_else(|| {
            err(format!(
                "unknown shape `{shape}` (one of {})",
                SHAPES.join(", ")
            ))
        })?;
        Ok(Self { colour, shape })
    }
}

impl TryFrom<String> for Combo {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<Combo> for String {
    fn from(combo: Combo) -> String {
        combo.to_string()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SynthConfig {
    pub count: usize,
    pub seed: u64,
    pub image_size: u32,
    pub rows_per_file: usize,
    pub rows_per_group: usize,
    pub format: SynthFormat,
    /// (colour, shape) pairs never drawn, as "COLOUR SHAPE" strings: the
    /// combinations `dalle eval` measures a model on without it having
    /// seen them. Each is checked when the config is read.
    pub unseen_combos: Vec<Combo>,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            count: 4096,
            seed: 0,
            image_size: 64,
            rows_per_file: 1024,
            rows_per_group: 256,
            format: SynthFormat::Png,
            unseen_combos: Vec::new(),
        }
    }
}

impl SynthConfig {
    /// Checks what serde cannot: sizes, and that some pair is left to draw.
    pub fn validate(&self) -> Result<()> {
        if self.count == 0 || self.rows_per_file == 0 || self.image_size < 8 {
            return Err(DataError::Config(format!(
                "synthetic data needs count, rows_per_file > 0 and image_size ≥ 8, got {self:?}"
            )));
        }
        if Combo::all().all(|c| self.unseen_combos.contains(&c)) {
            return Err(DataError::Config(
                "synth.unseen_combos names every (colour, shape) pair: nothing is left to draw"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// What a sample shows.
#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    pub shape: &'static str,
    pub color: usize,
    pub background: usize,
    pub size: usize,
    /// Centre as a fraction of the side.
    pub center: (f64, f64),
    /// Rotation in radians, for shapes where it shows.
    pub angle: f64,
}

impl Scene {
    /// Sample `index` of a dataset of `seed` in which every pair is drawn.
    pub fn sample(seed: u64, index: u64) -> Self {
        Self::sample_excluding(seed, index, &[])
    }

    /// Sample `index` of a dataset of `seed` that never shows the pairs of
    /// `excluded`: the shape and colour are drawn again, further along the
    /// same stream, until the pair is allowed. The sample stays a function
    /// of (seed, index) alone, and with nothing excluded it is
    /// [`Scene::sample`]'s. At least one pair must be allowed
    /// ([`SynthConfig::validate`]).
    pub fn sample_excluding(seed: u64, index: u64, excluded: &[Combo]) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(index);
        let (shape, color) = loop {
            let shape = rng.random_range(0..SHAPES.len());
            let colour = rng.random_range(0..COLORS.len());
            if !excluded.contains(&Combo { colour, shape }) {
                break (SHAPES[shape], colour);
            }
        };
        let background = loop {
            let b = rng.random_range(0..BACKGROUNDS.len());
            if BACKGROUNDS[b].0 != COLORS[color].0 {
                break b;
            }
        };
        let size = rng.random_range(0..SIZES.len());
        let r = SIZES[size].1;
        let center = (rng.random_range(r..1.0 - r), rng.random_range(r..1.0 - r));
        let angle = rng.random_range(0.0..std::f64::consts::TAU);
        Self {
            shape,
            color,
            background,
            size,
            center,
            angle,
        }
    }

    pub fn caption(&self) -> String {
        format!(
            "a {} {} {} on a {} background",
            SIZES[self.size].0, COLORS[self.color].0, self.shape, BACKGROUNDS[self.background].0
        )
    }

    /// Renders with 2×2 supersampling so edges are smooth.
    pub fn render(&self, side: u32) -> RgbImage {
        let (fg, bg) = (COLORS[self.color].1, BACKGROUNDS[self.background].1);
        let r = SIZES[self.size].1;
        RgbImage::from_fn(side, side, |px, py| {
            let mut cover = 0.0;
            for (sx, sy) in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)] {
                let x = (px as f64 + sx) / side as f64 - self.center.0;
                let y = (py as f64 + sy) / side as f64 - self.center.1;
                if self.contains(x / r, y / r) {
                    cover += 0.25;
                }
            }
            Rgb(std::array::from_fn(|c| {
                (fg[c] as f64 * cover + bg[c] as f64 * (1.0 - cover)).round() as u8
            }))
        })
    }

    /// Whether a point, in units of the radius around the centre, is inside.
    fn contains(&self, x: f64, y: f64) -> bool {
        let (s, c) = self.angle.sin_cos();
        let (u, v) = (c * x + s * y, -s * x + c * y); // rotated frame
        let d = (x * x + y * y).sqrt();
        match self.shape {
            "circle" => d <= 1.0,
            "ring" => (0.6..=1.0).contains(&d),
            "square" => u.abs().max(v.abs()) <= 0.75,
            "diamond" => u.abs() + v.abs() <= 1.0,
            "cross" => (u.abs() <= 0.3 && v.abs() <= 1.0) || (v.abs() <= 0.3 && u.abs() <= 1.0),
            "triangle" => in_polygon(u, v, &regular_polygon(3, 1.0, 1.0)),
            "hexagon" => in_polygon(u, v, &regular_polygon(6, 1.0, 1.0)),
            "star" => in_polygon(u, v, &regular_polygon(10, 1.0, 0.45)),
            other => unreachable!("unknown shape {other}"),
        }
    }
}

/// Vertices of a polygon whose vertices alternate between two radii.
fn regular_polygon(n: usize, outer: f64, inner: f64) -> Vec<(f64, f64)> {
    (0..n)
        .map(|i| {
            let a = std::f64::consts::TAU * i as f64 / n as f64 - std::f64::consts::FRAC_PI_2;
            let r = if i % 2 == 0 { outer } else { inner };
            (r * a.cos(), r * a.sin())
        })
        .collect()
}

/// Even-odd rule.
fn in_polygon(x: f64, y: f64, vertices: &[(f64, f64)]) -> bool {
    let mut inside = false;
    let mut j = vertices.len() - 1;
    for i in 0..vertices.len() {
        let ((xi, yi), (xj, yj)) = (vertices[i], vertices[j]);
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

fn encode(image: &RgbImage, format: SynthFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    let format = match format {
        SynthFormat::Png => ImageFormat::Png,
        SynthFormat::Jpg => ImageFormat::Jpeg,
    };
    image
        .write_to(&mut out, format)
        .expect("encoding to memory cannot fail");
    out.into_inner()
}

fn schema(format: SynthFormat) -> Arc<Schema> {
    let image_column = match format {
        SynthFormat::Png => "png",
        SynthFormat::Jpg => "jpg",
    };
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new(image_column, DataType::Binary, false),
        Field::new("caption", DataType::Utf8, false),
    ]))
}

/// Writes one Parquet file of samples `range`, atomically.
fn write_file(path: &Path, range: std::ops::Range<usize>, cfg: &SynthConfig) -> Result<()> {
    let scenes: Vec<Scene> = range
        .clone()
        .map(|i| Scene::sample_excluding(cfg.seed, i as u64, &cfg.unseen_combos))
        .collect();
    let keys = StringArray::from_iter_values(range.map(|i| format!("{i:09}")));
    let images = BinaryArray::from_iter_values(
        scenes
            .iter()
            .map(|s| encode(&s.render(cfg.image_size), cfg.format)),
    );
    let captions = StringArray::from_iter_values(scenes.iter().map(Scene::caption));
    let columns: Vec<ArrayRef> = vec![Arc::new(keys), Arc::new(images), Arc::new(captions)];
    let batch = RecordBatch::try_new(schema(cfg.format), columns).expect("columns match schema");

    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(cfg.rows_per_group.max(1)))
        .set_compression(Compression::SNAPPY)
        .build();
    let tmp = path.with_extension("parquet.partial");
    let file = std::fs::File::create(&tmp).map_err(DataError::io(&tmp))?;
    let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props))
        .map_err(DataError::parquet(tmp.display().to_string()))?;
    writer
        .write(&batch)
        .map_err(DataError::parquet(tmp.display().to_string()))?;
    writer
        .close()
        .map_err(DataError::parquet(tmp.display().to_string()))?;
    std::fs::rename(&tmp, path).map_err(DataError::io(path))
}

/// Writes the dataset into `dir` as `part-NNNNN.parquet`, calling
/// `on_file` after each file. Returns the files written.
pub fn write_dataset(
    dir: &Path,
    cfg: &SynthConfig,
    on_file: impl Fn(&Path) + Sync,
) -> Result<Vec<PathBuf>> {
    cfg.validate()?;
    std::fs::create_dir_all(dir).map_err(DataError::io(dir))?;
    let starts: Vec<usize> = (0..cfg.count).step_by(cfg.rows_per_file).collect();
    starts
        .par_iter()
        .enumerate()
        .map(|(n, &start)| {
            let path = dir.join(format!("part-{n:05}.parquet"));
            write_file(
                &path,
                start..(start + cfg.rows_per_file).min(cfg.count),
                cfg,
            )?;
            on_file(&path);
            Ok(path)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_are_deterministic_and_varied() {
        assert_eq!(Scene::sample(7, 3), Scene::sample(7, 3));
        assert_ne!(Scene::sample(7, 3), Scene::sample(8, 3));
        let scenes: Vec<Scene> = (0..2000).map(|i| Scene::sample(1, i)).collect();
        let distinct = |f: fn(&Scene) -> String| {
            scenes
                .iter()
                .map(f)
                .collect::<std::collections::HashSet<_>>()
                .len()
        };
        assert_eq!(distinct(|s| s.shape.to_string()), SHAPES.len());
        assert_eq!(distinct(|s| s.color.to_string()), COLORS.len());
        assert_eq!(distinct(|s| s.size.to_string()), SIZES.len());
        assert_eq!(distinct(|s| s.background.to_string()), BACKGROUNDS.len());
        assert!(
            scenes
                .iter()
                .all(|s| BACKGROUNDS[s.background].0 != COLORS[s.color].0)
        );
    }

    #[test]
    fn excluded_pairs_are_never_drawn_and_the_rest_is_unchanged() {
        let excluded: Vec<Combo> = ["red star", "blue circle", "white cross"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let combo = |s: &Scene| Combo {
            colour: s.color,
            shape: SHAPES.iter().position(|&k| k == s.shape).unwrap(),
        };
        let mut redrawn = 0;
        for i in 0..3000 {
            let free = Scene::sample(4, i);
            let kept = Scene::sample_excluding(4, i, &excluded);
            assert!(!excluded.contains(&combo(&kept)), "sample {i}: {kept:?}");
            assert_eq!(
                kept,
                Scene::sample_excluding(4, i, &excluded),
                "a pure function"
            );
            if excluded.contains(&combo(&free)) {
                redrawn += 1;
            } else {
                // Only samples that drew an excluded pair change.
                assert_eq!(kept, free, "sample {i}");
            }
        }
        // 3 of 64 pairs: about 140 of 3000 samples are drawn again.
        assert!((80..220).contains(&redrawn), "{redrawn}");
    }

    #[test]
    fn combos_parse_and_print_and_name_a_bad_entry() {
        for combo in Combo::all() {
            assert_eq!(combo.to_string().parse::<Combo>().unwrap(), combo);
        }
        assert_eq!(Combo::all().count(), COLORS.len() * SHAPES.len());
        assert_eq!(
            "red star".parse::<Combo>().unwrap(),
            Combo {
                colour: 0,
                shape: 7
            }
        );
        for (bad, reason) in [
            ("pink star", "unknown shape colour `pink`"),
            ("black star", "unknown shape colour `black`"),
            ("red oval", "unknown shape `oval`"),
            ("red", "two words"),
            ("a red star", "two words"),
        ] {
            let e = Combo::try_from(bad.to_string()).unwrap_err();
            assert!(e.contains(&format!("`{bad}`")) && e.contains(reason), "{e}");
        }
    }

    #[test]
    fn a_config_that_excludes_every_pair_is_refused() {
        let all = SynthConfig {
            unseen_combos: Combo::all().collect(),
            ..SynthConfig::default()
        };
        let e = all.validate().unwrap_err().to_string();
        assert!(e.contains("synth.unseen_combos"), "{e}");
        let mut most = all.clone();
        most.unseen_combos.pop();
        assert!(most.validate().is_ok());
        let e = write_dataset(Path::new("/nonexistent/never"), &all, |_| {}).unwrap_err();
        assert!(e.to_string().contains("every (colour, shape) pair"), "{e}");
    }

    #[test]
    fn caption_describes_the_scene() {
        let s = Scene {
            shape: "circle",
            color: 0,
            background: 2,
            size: 0,
            center: (0.5, 0.5),
            angle: 0.0,
        };
        assert_eq!(s.caption(), "a small red circle on a blue background");
        let img = s.render(64);
        assert_eq!(img.get_pixel(32, 32).0, COLORS[0].1, "centre is the shape");
        assert_eq!(
            img.get_pixel(1, 1).0,
            BACKGROUNDS[2].1,
            "corner is the background"
        );
    }

    #[test]
    fn shapes_cover_plausible_areas() {
        for shape in SHAPES {
            let s = Scene {
                shape,
                color: 0,
                background: 8,
                size: 2,
                center: (0.5, 0.5),
                angle: 0.3,
            };
            let img = s.render(64);
            let covered = img.pixels().filter(|p| p.0 == COLORS[0].1).count() as f64 / 4096.0;
            // A radius of 0.34 of the side: a full disc covers ~36%.
            assert!((0.05..0.45).contains(&covered), "{shape} covers {covered}");
        }
    }
}
