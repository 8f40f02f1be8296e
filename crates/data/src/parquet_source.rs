//! Reading image–caption samples from Parquet files wherever they lie
//! (local disk, S3-compatible storage, memory), through object_store and
//! the parquet async reader: the footer once per file, then only the row
//! groups and columns needed, by range requests. Whole files are never
//! downloaded.

use crate::columns::{self, ColumnConfig, Columns};
use crate::object_reader::StoreReader;
use crate::{DataError, Result};
use dalle_store::Location;
use dalle_store::object_store::ObjectStore;
use dalle_store::object_store::path::Path as ObjectPath;
use futures::{StreamExt, TryStreamExt};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use parquet::arrow::async_reader::ParquetRecordBatchStreamBuilder;
use std::sync::Arc;

/// Files whose footers are read at once while planning.
const FOOTER_CONCURRENCY: usize = 16;

/// One sample as stored: its bytes are decoded later, off the reading thread.
#[derive(Clone, Debug)]
pub struct RawSample {
    pub key: String,
    pub image: Option<Vec<u8>>,
    pub caption: Option<String>,
}

/// A Parquet file with its footer and resolved columns.
#[derive(Debug)]
pub struct SourceFile {
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    size: u64,
    /// The file's URL, for messages.
    pub url: String,
    metadata: ArrowReaderMetadata,
    columns: Columns,
}

/// A unit of work: one row group of one file.
#[derive(Clone, Debug)]
pub struct Unit {
    pub file: Arc<SourceFile>,
    pub row_group: usize,
    pub rows: usize,
    /// Compressed bytes of the row group (all columns): what reading it
    /// costs at most.
    pub bytes: u64,
}

impl SourceFile {
    async fn open(
        location: &Location,
        path: ObjectPath,
        size: u64,
        columns: &ColumnConfig,
    ) -> Result<Self> {
        let url = location.describe(&path);
        let mut reader = StoreReader::new(location.store.clone(), path.clone(), size);
        let metadata = ArrowReaderMetadata::load_async(&mut reader, ArrowReaderOptions::new())
            .await
            .map_err(DataError::parquet(url.clone()))?;
        let columns = columns.resolve(metadata.schema(), &url)?;
        Ok(Self {
            store: location.store.clone(),
            path,
            size,
            url,
            metadata,
            columns,
        })
    }
}

/// Lists the dataset's Parquet files and reads their footers: the row
/// groups of every file, in key order, with their columns checked.
pub async fn plan_units(location: &Location, columns: &ColumnConfig) -> Result<Vec<Unit>> {
    let objects = location.list(".parquet").await?;
    if objects.is_empty() {
        return Err(DataError::EmptyDataset(location.url.clone()));
    }
    let files: Vec<SourceFile> = futures::stream::iter(objects)
        .map(|o| SourceFile::open(location, o.location, o.size, columns))
        .buffered(FOOTER_CONCURRENCY)
        .try_collect()
        .await?;
    let mut units = Vec::new();
    for file in files.into_iter().map(Arc::new) {
        for (row_group, meta) in file.metadata.metadata().row_groups().iter().enumerate() {
            units.push(Unit {
                file: file.clone(),
                row_group,
                rows: meta.num_rows() as usize,
                bytes: meta.compressed_size() as u64,
            });
        }
    }
    Ok(units)
}

/// Reads the samples of one row group: only the key, image and caption
/// columns, by range requests.
pub async fn read_unit(unit: &Unit) -> Result<Vec<RawSample>> {
    let file = &unit.file;
    let cols = &file.columns;
    let wanted: Vec<&str> = [Some(&cols.image), Some(&cols.caption), cols.key.as_ref()]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let roots: Vec<usize> = file
        .metadata
        .schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| wanted.contains(&f.name().as_str()))
        .map(|(i, _)| i)
        .collect();
    let mask = ProjectionMask::roots(file.metadata.parquet_schema(), roots);
    let reader = StoreReader::new(file.store.clone(), file.path.clone(), file.size);
    let mut stream =
        ParquetRecordBatchStreamBuilder::new_with_metadata(reader, file.metadata.clone())
            .with_row_groups(vec![unit.row_group])
            .with_projection(mask)
            .build()
            .map_err(DataError::parquet(file.url.clone()))?;
    let file_name = file.path.filename().unwrap_or_default().to_string();
    let mut samples = Vec::with_capacity(unit.rows);
    while let Some(batch) = stream
        .try_next()
        .await
        .map_err(DataError::parquet(file.url.clone()))?
    {
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
