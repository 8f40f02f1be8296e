//! The validation split over real Parquet files: training loaders never
//! yield a held-out sample, at any world size, seed or file layout, for
//! images and for the token files made from them; the validation reader
//! yields the first held-out samples in file order, and only those, sliced
//! across ranks.

use dalle_data::columns::{ColumnConfig, Payload};
use dalle_data::image_ops::{Crop, Preprocess};
use dalle_data::loader::{ImageLoader, LoaderConfig, LoaderStats};
use dalle_data::order::{Cursor, Sharding};
use dalle_data::parquet_source;
use dalle_data::split::Holdout;
use dalle_data::synth::{self, SynthConfig};
use dalle_data::tokens::{self, TokenRow};
use dalle_data::validation::{self, Selection, ValidationRead, ValidationSet};
use dalle_store::{Location, StoreConfig};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

const COUNT: usize = 240;
const GLOBAL_BATCH: usize = 12;
const FRACTION: f64 = 0.25;

fn loc(path: &Path) -> Location {
    Location::parse(path.to_str().unwrap(), &StoreConfig::default()).unwrap()
}

/// The synthetic dataset in files of `rows_per_file`, row groups of
/// `rows_per_group`; its keys are `000000000`, `000000001`, … whatever the
/// layout.
fn dataset(dir: &Path, rows_per_file: usize, rows_per_group: usize) -> Location {
    let cfg = SynthConfig {
        count: COUNT,
        seed: 3,
        image_size: 16,
        rows_per_file,
        rows_per_group,
        ..SynthConfig::default()
    };
    synth::write_dataset(dir, &cfg, |_| {}).unwrap();
    loc(dir)
}

fn preprocess() -> Preprocess {
    Preprocess {
        size: 16,
        max_pixels: 1 << 20,
        crop: Crop::Center,
    }
}

fn config(rank: usize, world: usize, holdout: Holdout) -> LoaderConfig {
    LoaderConfig {
        sharding: Sharding {
            global_batch: GLOBAL_BATCH,
            rank,
            world,
        },
        shuffle_window: 2,
        prefetch_batches: 2,
        decode_threads: 1,
        read_ahead_bytes: 1 << 20,
        // Held-out samples are not bad: none are tolerated here.
        max_bad_fraction: 0.0,
        preprocess: preprocess(),
        columns: ColumnConfig::default(),
        holdout,
    }
}

fn all_keys() -> Vec<String> {
    (0..COUNT).map(|i| format!("{i:09}")).collect()
}

/// The keys one epoch trains on over `world` ranks, and the loaders' stats.
fn epoch_keys(
    data: &Location,
    world: usize,
    seed: u64,
    holdout: Holdout,
) -> (Vec<String>, LoaderStats) {
    let mut loaders: Vec<ImageLoader> = (0..world)
        .map(|rank| {
            ImageLoader::start(data, config(rank, world, holdout), Cursor::start(seed)).unwrap()
        })
        .collect();
    let mut keys = Vec::new();
    let mut stats = LoaderStats::default();
    for _ in 0..COUNT / GLOBAL_BATCH {
        for loader in &mut loaders {
            let batch = loader.next().unwrap().unwrap();
            assert_eq!(batch.epoch, 0);
            stats.add(&batch.skipped);
            keys.extend(batch.keys);
        }
    }
    (keys, stats)
}

/// Writes `images` again as token files, as `dalle data tokenize` does:
/// same file names, keys and captions.
fn tokenized(images: &Location, out: &Location) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let units = parquet_source::plan_units(images, &ColumnConfig::default())
            .await
            .unwrap();
        for file_units in units.chunk_by(|a, b| Arc::ptr_eq(&a.file, &b.file)) {
            let mut rows = Vec::new();
            for unit in file_units {
                for sample in parquet_source::read_unit(unit).await.unwrap() {
                    let i: u16 = sample.key.parse().unwrap();
                    rows.push(TokenRow {
                        tokens: vec![i, i + 1, i + 2],
                        caption: sample.caption.unwrap(),
                        key: sample.key,
                    });
                }
            }
            let url = &file_units[0].file.url;
            let name = url.rsplit('/').next().unwrap();
            tokens::write(out, name, &rows, 16).await.unwrap();
        }
    });
}

fn read(
    data: &Location,
    selection: Selection,
    max_samples: usize,
    rank: usize,
    world: usize,
) -> ValidationSet {
    validation::read(
        data,
        &ValidationRead {
            selection,
            max_samples,
            slice: (rank, world),
            preprocess: preprocess(),
            columns: ColumnConfig::default(),
            decode_threads: 2,
        },
    )
    .unwrap()
}

