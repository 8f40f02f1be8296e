//! Pre-tokenized datasets for stage 2: Parquet of (`key`, `caption`,
//! `tokens`), where `tokens` is the dVAE's image-token grid, row-major, as a
//! fixed-size list of u16. Written to any store location; a crash mid-write
//! leaves no object behind (uploads complete only on close).

use crate::{DataError, Result};
use arrow_array::builder::{FixedSizeListBuilder, UInt16Builder};
use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use dalle_store::Location;
use dalle_store::object_store::buffered::BufWriter;
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use std::sync::Arc;

/// One tokenized sample.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenRow {
    pub key: String,
    pub caption: String,
    pub tokens: Vec<u16>,
}

pub fn schema(grid_len: i32) -> Arc<Schema> {
    let item = Arc::new(Field::new("item", DataType::UInt16, false));
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("caption", DataType::Utf8, false),
        Field::new("tokens", DataType::FixedSizeList(item, grid_len), false),
    ]))
}

/// Writes `rows` as the object `name` under `location`, in row groups of
/// `rows_per_group`.
pub async fn write(
    location: &Location,
    name: &str,
    rows: &[TokenRow],
    rows_per_group: usize,
) -> Result<()> {
    let path = location.child(name);
    let url = location.describe(&path);
    let grid_len = rows.first().map_or(0, |r| r.tokens.len());
    if let Some(bad) = rows.iter().find(|r| r.tokens.len() != grid_len) {
        return Err(DataError::Config(format!(
            "{url}: sample {} has {} tokens, the others {grid_len}",
            bad.key,
            bad.tokens.len()
        )));
    }
    let schema = schema(grid_len as i32);
    let mut tokens = FixedSizeListBuilder::new(UInt16Builder::new(), grid_len as i32)
        .with_field(Arc::new(Field::new("item", DataType::UInt16, false)));
    for row in rows {
        tokens.values().append_slice(&row.tokens);
        tokens.append(true);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.key))),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| &r.caption),
        )),
        Arc::new(tokens.finish()),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| DataError::Config(e.to_string()))?;
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(rows_per_group.max(1)))
        .set_compression(Compression::ZSTD(Default::default()))
        .build();
    let sink = BufWriter::new(location.store.clone(), path);
    let mut writer = AsyncArrowWriter::try_new(sink, schema, Some(props))
        .map_err(DataError::parquet(url.clone()))?;
    writer
        .write(&batch)
        .await
        .map_err(DataError::parquet(url.clone()))?;
    writer.close().await.map_err(DataError::parquet(url))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::cast::AsArray;
    use arrow_array::types::UInt16Type;
    use dalle_store::StoreConfig;
    use dalle_store::object_store::ObjectStoreExt;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    #[test]
    fn token_files_round_trip_through_a_store() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let location =
            Location::parse("memory://tokens-test/out", &StoreConfig::default()).unwrap();
        let rows: Vec<TokenRow> = (0..5u16)
            .map(|i| TokenRow {
                key: format!("k{i}"),
                caption: format!("caption {i}"),
                tokens: vec![i, 65535, 7, i * 2],
            })
            .collect();
        rt.block_on(write(&location, "part-0.parquet", &rows, 2))
            .unwrap();
        let bytes = rt
            .block_on(async {
                location
                    .store
                    .get(&location.child("part-0.parquet"))
                    .await?
                    .bytes()
                    .await
            })
            .unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap();
        assert_eq!(reader.metadata().num_row_groups(), 3);
        let batches: Vec<RecordBatch> = reader.build().unwrap().map(Result::unwrap).collect();
        let batch = arrow_select_concat(&batches);
        let lists = batch.column(2).as_fixed_size_list();
        assert_eq!(lists.value_length(), 4);
        let values: Vec<u16> = lists
            .values()
            .as_primitive::<UInt16Type>()
            .values()
            .to_vec();
        let expected: Vec<u16> = rows.iter().flat_map(|r| r.tokens.clone()).collect();
        assert_eq!(values, expected);
        assert_eq!(batch.column(0).as_string::<i32>().value(4), "k4");
    }

    /// The test's few batches as one.
    fn arrow_select_concat(batches: &[RecordBatch]) -> RecordBatch {
        let schema = batches[0].schema();
        let columns = (0..schema.fields().len())
            .map(|c| {
                let arrays: Vec<&dyn arrow_array::Array> =
                    batches.iter().map(|b| b.column(c).as_ref()).collect();
                arrow_select::concat::concat(&arrays).unwrap()
            })
            .collect();
        RecordBatch::try_new(schema, columns).unwrap()
    }
}
