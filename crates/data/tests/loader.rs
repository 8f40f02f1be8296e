//! The batch loader over real Parquet files on disk.

use arrow_array::{ArrayRef, BinaryArray, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use dalle_data::columns::ColumnConfig;
use dalle_data::image_ops::{Crop, Preprocess};
use dalle_data::loader::{ImageLoader, LoaderConfig};
use dalle_data::order::{Cursor, Sharding};
use dalle_data::synth::{self, SynthConfig};
use dalle_store::{Location, StoreConfig};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

fn loc(path: &Path) -> Location {
    Location::parse(path.to_str().unwrap(), &StoreConfig::default()).unwrap()
}

fn config(batch_size: usize) -> LoaderConfig {
    LoaderConfig {
        sharding: Sharding::single(batch_size),
        shuffle_window: 2,
        prefetch_batches: 2,
        decode_threads: 2,
        read_ahead_bytes: 1 << 20,
        max_bad_fraction: 0.5,
        preprocess: Preprocess {
            size: 16,
            max_pixels: 1 << 20,
            crop: Crop::Center,
        },
        columns: ColumnConfig::default(),
    }
}

fn synth(dir: &Path, count: usize) {
    let cfg = SynthConfig {
        count,
        seed: 1,
        image_size: 16,
        rows_per_file: 40,
        rows_per_group: 10,
        ..SynthConfig::default()
    };
    let files = synth::write_dataset(dir, &cfg, |_| {}).unwrap();
    assert_eq!(files.len(), count.div_ceil(40));
}

/// Writes a file with the given columns (all Utf8 except `png`, Binary).
fn write_parquet(path: &Path, columns: Vec<(&str, ArrayRef)>) {
    let fields: Vec<Field> = columns
        .iter()
        .map(|(name, a)| Field::new(*name, a.data_type().clone(), true))
        .collect();
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn png(side: u32) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::new(side, side)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

#[test]
fn every_sample_once_per_epoch_in_a_seeded_order() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), 120);
    let epoch_keys = |seed| {
        let loader = ImageLoader::start(&loc(dir.path()), config(8), Cursor::start(seed)).unwrap();
        assert_eq!(loader.units(), 12, "3 files × 4 row groups");
        let mut keys = Vec::new();
        for batch in loader.take(15) {
            let batch = batch.unwrap();
            assert_eq!(batch.epoch, 0);
            assert_eq!(batch.pixels.len(), 8 * 3 * 16 * 16);
            assert!(batch.captions.iter().all(|c| c.contains("background")));
            keys.extend(batch.keys);
        }
        keys
    };
    let keys = epoch_keys(5);
    let mut counts: HashMap<&String, usize> = HashMap::new();
    keys.iter().for_each(|k| *counts.entry(k).or_default() += 1);
    assert_eq!(counts.len(), 120, "every sample of the epoch, none twice");
    assert_eq!(keys, epoch_keys(5), "same seed, same order");
    assert_ne!(keys, epoch_keys(6), "another seed, another order");
    let mut sorted = keys.clone();
    sorted.sort();
    assert_ne!(keys, sorted, "shuffled");
}

#[test]
fn bad_rows_are_skipped_counted_and_do_not_stop_loading() {
    let dir = tempfile::tempdir().unwrap();
    let good = png(16);
    let n = 70;
    let images: Vec<Option<&[u8]>> = (0..n)
        .map(|i| match i {
            3 => None,
            4 => Some(&b"garbage"[..]),
            _ => Some(good.as_slice()),
        })
        .collect();
    let captions: Vec<Option<&str>> = (0..n)
        .map(|i| match i {
            5 => Some("   "),
            6 => None,
            _ => Some("a caption"),
        })
        .collect();
    write_parquet(
        &dir.path().join("mixed.parquet"),
        vec![
            (
                "key",
                Arc::new(StringArray::from_iter_values(
                    (0..n).map(|i| format!("k{i}")),
                )),
            ),
            ("png", Arc::new(BinaryArray::from(images))),
            ("caption", Arc::new(StringArray::from(captions))),
        ],
    );
    let mut loader = ImageLoader::start(&loc(dir.path()), config(70), Cursor::start(5)).unwrap();
    // One global batch of all 70 rows: the 4 bad ones are left out.
    let batch = loader.next().unwrap().unwrap();
    assert_eq!(batch.len(), 66);
    for bad in ["k3", "k4", "k5", "k6"] {
        assert!(
            !batch.keys.contains(&bad.to_string()),
            "{bad} must be skipped"
        );
    }
    let stats = loader.stats();
    assert_eq!(
        (stats.null_image, stats.undecodable, stats.empty_caption),
        (1, 1, 2)
    );
    assert!(stats.seen >= 70);
}

