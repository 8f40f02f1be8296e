//! Images given on the command line: image files, or Parquet files and
//! directories of them, read in order, each sample once.

use anyhow::{Context, Result, bail};
use dalle_data::columns::ColumnConfig;
use dalle_data::image_ops::Preprocess;
use dalle_data::parquet_source;
use std::path::{Path, PathBuf};

/// A decoded input image, CHW floats in [0, 1].
pub struct InputImage {
    pub key: String,
    pub pixels: Vec<f32>,
}

fn is_parquet(path: &Path) -> bool {
    path.is_dir() || path.extension().is_some_and(|e| e == "parquet")
}

/// Reads every input, in the order given. Undecodable images in Parquet
/// are skipped with a warning naming them; an image file given by name
/// that does not decode is an error.
pub fn read_images(
    inputs: &[PathBuf],
    preprocess: &Preprocess,
    columns: &ColumnConfig,
    limit: Option<usize>,
) -> Result<Vec<InputImage>> {
    let mut out = Vec::new();
    let full = |out: &Vec<InputImage>| limit.is_some_and(|l| out.len() >= l);
    for input in inputs {
        if !input.exists() {
            bail!("input {} does not exist", input.display());
        }
        if !is_parquet(input) {
            let bytes =
                std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
            let key = input.display().to_string();
            let mut pixels = Vec::new();
            preprocess
                .apply(&bytes, &key, 0, &mut pixels)
                .with_context(|| format!("decoding image file {}", input.display()))?;
            out.push(InputImage { key, pixels });
            continue;
        }
        let files = parquet_source::list_files(input)?;
        for unit in parquet_source::plan_units(&files, columns)? {
            for sample in parquet_source::read_unit(&unit, columns)? {
                if full(&out) {
                    return Ok(out);
                }
                let Some(bytes) = sample.image.as_deref() else {
                    tracing::warn!(file = %unit.file.display(), key = %sample.key, "skipping null image");
                    continue;
                };
                let mut pixels = Vec::new();
                match preprocess.apply(bytes, &sample.key, 0, &mut pixels) {
                    Ok(()) => out.push(InputImage {
                        key: sample.key,
                        pixels,
                    }),
                    Err(e) => tracing::warn!(file = %unit.file.display(), "skipping: {e}"),
                }
            }
        }
    }
    Ok(out)
}
