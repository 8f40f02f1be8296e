//! Images given on the command line: image files, or datasets (Parquet
//! files, directories, prefixes, globs, on any store URL), read in order,
//! each sample once.

use anyhow::{Context, Result, bail};
use dalle_data::columns::{ColumnConfig, Payload};
use dalle_data::image_ops::Preprocess;
use dalle_data::parquet_source::{self, SampleData};
use dalle_store::{Location, StoreConfig};
use std::path::Path;

/// A decoded input image, CHW floats in [0, 1].
pub struct InputImage {
    pub key: String,
    /// CHW bytes.
    pub pixels: Vec<u8>,
}

/// A dataset rather than one image file: a URL, a directory, Parquet, a glob.
fn is_dataset(input: &str) -> bool {
    input.contains("://")
        || input.contains('*')
        || input.ends_with(".parquet")
        || Path::new(input).is_dir()
}

/// Reads every input, in the order given. Undecodable images in Parquet
/// are skipped with a warning naming them; an image file given by name
/// that does not decode is an error.
pub fn read_images(
    inputs: &[String],
    preprocess: &Preprocess,
    columns: &ColumnConfig,
    store: &StoreConfig,
    limit: Option<usize>,
) -> Result<Vec<InputImage>> {
    let mut out = Vec::new();
    let full = |out: &Vec<InputImage>| limit.is_some_and(|l| out.len() >= l);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for input in inputs {
        if !is_dataset(input) {
            let input = Path::new(input);
            if !input.exists() {
                bail!("input {} does not exist", input.display());
            }
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
        let location = Location::parse(input, store)?;
        let units = runtime.block_on(parquet_source::plan_units(&location, columns))?;
        if let Some(unit) = units.first()
            && let payload @ Payload::Tokens { .. } = unit.file.payload()
        {
            bail!(
                "{} holds {payload}; this command needs images (a dataset with an image column)",
                unit.file.url
            );
        }
        for unit in units {
            for sample in runtime.block_on(parquet_source::read_unit(&unit))? {
                if full(&out) {
                    return Ok(out);
                }
                let Some(SampleData::Encoded(bytes)) = &sample.data else {
                    tracing::warn!(file = %unit.file.url, key = %sample.key, "skipping null image");
                    continue;
                };
                let mut pixels = Vec::new();
                match preprocess.apply(bytes, &sample.key, 0, &mut pixels) {
                    Ok(()) => out.push(InputImage {
                        key: sample.key,
                        pixels,
                    }),
                    Err(e) => tracing::warn!(file = %unit.file.url, "skipping: {e}"),
                }
            }
        }
    }
    Ok(out)
}
