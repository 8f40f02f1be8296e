//! Reading samples (an encoded image or a pre-tokenized token grid, with
//! its key and caption) from Parquet files wherever they lie (local disk,
//! S3-compatible storage, memory), through object_store and the parquet
//! async reader: the footer once per file, then only the row groups and
//! columns needed, by range requests. Whole files are never downloaded.
//!
//! Every file of a dataset must hold the same [`Payload`]: all images, or
//! all token grids of one length; [`plan_units`] checks that.

use crate::columns::{self, ColumnConfig, Columns, Payload};
use crate::object_reader::StoreReader;
use crate::{DataError, Result};
use arrow_array::RecordBatch;
use dalle_store::Location;
use dalle_store::object_store::ObjectStore;
use dalle_store::object_store::path::Path as ObjectPath;
use futures::{StreamExt, TryStreamExt};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use parquet::arrow::async_reader::{ParquetRecordBatchStream, ParquetRecordBatchStreamBuilder};
use parquet::file::metadata::ParquetMetaData;
use std::sync::Arc;

/// Files whose footers are read at once while planning.
const FOOTER_CONCURRENCY: usize = 16;

/// One sample as stored: image bytes are decoded later, off the reading
/// thread.
#[derive(Clone, Debug)]
pub struct RawSample {
    pub key: String,
    /// `None` where the row's payload is null.
    pub data: Option<SampleData>,
    pub caption: Option<String>,
}

/// A sample's payload as stored, by the file's [`Payload`].
#[derive(Clone, Debug, PartialEq)]
pub enum SampleData {
    /// Encoded image bytes (PNG, JPEG, WebP).
    Encoded(Vec<u8>),
    /// An image-token grid, row-major.
    Tokens(Vec<u16>),
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
        check_row_counts(metadata.metadata(), size, &url)?;
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

    /// What this file's samples hold.
    pub fn payload(&self) -> Payload {
        self.columns.payload
    }

    /// The columns resolved for this file.
    pub fn columns(&self) -> &Columns {
        &self.columns
    }

    /// A reader of this file's `row_group`, projected to `wanted` columns.
    fn stream(
        &self,
        row_group: usize,
        wanted: &[&str],
    ) -> Result<ParquetRecordBatchStream<StoreReader>> {
        let roots: Vec<usize> = self
            .metadata
            .schema()
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| wanted.contains(&f.name().as_str()))
            .map(|(i, _)| i)
            .collect();
        let mask = ProjectionMask::roots(self.metadata.parquet_schema(), roots);
        let reader = StoreReader::new(self.store.clone(), self.path.clone(), self.size);
        ParquetRecordBatchStreamBuilder::new_with_metadata(reader, self.metadata.clone())
            .with_row_groups(vec![row_group])
            .with_projection(mask)
            .build()
            .map_err(DataError::parquet(self.url.clone()))
    }

    /// The key of each row of `batch` (the next rows of `row_group`, from
    /// `first_row` on): the key column's value, or `file:row_group:row`.
    fn keys(
        &self,
        batch: &RecordBatch,
        row_group: usize,
        first_row: usize,
    ) -> impl Iterator<Item = String> + use<> {
        let keys = self
            .columns
            .key
            .as_deref()
            .map(|k| columns::string_values(batch.column_by_name(k).expect("projected")));
        let file_name = self.path.filename().unwrap_or_default().to_string();
        (0..batch.num_rows()).map(move |i| {
            keys.as_ref()
                .and_then(|k| k[i].clone())
                .unwrap_or_else(|| format!("{file_name}:{row_group}:{}", first_row + i))
        })
    }
}

/// Refuses a footer whose row counts the file cannot hold. They are claims
/// that size per-row buffers and the sample order, so a damaged footer
/// saying 2^40 rows would abort every rank instead of failing. The bound is
/// one byte per row: a row here is an image or a token grid with its
/// caption, which takes far more even compressed. (Run-length encoding can
/// pack rows of identical values below a byte each, but such a file is no
/// image–caption dataset.)
fn check_row_counts(metadata: &ParquetMetaData, size: u64, url: &str) -> Result<()> {
    let bad = |reason: String| DataError::Parquet {
        file: url.to_string(),
        reason,
    };
    let mut total: u64 = 0;
    for (row_group, meta) in metadata.row_groups().iter().enumerate() {
        let rows = u64::try_from(meta.num_rows()).map_err(|_| {
            bad(format!(
                "its footer says row group {row_group} has {} rows (damaged footer)",
                meta.num_rows()
            ))
        })?;
        total = total.saturating_add(rows);
        if total > size {
            return Err(bad(format!(
                "its footer claims {rows} rows in row group {row_group} ({total} so far), more \
                 than its {size} bytes can hold at a byte per row (damaged footer)"
            )));
        }
    }
    Ok(())
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
    if let Some(first) = files.first()
        && let Some(other) = files.iter().find(|f| f.payload() != first.payload())
    {
        return Err(DataError::MixedPayloads {
            first: first.url.clone(),
            first_holds: first.payload().to_string(),
            file: other.url.clone(),
            holds: other.payload().to_string(),
        });
    }
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

/// Reads the samples of one row group: only the key, payload and caption
/// columns, by range requests.
pub async fn read_unit(unit: &Unit) -> Result<Vec<RawSample>> {
    let file = &unit.file;
    let cols = &file.columns;
    let wanted: Vec<&str> = [Some(&cols.data), Some(&cols.caption), cols.key.as_ref()]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let mut stream = file.stream(unit.row_group, &wanted)?;
    let mut samples = Vec::with_capacity(unit.rows);
    while let Some(batch) = stream
        .try_next()
        .await
        .map_err(DataError::parquet(file.url.clone()))?
    {
        let column = |name: &str| batch.column_by_name(name).expect("projected");
        let data: Vec<Option<SampleData>> = match cols.payload {
            Payload::EncodedImage => columns::binary_values(column(&cols.data))
                .into_iter()
                .map(|v| v.map(SampleData::Encoded))
                .collect(),
            Payload::Tokens { .. } => columns::token_values(column(&cols.data))
                .into_iter()
                .map(|v| v.map(SampleData::Tokens))
                .collect(),
        };
        let captions = columns::string_values(column(&cols.caption));
        let keys = file.keys(&batch, unit.row_group, samples.len());
        for ((key, data), caption) in keys.zip(data).zip(captions) {
            samples.push(RawSample { key, data, caption });
        }
    }
    Ok(samples)
}

/// Reads only the keys and captions of one row group (to train the caption
/// tokenizer without reading images): `(key, caption)` per row, in row
/// order, keyed as [`read_unit`] keys them; null captions stay `None`.
pub async fn read_captions(unit: &Unit) -> Result<Vec<(String, Option<String>)>> {
    let file = &unit.file;
    let cols = &file.columns;
    let wanted: Vec<&str> = [Some(&cols.caption), cols.key.as_ref()]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let mut stream = file.stream(unit.row_group, &wanted)?;
    let mut rows = Vec::with_capacity(unit.rows);
    while let Some(batch) = stream
        .try_next()
        .await
        .map_err(DataError::parquet(file.url.clone()))?
    {
        let captions =
            columns::string_values(batch.column_by_name(&cols.caption).expect("projected"));
        let keys: Vec<String> = file.keys(&batch, unit.row_group, rows.len()).collect();
        rows.extend(keys.into_iter().zip(captions));
    }
    Ok(rows)
}
