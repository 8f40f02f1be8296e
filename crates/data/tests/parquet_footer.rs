//! A Parquet footer whose row counts the file cannot hold is refused by
//! name when the dataset is planned, instead of sizing buffers by it.

use arrow_array::{ArrayRef, BinaryArray, RecordBatch, StringArray};
use arrow_schema::{Field, Schema};
use bytes::Bytes;
use dalle_data::columns::ColumnConfig;
use dalle_data::parquet_source;
use dalle_store::{Location, StoreConfig};
use parquet::file::metadata::{ParquetMetaDataReader, ParquetMetaDataWriter};
use std::path::Path;
use std::sync::Arc;

const HUGE_ROWS: i64 = 1 << 40;

/// A small valid image dataset file: 3 rows of key, png and caption.
fn valid_file() -> Vec<u8> {
    let columns: Vec<(&str, ArrayRef)> = vec![
        (
            "key",
            Arc::new(StringArray::from_iter_values(["a", "b", "c"])),
        ),
        (
            "png",
            Arc::new(BinaryArray::from_iter_values([b"x1", b"x2", b"x3"])),
        ),
        (
            "caption",
            Arc::new(StringArray::from_iter_values(["one", "two", "three"])),
        ),
    ];
    let fields: Vec<Field> = columns
        .iter()
        .map(|(name, a)| Field::new(*name, a.data_type().clone(), true))
        .collect();
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
    .unwrap();
    let mut out = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    out
}

/// `file` with its footer rewritten, by the parquet crate's own writer, to
/// say its row group holds `rows` rows. The data pages are untouched, so
/// every offset in the footer still points where it did.
fn with_claimed_rows(file: &[u8], rows: i64) -> Vec<u8> {
    let metadata = ParquetMetaDataReader::new()
        .parse_and_finish(&Bytes::copy_from_slice(file))
        .unwrap();
    let row_groups = metadata
        .row_groups()
        .iter()
        .map(|rg| {
            rg.clone()
                .into_builder()
                .set_num_rows(rows)
                .build()
                .unwrap()
        })
        .collect();
    let metadata = metadata.into_builder().set_row_groups(row_groups).build();
    // The tail is the footer, its 4-byte length, and the magic `PAR1`.
    let footer_len = u32::from_le_bytes(file[file.len() - 8..file.len() - 4].try_into().unwrap());
    let mut out = file[..file.len() - 8 - footer_len as usize].to_vec();
    ParquetMetaDataWriter::new(&mut out, &metadata)
        .finish()
        .unwrap();
    out
}

/// Plans the dataset in `dir`: its rows, or the error.
fn plan(dir: &Path) -> Result<usize, String> {
    let location = Location::parse(dir.to_str().unwrap(), &StoreConfig::default()).unwrap();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(parquet_source::plan_units(
            &location,
            &ColumnConfig::default(),
        ))
        .map(|units| units.iter().map(|u| u.rows).sum())
        .map_err(|e| e.to_string())
}

#[test]
fn a_footer_claiming_more_rows_than_the_file_can_hold_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_file();
    let forged = with_claimed_rows(&good, HUGE_ROWS);
    // The rewritten footer is valid Parquet that really claims 2^40 rows,
    // so what refuses it below is the bound, not a parse error.
    let reparsed = ParquetMetaDataReader::new()
        .parse_and_finish(&Bytes::from(forged.clone()))
        .unwrap();
    assert_eq!(reparsed.file_metadata().num_rows(), HUGE_ROWS);
    // And the same rewrite with the true count plans as the original does.
    std::fs::write(dir.path().join("a.parquet"), with_claimed_rows(&good, 3)).unwrap();
    assert_eq!(plan(dir.path()), Ok(3));

    let path = dir.path().join("b.parquet");
    std::fs::write(&path, &forged).unwrap();
    let err = plan(dir.path()).unwrap_err();
    for part in [
        path.to_str().unwrap(),
        &HUGE_ROWS.to_string(),
        &format!("{} bytes", forged.len()),
    ] {
        assert!(err.contains(part), "{part:?} not in: {err}");
    }

    // A negative count is refused the same way.
    std::fs::write(&path, with_claimed_rows(&good, -5)).unwrap();
    let err = plan(dir.path()).unwrap_err();
    assert!(
        err.contains("b.parquet") && err.contains("-5 rows"),
        "{err}"
    );
}

#[test]
fn the_loader_reports_a_forged_row_count_before_training_instead_of_aborting() {
    use dalle_data::image_ops::{Crop, Preprocess};
    use dalle_data::loader::{ImageLoader, LoaderConfig};
    use dalle_data::order::{Cursor, Sharding};
    use dalle_data::split::Holdout;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("forged.parquet");
    std::fs::write(&path, with_claimed_rows(&valid_file(), HUGE_ROWS)).unwrap();
    let config = LoaderConfig {
        sharding: Sharding::single(2),
        shuffle_window: 2,
        prefetch_batches: 1,
        decode_threads: 1,
        read_ahead_bytes: 1 << 20,
        max_bad_fraction: 1.0,
        preprocess: Preprocess {
            size: 16,
            max_pixels: 1 << 20,
            crop: Crop::Center,
        },
        columns: ColumnConfig::default(),
        holdout: Holdout::none(),
    };
    let location = Location::parse(dir.path().to_str().unwrap(), &StoreConfig::default()).unwrap();
    // Without the bound, planning succeeds and the loader thread then sizes
    // the epoch's sample order by the claim: the process aborts.
    match ImageLoader::start(&location, config, Cursor::start(1)) {
        Ok(_) => panic!("the loader started on a forged footer"),
        Err(e) => {
            let err = e.to_string();
            assert!(
                err.contains("forged.parquet") && err.contains("damaged footer"),
                "{err}"
            );
        }
    }
}
