//! Checkpoint save and load throughput, as JSON lines (one per target and
//! size), to local disk and optionally to S3:
//!
//! ```sh
//! cargo run --release -p dalle-store --example checkpoint_bench -- \
//!     [--dir DIR] [--garage | --s3 s3://bucket/prefix] [SIZE_MB ...]
//! ```
//!
//! Sizes default to 100 and 1000 MB. `--dir` picks the local disk (default:
//! a temporary directory). `--garage` starts a throwaway Garage on loopback
//! (`garage` from PATH, `$GARAGE_BIN` or `~/.cargo/bin`, as the tests do);
//! `--s3` uses an existing server: `DALLE_STORE__ENDPOINT` and the standard
//! `AWS_*` variables.

#[path = "../../../tests/support/garage.rs"]
#[allow(dead_code)]
mod garage;

use dalle_store::checkpoint::{CheckpointConfig, bench};
use dalle_store::{Location, StoreConfig};

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut dir, mut s3, mut start_garage, mut sizes) = (None, None, false, Vec::new());
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--dir" => dir = args.next(),
            "--s3" => s3 = args.next(),
            "--garage" => start_garage = true,
            size => sizes.push(size.parse::<f64>().unwrap_or_else(|_| {
                panic!("`{size}`: expected --dir DIR, --s3 URL, --garage or a size in MB")
            })),
        }
    }
    if sizes.is_empty() {
        sizes = vec![100.0, 1000.0];
    }
    let mut store_config = StoreConfig {
        endpoint: std::env::var("DALLE_STORE__ENDPOINT").ok(),
        ..StoreConfig::default()
    };
    // Kept alive (the server stops when it is dropped).
    let _garage = start_garage.then(|| {
        let garage = garage::Garage::start();
        for (key, value) in garage.env() {
            // Single-threaded still: no runtime has started.
            unsafe { std::env::set_var(key, value) };
        }
        store_config.endpoint = Some(garage.endpoint.clone());
        store_config.region = Some(garage.region.clone());
        s3 = Some(format!("s3://{}/bench", garage.bucket));
        garage
    });

    let temp = tempfile::tempdir().unwrap();
    let local = dir.unwrap_or_else(|| temp.path().display().to_string());
    let mut targets = vec![local];
    targets.extend(s3);
    for target in &targets {
        for &mb in &sizes {
            let run = Location::parse(target, &store_config).unwrap();
            let report = bench(run, (mb * 1e6) as usize, CheckpointConfig::default())
                .unwrap_or_else(|e| panic!("{target}: {e}"));
            println!("{}", serde_json::to_string(&report).unwrap());
            eprintln!(
                "{target}: {:.0} MB  save {:.0} MB/s ({:.2} s, save_async returned in {:.3} s)  load {:.0} MB/s ({:.2} s)",
                report.bytes as f64 / 1e6,
                report.save_mb_s,
                report.save_s,
                report.handoff_s,
                report.load_mb_s,
                report.load_s
            );
        }
    }
}