#[test]
fn training_never_sees_a_held_out_key_at_any_world_size_seed_or_layout() {
    let split = Holdout::fraction(FRACTION).unwrap();
    let held: HashSet<String> = all_keys()
        .into_iter()
        .filter(|k| split.holds_out(k))
        .collect();
    let trained: HashSet<String> = all_keys()
        .into_iter()
        .filter(|k| !held.contains(k))
        .collect();
    assert!(
        (40..80).contains(&held.len()),
        "{} of {COUNT} held out for a fraction of {FRACTION}",
        held.len()
    );
    let (small, large) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let layouts = [
        dataset(small.path(), 40, 10),
        dataset(large.path(), 100, 25),
    ];
    for data in &layouts {
        for (world, seed) in [(1, 1), (2, 1), (3, 1), (1, 2), (3, 5)] {
            let (keys, stats) = epoch_keys(data, world, seed, split);
            let what = format!("{} on {world} ranks, seed {seed}", data.url);
            assert_eq!(keys.len(), trained.len(), "{what}: each trained key once");
            assert_eq!(
                keys.iter().cloned().collect::<HashSet<_>>(),
                trained,
                "{what}"
            );
            assert_eq!(stats.held_out, held.len() as u64, "{what}");
            assert_eq!(
                (stats.skipped(), stats.seen),
                (0, trained.len() as u64),
                "{what}"
            );
        }
    }
    // Without a split, the same epoch trains on everything.
    let (keys, stats) = epoch_keys(&layouts[0], 2, 1, Holdout::none());
    assert_eq!((keys.len(), stats.held_out), (COUNT, 0));
}

#[test]
fn token_files_hold_out_the_keys_their_images_did() {
    let dir = tempfile::tempdir().unwrap();
    let images = dataset(dir.path(), 40, 10);
    let tokens =
        Location::parse("memory://validation-tokens/data", &StoreConfig::default()).unwrap();
    tokenized(&images, &tokens);
    let split = Holdout::fraction(FRACTION).unwrap();
    let (trained, stats) = epoch_keys(&tokens, 2, 4, split);
    assert!(trained.iter().all(|k| !split.holds_out(k)));
    assert!(stats.held_out > 0 && trained.len() as u64 + stats.held_out == COUNT as u64);

    let from_images = read(&images, Selection::HeldOut(split), 30, 0, 1);
    let from_tokens = read(&tokens, Selection::HeldOut(split), 30, 0, 1);
    assert_eq!(from_tokens.payload, Payload::Tokens { len: 3 });
    assert_eq!(
        from_images.keys, from_tokens.keys,
        "the same validation set in both stages"
    );
    assert_eq!(from_tokens.captions, from_images.captions);
    let i: u16 = from_tokens.keys[1].parse().unwrap();
    assert_eq!(from_tokens.batch(1..2).tokens, [i, i + 1, i + 2]);
}

#[test]
fn the_reader_yields_the_first_held_out_samples_sliced_across_ranks() {
    let split = Holdout::fraction(FRACTION).unwrap();
    let max = 25;
    let expected: Vec<String> = all_keys()
        .into_iter()
        .filter(|k| split.holds_out(k))
        .take(max)
        .collect();
    let (small, large) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for data in [
        dataset(small.path(), 40, 10),
        dataset(large.path(), 100, 25),
    ] {
        for world in [1, 2, 3] {
            let slices: Vec<ValidationSet> = (0..world)
                .map(|rank| read(&data, Selection::HeldOut(split), max, rank, world))
                .collect();
            let keys: Vec<String> = slices.iter().flat_map(|s| s.keys.clone()).collect();
            assert_eq!(keys, expected, "{} on {world} ranks", data.url);
            for s in &slices {
                assert_eq!(
                    (s.total, s.payload, s.size),
                    (max, Payload::EncodedImage, 16)
                );
                assert_eq!(s.pixels.len(), s.len() * 3 * 16 * 16);
                assert!(s.len() >= max / world && s.len() <= max.div_ceil(world));
                assert_eq!(s.keys[0], expected[s.first]);
            }
        }
    }
    // The kept bytes are the loader's pixels: decoded floats come back.
    let data = loc(small.path());
    let set = read(&data, Selection::HeldOut(split), 3, 0, 1);
    let batch = set.batch(0..3);
    let mut loader =
        ImageLoader::start(&data, config(0, 1, Holdout::none()), Cursor::start(0)).unwrap();
    let mut found = 0;
    for _ in 0..COUNT / GLOBAL_BATCH {
        let b = loader.next().unwrap().unwrap();
        for (i, key) in b.keys.iter().enumerate() {
            if let Some(j) = batch.keys.iter().position(|k| k == key) {
                let plane = 3 * 16 * 16;
                let ours = &batch.pixels[j * plane..(j + 1) * plane];
                let theirs = &b.pixels[i * plane..(i + 1) * plane];
                assert_eq!(ours, theirs, "{key}");
                found += 1;
            }
        }
    }
    assert_eq!(found, 3);
}

#[test]
fn a_dataset_of_its_own_is_read_from_its_start_and_an_empty_split_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 40, 10);
    let set = read(&data, Selection::All, 50, 1, 2);
    assert_eq!(set.total, 50);
    assert_eq!(set.keys, all_keys()[25..50]);
    let tiny = Holdout::fraction(1e-9).unwrap();
    let err = validation::read(
        &data,
        &ValidationRead {
            selection: Selection::HeldOut(tiny),
            max_samples: 10,
            slice: (0, 1),
            preprocess: preprocess(),
            columns: ColumnConfig::default(),
            decode_threads: 1,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(&data.url) && err.contains("no sample is held out"),
        "{err}"
    );
}
