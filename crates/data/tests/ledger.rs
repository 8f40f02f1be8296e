//! Sample ledgers: the keys (and, for pre-tokenized data, the token grids)
//! each rank consumes, step by step. An interrupted and resumed run, on the
//! same or another number of workers, must consume exactly what an
//! uninterrupted run does, whether the dataset holds images or tokens.

use dalle_data::columns::{ColumnConfig, Payload};
use dalle_data::image_ops::{Crop, Preprocess};
use dalle_data::loader::{ImageLoader, LoaderConfig};
use dalle_data::order::{Cursor, Sharding};
use dalle_data::parquet_source;
use dalle_data::split::Holdout;
use dalle_data::synth::{self, SynthConfig};
use dalle_data::tokens::{self, TokenRow};
use dalle_store::{Location, StoreConfig};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

const GLOBAL_BATCH: usize = 8;

/// 124 samples: 15 full global batches per epoch, 4 left over.
fn dataset(dir: &Path) {
    let cfg = SynthConfig {
        count: 124,
        seed: 2,
        image_size: 8,
        rows_per_file: 50,
        rows_per_group: 10,
        ..SynthConfig::default()
    };
    synth::write_dataset(dir, &cfg, |_| {}).unwrap();
}

fn loc(path: &Path) -> Location {
    Location::parse(path.to_str().unwrap(), &StoreConfig::default()).unwrap()
}

const TOKEN_LEN: usize = 16;

/// The token grid written for a sample (spread over the whole u16 range).
fn grid(key: &str) -> Vec<u16> {
    let i: u64 = key.parse().unwrap();
    (0..TOKEN_LEN as u64)
        .map(|j| ((i * 7919 + j * 4099 + 65_000) % 65_536) as u16)
        .collect()
}

/// Pre-tokenizes the image dataset in `images` to `out` as `dalle data
/// tokenize` does: one token file per image file, same names, keys and
/// captions, row groups of the same size (so the same units and order).
fn tokenized(images: &Path, out: &Location) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let units = parquet_source::plan_units(&loc(images), &ColumnConfig::default())
            .await
            .unwrap();
        for file_units in units.chunk_by(|a, b| Arc::ptr_eq(&a.file, &b.file)) {
            let mut rows = Vec::new();
            for unit in file_units {
                for sample in parquet_source::read_unit(unit).await.unwrap() {
                    rows.push(TokenRow {
                        tokens: grid(&sample.key),
                        caption: sample.caption.unwrap(),
                        key: sample.key,
                    });
                }
            }
            let url = &file_units[0].file.url;
            let name = url.rsplit('/').next().unwrap();
            tokens::write(out, name, &rows, 10).await.unwrap();
        }
    });
}

fn config(rank: usize, world: usize) -> LoaderConfig {
    LoaderConfig {
        sharding: Sharding {
            global_batch: GLOBAL_BATCH,
            rank,
            world,
        },
        shuffle_window: 3,
        prefetch_batches: 2,
        decode_threads: 1,
        read_ahead_bytes: 1 << 20,
        max_bad_fraction: 0.0,
        preprocess: Preprocess {
            size: 8,
            max_pixels: 1 << 20,
            crop: Crop::Center,
        },
        columns: ColumnConfig::default(),
        holdout: Holdout::none(),
    }
}

/// One consumed sample: its key and token grid (empty for images).
type Entry = (String, Vec<u16>);

/// Runs `steps` global steps on `world` ranks from `cursor`; returns each
/// step's samples (rank 0's slice, then rank 1's, …), each step's epoch,
/// and the cursor to resume from.
fn run(
    data: &Location,
    world: usize,
    cursor: Cursor,
    steps: usize,
) -> (Vec<Vec<Entry>>, Vec<u64>, Cursor) {
    let mut loaders: Vec<ImageLoader> = (0..world)
        .map(|rank| ImageLoader::start(data, config(rank, world), cursor).unwrap())
        .collect();
    let (mut ledger, mut epochs, mut last) = (Vec::new(), Vec::new(), cursor);
    for _ in 0..steps {
        let batches: Vec<_> = loaders
            .iter_mut()
            .map(|l| l.next().unwrap().unwrap())
            .collect();
        assert!(
            batches.iter().all(|b| b.cursor == batches[0].cursor),
            "ranks agree on the cursor"
        );
        assert!(batches.iter().all(|b| b.len() == GLOBAL_BATCH / world));
        assert!(
            batches.iter().all(|b| b.payload() == loaders[0].payload()),
            "batches hold what the loader says the dataset holds"
        );
        last = batches[0].cursor;
        epochs.push(batches[0].epoch);
        ledger.push(
            batches
                .iter()
                .flat_map(|b| {
                    (0..b.len()).map(|i| (b.keys[i].clone(), b.sample_tokens(i).to_vec()))
                })
                .collect(),
        );
    }
    (ledger, epochs, last)
}