#[test]
fn too_many_bad_samples_stop_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let n = 100;
    write_parquet(
        &dir.path().join("junk.parquet"),
        vec![
            (
                "png",
                Arc::new(BinaryArray::from_iter_values(
                    (0..n).map(|_| b"junk".to_vec()),
                )),
            ),
            (
                "caption",
                Arc::new(StringArray::from_iter_values((0..n).map(|_| "c"))),
            ),
        ],
    );
    let loader = ImageLoader::start(&loc(dir.path()), config(4), Cursor::start(5)).unwrap();
    // Batches come empty (every sample bad) until enough were seen to judge.
    let err = loader
        .take(20)
        .find_map(Result::err)
        .expect("the loader must stop with an error")
        .to_string();
    assert!(err.contains("too many bad samples"), "{err}");
}

#[test]
fn hugging_face_layout_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = BinaryArray::from_iter_values((0..4).map(|_| png(20)));
    let paths = StringArray::from_iter_values((0..4).map(|i| format!("{i}.png")));
    let image = arrow_array::StructArray::from(vec![
        (
            Arc::new(Field::new("bytes", DataType::Binary, true)),
            Arc::new(bytes) as ArrayRef,
        ),
        (
            Arc::new(Field::new("path", DataType::Utf8, true)),
            Arc::new(paths) as ArrayRef,
        ),
    ]);
    write_parquet(
        &dir.path().join("hf.parquet"),
        vec![
            ("image", Arc::new(image)),
            (
                "text",
                Arc::new(StringArray::from_iter_values(
                    (0..4).map(|i| format!("t{i}")),
                )),
            ),
        ],
    );
    let batch = ImageLoader::start(&loc(dir.path()), config(4), Cursor::start(5))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(batch.len(), 4);
    assert_eq!(
        batch.pixels.len(),
        4 * 3 * 16 * 16,
        "resized and cropped to 16"
    );
    assert!(
        batch.keys[0].starts_with("hf.parquet:0:"),
        "keyed by file and row"
    );
}

#[test]
fn bad_datasets_are_clear_errors_naming_the_culprit() {
    let dir = tempfile::tempdir().unwrap();
    let err = ImageLoader::start(&loc(dir.path()), config(4), Cursor::start(5))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no Parquet files"), "{err}");

    let missing = dir.path().join("nope");
    let err = ImageLoader::start(&loc(&missing), config(4), Cursor::start(5))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nope"), "{err}");

    std::fs::write(dir.path().join("fake.parquet"), b"this is not parquet").unwrap();
    let err = ImageLoader::start(&loc(dir.path()), config(4), Cursor::start(5))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("fake.parquet") && err.contains("not a readable Parquet"),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("fake.parquet")).unwrap();

    write_parquet(
        &dir.path().join("nocaption.parquet"),
        vec![
            ("png", Arc::new(BinaryArray::from_iter_values([png(4)]))),
            ("title", Arc::new(StringArray::from_iter_values(["x"]))),
        ],
    );
    let err = ImageLoader::start(&loc(dir.path()), config(4), Cursor::start(5))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("nocaption.parquet")
            && err.contains("caption column")
            && err.contains("png, title"),
        "{err}"
    );
}
