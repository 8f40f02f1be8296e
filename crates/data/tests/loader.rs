//! The batch loader over real Parquet files on disk.

use arrow_array::builder::{FixedSizeListBuilder, UInt16Builder};
use arrow_array::{ArrayRef, BinaryArray, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use dalle_data::columns::{ColumnConfig, Payload};
use dalle_data::image_ops::{Crop, Preprocess};
use dalle_data::loader::{ImageLoader, LoaderConfig};
use dalle_data::order::{Cursor, Sharding};
use dalle_data::parquet_source::{self, SampleData};
use dalle_data::split::Holdout;
use dalle_data::synth::{self, SynthConfig};
use dalle_data::tokens::{self, TokenRow};
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
        holdout: Holdout::none(),
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

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// `n` token rows of `len` tokens each, keyed `{prefix}{i}`.
fn token_rows(prefix: &str, n: usize, len: usize) -> Vec<TokenRow> {
    (0..n)
        .map(|i| TokenRow {
            key: format!("{prefix}{i}"),
            caption: format!("caption {i}"),
            tokens: (0..len).map(|j| (i * 1000 + j) as u16).collect(),
        })
        .collect()
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

#[test]
fn token_batches_carry_the_written_tokens_and_skip_like_images() {
    let dir = tempfile::tempdir().unwrap();
    let n = 12;
    let mut grids = FixedSizeListBuilder::new(UInt16Builder::new(), 3)
        .with_field(Arc::new(Field::new("item", DataType::UInt16, false)));
    for i in 0..n {
        grids.values().append_slice(&[i, u16::MAX - i, 7]);
        grids.append(i != 3); // row 3: a null token grid
    }
    let captions: Vec<Option<&str>> = (0..n)
        .map(|i| match i {
            5 => Some("  "),
            6 => None,
            _ => Some("a caption"),
        })
        .collect();
    write_parquet(
        &dir.path().join("tokens.parquet"),
        vec![
            (
                "key",
                Arc::new(StringArray::from_iter_values(
                    (0..n).map(|i| format!("k{i}")),
                )),
            ),
            ("caption", Arc::new(StringArray::from(captions))),
            ("tokens", Arc::new(grids.finish())),
        ],
    );
    let mut loader = ImageLoader::start(&loc(dir.path()), config(12), Cursor::start(5)).unwrap();
    assert_eq!(loader.payload(), Payload::Tokens { len: 3 });
    let batch = loader.next().unwrap().unwrap();
    assert_eq!(batch.payload(), Payload::Tokens { len: 3 });
    assert_eq!(
        batch.len(),
        9,
        "the null grid and 2 empty captions are left out"
    );
    assert!(batch.pixels.is_empty());
    assert_eq!(batch.tokens.len(), 9 * 3);
    for (i, key) in batch.keys.iter().enumerate() {
        let row: u16 = key[1..].parse().unwrap();
        assert!(![3, 5, 6].contains(&row), "{key} must be skipped");
        assert_eq!(batch.sample_tokens(i), [row, u16::MAX - row, 7]);
    }
    // The loader may have read ahead: count this batch's share only.
    let stats = &batch.skipped;
    assert_eq!(
        (
            stats.seen,
            stats.null_image,
            stats.empty_caption,
            stats.undecodable
        ),
        (12, 1, 2, 0)
    );
}

#[test]
fn image_batches_say_they_hold_images() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), 40);
    let mut loader = ImageLoader::start(&loc(dir.path()), config(8), Cursor::start(1)).unwrap();
    assert_eq!(loader.payload(), Payload::EncodedImage);
    let batch = loader.next().unwrap().unwrap();
    assert_eq!(batch.payload(), Payload::EncodedImage);
    assert!(batch.tokens.is_empty() && batch.token_len == 0);
}

