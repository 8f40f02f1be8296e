//! Save and load throughput of a checkpoint shaped like a training state
//! (weights a third, optimizer moments two thirds, a few small objects),
//! for `examples/checkpoint_bench.rs` and `dalle bench checkpoint`.

use super::{CheckpointConfig, CheckpointError, Checkpointer, Result, Snapshot};
use crate::Location;
use serde::Serialize;
use std::time::Instant;

/// One measurement, printed as a JSON line by the example.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub bench: &'static str,
    pub url: String,
    pub bytes: u64,
    pub objects: usize,
    /// What the training loop waits for: `save_async` returning.
    pub handoff_s: f64,
    /// Until the manifest is written (checksums and upload included).
    pub save_s: f64,
    pub save_mb_s: f64,
    /// `load_latest`: listing, reading and verifying everything.
    pub load_s: f64,
    pub load_mb_s: f64,
}

/// Incompressible bytes, quickly (xorshift64*).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Saves a `bytes`-sized state under `run/bench/` and loads it back,
/// timing both; the stage `bench` is emptied before and after.
pub fn bench(run: Location, bytes: usize, config: CheckpointConfig) -> Result<BenchReport> {
    const STAGE: &str = "bench";
    let url = run.url.clone();
    let mut checkpointer = Checkpointer::new(run, config)?;
    checkpointer.discard_after(STAGE, 0)?;
    let weights = bytes / 3;
    let objects = vec![
        ("model.safetensors".to_string(), noise(weights, 1)),
        ("optimizer.bin".to_string(), noise(bytes - weights, 2)),
        ("rng/rank-00000.bin".to_string(), noise(5056, 3)),
        (
            "cursor.json".to_string(),
            br#"{"seed":1,"epoch":0,"offset":0}"#.to_vec(),
        ),
    ];
    let total: u64 = objects.iter().map(|(_, d)| d.len() as u64).sum();
    let count = objects.len();
    let snapshot = Snapshot {
        stage: STAGE.into(),
        step: 1,
        objects,
        external: Vec::new(),
        metadata: serde_json::json!({"bench": true}),
    };
    let started = Instant::now();
    checkpointer.save_async(snapshot)?;
    let handoff_s = started.elapsed().as_secs_f64();
    let info = checkpointer.wait()?.expect("a save was queued");
    let save_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let loaded = checkpointer.load_latest(STAGE)?.ok_or_else(|| {
        CheckpointError::Task(format!("{url}: the benchmark checkpoint did not load"))
    })?;
    let load_s = started.elapsed().as_secs_f64();
    let loaded_bytes: u64 = loaded.objects.values().map(|d| d.len() as u64).sum();
    assert_eq!((loaded.step, loaded_bytes), (info.step, total));
    drop(loaded);
    checkpointer.discard_after(STAGE, 0)?;
    let mb = total as f64 / 1e6;
    Ok(BenchReport {
        bench: "checkpoint",
        url,
        bytes: total,
        objects: count,
        handoff_s,
        save_s,
        save_mb_s: mb / save_s,
        load_s,
        load_mb_s: mb / load_s,
    })
}
