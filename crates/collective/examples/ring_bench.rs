//! Ring all-reduce bus bandwidth over loopback against a raw TCP stream in
//! the same process and run, so the ring's overhead is visible on any
//! machine:
//!
//! ```sh
//! cargo run --release -p dalle-collective --example ring_bench -- [--sizes-mb 1,16,64,256] [--worlds 2,3] [--chunk-kib 1024]
//! ```
//!
//! Bus bandwidth = 2·(W−1)/W · bytes / time (NCCL's definition): the rate
//! each rank's link carries. Two baselines, both in the same run:
//! - raw TCP: one loopback stream between two threads, one way;
//! - raw ring: the same W threads each streaming 2·(W−1)/W · bytes to their
//!   successor while reading as much from their predecessor, with no
//!   reduction: what the ring's links could carry on this machine, directly
//!   comparable to bus bandwidth. On loopback every byte costs CPU on both
//!   ends, so with more threads than cores this is the fair ceiling.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use dalle_collective::{Collective, RingConfig, RingSecret, TcpRing};

struct Args {
    sizes_mb: Vec<usize>,
    worlds: Vec<usize>,
    chunk_kib: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        sizes_mb: vec![1, 16, 64, 256],
        worlds: vec![2, 3],
        chunk_kib: 1024,
    };
    let list =
        |v: String| -> Vec<usize> { v.split(',').map(|x| x.parse().expect("a number")).collect() };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--sizes-mb" => args.sizes_mb = list(value),
            "--worlds" => args.worlds = list(value),
            "--chunk-kib" => args.chunk_kib = value.parse().expect("a number"),
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

fn reps(bytes: usize) -> usize {
    ((1usize << 30) / bytes).clamp(3, 20)
}

/// Median over repetitions of the slowest rank's all-reduce time.
fn time_ring(world: usize, bytes: usize, chunk_bytes: usize) -> Duration {
    let listeners: Vec<_> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let reps = reps(bytes);
    let times = Arc::new(Mutex::new(vec![Duration::ZERO; reps]));
    let cfg = RingConfig {
        session: 1,
        // Every rank a clone of this config, so one secret for the ring.
        secret: RingSecret::random(),
        chunk_bytes,
        ..RingConfig::default()
    };
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let (addrs, cfg, times) = (addrs.clone(), cfg.clone(), times.clone());
            thread::spawn(move || {
                let mut ring = TcpRing::connect(rank, addrs, listener, cfg).unwrap();
                let mut data = vec![rank as f32; bytes / 4];
                ring.all_reduce_sum(&mut data).unwrap(); // warm-up
                for rep in 0..reps {
                    ring.barrier().unwrap();
                    let t = Instant::now();
                    ring.all_reduce_sum(&mut data).unwrap();
                    let took = t.elapsed();
                    let mut times = times.lock().unwrap();
                    times[rep] = times[rep].max(took);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let mut times = times.lock().unwrap().clone();
    times.sort();
    times[times.len() / 2]
}

/// Median time to push `bytes` through one loopback TCP stream, in the same
/// writes of `chunk_bytes` the ring uses, until the reader has them all.
fn time_raw_tcp(bytes: usize, chunk_bytes: usize) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let reps = reps(bytes);
    let reader = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; chunk_bytes];
        for _ in 0..=reps {
            let mut left = bytes;
            while left > 0 {
                let n = left.min(buf.len());
                stream.read_exact(&mut buf[..n]).unwrap();
                left -= n;
            }
            stream.write_all(&[1]).unwrap();
        }
    });
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    let data = vec![7u8; bytes];
    let mut times = Vec::new();
    for rep in 0..=reps {
        let t = Instant::now();
        for chunk in data.chunks(chunk_bytes) {
            stream.write_all(chunk).unwrap();
        }
        stream.read_exact(&mut [0u8]).unwrap();
        if rep > 0 {
            times.push(t.elapsed()); // the first is warm-up
        }
    }
    reader.join().unwrap();
    times.sort();
    times[times.len() / 2]
}

/// Median time for W threads to stream `per_rank` bytes each around a ring
/// of plain TCP links (writer thread per rank, as the ring has).
fn time_raw_ring(world: usize, per_rank: usize, chunk_bytes: usize, reps: usize) -> Duration {
    let listeners: Vec<_> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let start = Arc::new(std::sync::Barrier::new(world));
    let times = Arc::new(Mutex::new(vec![Duration::ZERO; reps + 1]));
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let next = addrs[(rank + 1) % world];
            let (start, times) = (start.clone(), times.clone());
            thread::spawn(move || {
                let connector = thread::spawn(move || TcpStream::connect(next).unwrap());
                let (mut prev, _) = listener.accept().unwrap();
                let next = connector.join().unwrap();
                next.set_nodelay(true).unwrap();
                let mut buf = vec![0u8; chunk_bytes];
                for rep in 0..=reps {
                    start.wait();
                    let t = Instant::now();
                    let mut out = next.try_clone().unwrap();
                    let writer = thread::spawn(move || {
                        let chunk = vec![7u8; chunk_bytes];
                        let mut left = per_rank;
                        while left > 0 {
                            let n = left.min(chunk_bytes);
                            out.write_all(&chunk[..n]).unwrap();
                            left -= n;
                        }
                    });
                    let mut left = per_rank;
                    while left > 0 {
                        let n = left.min(buf.len());
                        prev.read_exact(&mut buf[..n]).unwrap();
                        left -= n;
                    }
                    writer.join().unwrap();
                    let took = t.elapsed();
                    let mut times = times.lock().unwrap();
                    times[rep] = times[rep].max(took);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let mut times = times.lock().unwrap()[1..].to_vec(); // the first is warm-up
    times.sort();
    times[times.len() / 2]
}

fn gbps(bytes: f64, t: Duration) -> f64 {
    bytes / t.as_secs_f64() / 1e9
}

fn main() {
    let args = parse_args();
    let chunk_bytes = args.chunk_kib << 10;
    println!(
        "ring all-reduce over loopback, chunk {} KiB, {} cores; median of 3-20 runs",
        args.chunk_kib,
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:>2} {:>8} {:>9} {:>11} {:>11} {:>13} {:>14} {:>13}",
        "W",
        "size MB",
        "time ms",
        "algbw GB/s",
        "busbw GB/s",
        "raw TCP GB/s",
        "raw ring GB/s",
        "bus/raw ring"
    );
    for &world in &args.worlds {
        for &mb in &args.sizes_mb {
            let bytes = mb << 20;
            let ring = time_ring(world, bytes, chunk_bytes);
            let raw = time_raw_tcp(bytes, chunk_bytes);
            let per_rank = bytes / world * 2 * (world - 1);
            let raw_ring = time_raw_ring(world, per_rank, chunk_bytes, reps(bytes));
            let algbw = gbps(bytes as f64, ring);
            let busbw = algbw * 2.0 * (world - 1) as f64 / world as f64;
            let raw_bw = gbps(bytes as f64, raw);
            let raw_ring_bw = gbps(per_rank as f64, raw_ring);
            println!(
                "{world:>2} {mb:>8} {:>9.2} {algbw:>11.2} {busbw:>11.2} {raw_bw:>13.2} {raw_ring_bw:>14.2} {:>13.2}",
                ring.as_secs_f64() * 1e3,
                busbw / raw_ring_bw
            );
        }
    }
}