#[test]
fn an_epoch_uses_every_full_batch_of_samples_once() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path());
    let (ledger, epochs, cursor) = run(&loc(dir.path()), 1, Cursor::start(7), 16);
    assert_eq!(epochs[..15], [0; 15], "15 steps in epoch 0");
    assert_eq!(epochs[15], 1, "the 4 left-over samples do not make a step");
    let epoch0: Vec<&String> = ledger[..15].iter().flatten().map(|(k, _)| k).collect();
    assert_eq!(
        epoch0.iter().collect::<HashSet<_>>().len(),
        120,
        "no sample twice in an epoch"
    );
    assert_eq!(
        cursor,
        Cursor {
            seed: 7,
            epoch: 1,
            offset: 8
        }
    );
}

#[test]
fn resumed_runs_match_an_uninterrupted_one_at_any_world_size() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path());
    let data = loc(dir.path());
    let start = Cursor::start(11);
    let (whole, _, _) = run(&data, 1, start, 24);
    for (stop, world_before, world_after) in
        [(9, 1, 1), (9, 1, 2), (13, 2, 4), (15, 4, 1), (4, 2, 2)]
    {
        let (head, _, cursor) = run(&data, world_before, start, stop);
        let (tail, _, _) = run(&data, world_after, cursor, 24 - stop);
        assert_eq!(
            [head, tail].concat(),
            whole,
            "stopped after {stop} steps on {world_before} ranks, resumed on {world_after}"
        );
    }
}

#[test]
fn world_size_must_divide_the_global_batch() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path());
    let err = ImageLoader::start(&loc(dir.path()), config(0, 3), Cursor::start(0))
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("multiple of the world size 3"),
        "{err}"
    );
}

#[test]
fn token_datasets_load_in_the_same_order_and_resume_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path());
    let data = Location::parse("memory://ledger-tokens/data", &StoreConfig::default()).unwrap();
    tokenized(dir.path(), &data);
    let loader = ImageLoader::start(&data, config(0, 1), Cursor::start(11)).unwrap();
    assert_eq!(loader.payload(), Payload::Tokens { len: TOKEN_LEN });
    assert_eq!(
        loader.units(),
        13,
        "3 files of 5, 5 and 3 row groups, as the images"
    );
    let first = loader.take(1).next().unwrap().unwrap();
    assert!(
        first.pixels.is_empty() && first.size == 0,
        "no pixels for tokens"
    );
    assert_eq!(
        (first.token_len, first.tokens.len()),
        (TOKEN_LEN, GLOBAL_BATCH * TOKEN_LEN)
    );

    // 24 steps cross the epoch boundary after step 15.
    let start = Cursor::start(11);
    let (whole, epochs, _) = run(&data, 1, start, 24);
    assert_eq!((epochs[14], epochs[15]), (0, 1));
    for (key, tokens) in whole.iter().flatten() {
        assert_eq!(tokens, &grid(key), "the tokens written for {key}");
    }
    let (images, _, _) = run(&loc(dir.path()), 1, start, 24);
    let keys = |ledger: &[Vec<Entry>]| -> Vec<Vec<String>> {
        ledger
            .iter()
            .map(|step| step.iter().map(|(k, _)| k.clone()).collect())
            .collect()
    };
    assert_eq!(
        keys(&whole),
        keys(&images),
        "the order of the images they were made from"
    );
    for (stop, world_before, world_after) in [(9, 1, 2), (13, 2, 4), (15, 4, 1), (17, 2, 1)] {
        let (head, _, cursor) = run(&data, world_before, start, stop);
        let (tail, _, _) = run(&data, world_after, cursor, 24 - stop);
        assert_eq!(
            [head, tail].concat(),
            whole,
            "stopped after {stop} steps on {world_before} ranks, resumed on {world_after}"
        );
    }
}
