//! Reading image–caption samples from local Parquet files, one row group at
//! a time and only the needed columns.

use crate::columns::{self, ColumnConfig, Columns};
use crate::{DataError, Result};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::fs::File;
use std::path::{Path, PathBuf};

/// One sample as stored: its bytes are decoded later, off the reading thread.
#[derive(Clone, Debug)]
pub struct RawSample {
    pub key: String,
    pub image: Option<Vec<u8>>,
    pub caption: Option<String>,
}

/// A unit of work: one row group of one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    pub file: PathBuf,
    pub row_group: usize,
    pub rows: usize,
}

/// The Parquet files of a dataset: a single file, or every `*.parquet` in a
/// directory (sorted by name, so the order does not depend on the file system).
pub fn list_files(location: &Path) -> Result<Vec<PathBuf>> {
    if location.is_file() {
        return Ok(vec![location.to_path_buf()]);
    }
    let entries = std::fs::read_dir(location).map_err(DataError::io(location))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(DataError::io(location))?.path();
        if path.extension().is_some_and(|e| e == "parquet") {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(DataError::EmptyDataset(location.to_path_buf()));
    }
    Ok(files)
}

fn open(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    let file = File::open(path).map_err(DataError::io(path))?;
    ParquetRecordBatchReaderBuilder::try_new(file).map_err(DataError::parquet(path))
}

/// The row groups of every file, in file order, with their columns checked.
pub fn plan_units(files: &[PathBuf], columns: &ColumnConfig) -> Result<Vec<Unit>> {
    let mut units = Vec::new();
    for file in files {
        let builder = open(file)?;
        columns.resolve(builder.schema(), file)?;
        for (row_group, meta) in builder.metadata().row_groups().iter().enumerate() {
            units.push(Unit {
                file: file.clone(),
                row_group,
                rows: meta.num_rows() as usize,
            });
        }
    }
    Ok(units)
}

/// Reads the samples of one row group.
pub fn read_unit(unit: &Unit, columns: &ColumnConfig) -> Result<Vec<RawSample>> {
    let builder = open(&unit.file)?;
    let cols: Columns = columns.resolve(builder.schema(), &unit.file)?;
    let wanted: Vec<&str> = [Some(&cols.image), Some(&cols.caption), cols.key.as_ref()]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let roots: Vec<usize> = builder
        .schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| wanted.contains(&f.name().as_str()))
        .map(|(i, _)| i)
        .collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let reader = builder
        .with_row_groups(vec![unit.row_group])
        .with_projection(mask)
        .build()
        .map_err(DataError::parquet(&unit.file))?;
    let file_name = unit.file.file_name().unwrap_or_default().to_string_lossy();
    let mut samples = Vec::with_capacity(unit.rows);
    for batch in reader {
        let batch = batch.map_err(|e| DataError::Parquet {
            path: unit.file.clone(),
            reason: e.to_string(),
        })?;
        let column = |name: &str| batch.column_by_name(name).expect("projected");
        let images = columns::binary_values(column(&cols.image));
        let captions = columns::string_values(column(&cols.caption));
        let keys = cols
            .key
            .as_deref()
            .map(|k| columns::string_values(column(k)));
        for (i, (image, caption)) in images.into_iter().zip(captions).enumerate() {
            let row = samples.len();
            let key = keys
                .as_ref()
                .and_then(|k| k[i].clone())
                .unwrap_or_else(|| format!("{file_name}:{}:{row}", unit.row_group));
            samples.push(RawSample {
                key,
                image,
                caption,
            });
        }
    }
    Ok(samples)
}