#[test]
fn images_and_tokens_or_two_grid_lengths_do_not_mix() {
    let dir = tempfile::tempdir().unwrap();
    write_parquet(
        &dir.path().join("a-images.parquet"),
        vec![
            ("png", Arc::new(BinaryArray::from_iter_values([png(4)]))),
            ("caption", Arc::new(StringArray::from_iter_values(["x"]))),
        ],
    );
    let data = loc(dir.path());
    block_on(tokens::write(
        &data,
        "b-tokens.parquet",
        &token_rows("t", 4, 6),
        2,
    ))
    .unwrap();
    let err = ImageLoader::start(&data, config(1), Cursor::start(0))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("a-images.parquet")
            && err.contains("b-tokens.parquet")
            && err.contains("encoded images")
            && err.contains("grids of 6 tokens"),
        "{err}"
    );

    std::fs::remove_file(dir.path().join("a-images.parquet")).unwrap();
    block_on(tokens::write(
        &data,
        "c-tokens.parquet",
        &token_rows("u", 4, 8),
        2,
    ))
    .unwrap();
    let err = block_on(parquet_source::plan_units(&data, &ColumnConfig::default()))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("b-tokens.parquet")
            && err.contains("c-tokens.parquet")
            && err.contains("grids of 6 tokens")
            && err.contains("grids of 8 tokens"),
        "{err}"
    );
}

#[test]
fn a_configured_image_column_is_not_taken_for_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let data = loc(dir.path());
    block_on(tokens::write(
        &data,
        "tokens.parquet",
        &token_rows("t", 4, 6),
        2,
    ))
    .unwrap();
    let mut cfg = config(4);
    cfg.columns.image = Some("jpg".into());
    let err = ImageLoader::start(&data, cfg, Cursor::start(0))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("tokens.parquet") && err.contains("image column `jpg`"),
        "{err}"
    );
}

#[test]
fn captions_are_read_without_the_payload() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), 50);
    // A file without keys: rows are keyed by file, row group and row.
    let keyless = tempfile::tempdir().unwrap();
    write_parquet(
        &keyless.path().join("nokey.parquet"),
        vec![
            (
                "jpg",
                Arc::new(BinaryArray::from_iter_values((0..3).map(|_| png(4)))),
            ),
            (
                "text",
                Arc::new(StringArray::from(vec![Some("t0"), None, Some("t2")])),
            ),
        ],
    );
    let tok = Location::parse("memory://loader-captions/tokens", &StoreConfig::default()).unwrap();
    block_on(tokens::write(&tok, "t.parquet", &token_rows("t", 5, 4), 2)).unwrap();
    let read = |data: &Location| {
        block_on(async {
            let mut out = Vec::new();
            for unit in parquet_source::plan_units(data, &ColumnConfig::default()).await? {
                let captions = parquet_source::read_captions(&unit).await?;
                let samples = parquet_source::read_unit(&unit).await?;
                out.push((captions, samples));
            }
            Ok::<_, dalle_data::DataError>(out)
        })
        .unwrap()
    };
    for data in [loc(dir.path()), loc(keyless.path()), tok.clone()] {
        let units = read(&data);
        let (captions, samples): (Vec<_>, Vec<_>) = units.into_iter().unzip();
        let captions: Vec<(String, Option<String>)> = captions.concat();
        let samples = samples.concat();
        assert!(samples.iter().all(|s| s.data.is_some()), "{}", data.url);
        let expected: Vec<(String, Option<String>)> =
            samples.into_iter().map(|s| (s.key, s.caption)).collect();
        assert_eq!(captions, expected, "{}", data.url);
    }
    let keyless = read(&loc(keyless.path()));
    assert_eq!(
        keyless[0].0,
        [
            ("nokey.parquet:0:0".to_string(), Some("t0".to_string())),
            ("nokey.parquet:0:1".to_string(), None),
            ("nokey.parquet:0:2".to_string(), Some("t2".to_string())),
        ]
    );
    let tokens = read(&tok);
    assert_eq!(tokens.len(), 3, "5 rows in row groups of 2");
    assert_eq!(
        tokens[0].0[1],
        ("t1".to_string(), Some("caption 1".to_string()))
    );
    assert_eq!(
        tokens[0].1[1].data,
        Some(SampleData::Tokens(vec![1000, 1001, 1002, 1003]))
    );
}
