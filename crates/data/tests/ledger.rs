//! Sample ledgers: the keys each rank consumes, step by step. An
//! interrupted and resumed run, on the same or another number of workers,
//! must consume exactly what an uninterrupted run does.

use dalle_data::columns::ColumnConfig;
use dalle_data::image_ops::{Crop, Preprocess};
use dalle_data::loader::{ImageLoader, LoaderConfig};
use dalle_data::order::{Cursor, Sharding};
use dalle_data::synth::{self, SynthConfig};
use dalle_store::{Location, StoreConfig};
use std::collections::HashSet;
use std::path::Path;

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
    }
}

/// Runs `steps` global steps on `world` ranks from `cursor`; returns each
/// step's keys (rank 0's slice, then rank 1's, …), each step's epoch, and
/// the cursor to resume from.
fn run(
    dir: &Path,
    world: usize,
    cursor: Cursor,
    steps: usize,
) -> (Vec<Vec<String>>, Vec<u64>, Cursor) {
    let mut loaders: Vec<ImageLoader> = (0..world)
        .map(|rank| ImageLoader::start(&loc(dir), config(rank, world), cursor).unwrap())
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
        last = batches[0].cursor;
        epochs.push(batches[0].epoch);
        ledger.push(batches.into_iter().flat_map(|b| b.keys).collect());
    }
    (ledger, epochs, last)
}

#[test]
fn an_epoch_uses_every_full_batch_of_samples_once() {
    let dir = tempfile::tempdir().unwrap();
    dataset(dir.path());
    let (ledger, epochs, cursor) = run(dir.path(), 1, Cursor::start(7), 16);
    assert_eq!(epochs[..15], [0; 15], "15 steps in epoch 0");
    assert_eq!(epochs[15], 1, "the 4 left-over samples do not make a step");
    let epoch0: Vec<&String> = ledger[..15].iter().flatten().collect();
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
    let start = Cursor::start(11);
    let (whole, _, _) = run(dir.path(), 1, start, 24);
    for (stop, world_before, world_after) in
        [(9, 1, 1), (9, 1, 2), (13, 2, 4), (15, 4, 1), (4, 2, 2)]
    {
        let (head, _, cursor) = run(dir.path(), world_before, start, stop);
        let (tail, _, _) = run(dir.path(), world_after, cursor, 24 - stop);
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
