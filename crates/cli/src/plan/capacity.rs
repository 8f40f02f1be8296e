//! How much memory one rank has: a GPU's total memory (read from the CUDA
//! driver, loaded at run time so that CPU machines need no CUDA), or on CPU
//! this machine's available memory shared among its local ranks.

use super::memory::Target;
use anyhow::{Context, Result, bail};
use std::panic::{self, AssertUnwindSafe};

pub const GIB: f64 = (1u64 << 30) as f64;

/// One rank's memory and where the figure comes from.
#[derive(Clone, Debug, PartialEq)]
pub struct Capacity {
    pub bytes: u64,
    /// E.g. "cuda:0 (NVIDIA H200)", "1/2 of this machine's available memory".
    pub source: String,
}

/// What `run.device` = `device` trains on here, and what one of the
/// `local_ranks` ranks on this machine has unless `override_gib` says.
pub fn capacity(
    device: &str,
    local_ranks: usize,
    override_gib: Option<f64>,
) -> (Target, Result<Capacity>) {
    let device = device.trim();
    let gpus = tch::Cuda::device_count().max(0) as usize;
    let target = match device {
        "cpu" => Target::Cpu,
        "auto" if gpus == 0 => Target::Cpu,
        _ => Target::Cuda,
    };
    (
        target,
        read_capacity(device, target, gpus, local_ranks, override_gib),
    )
}

fn read_capacity(
    device: &str,
    target: Target,
    gpus: usize,
    local_ranks: usize,
    override_gib: Option<f64>,
) -> Result<Capacity> {
    if let Some(gib) = override_gib {
        if !(gib.is_finite() && gib > 0.0) {
            bail!("--device-memory-gib must be a positive number of GiB, got {gib}");
        }
        let capacity = Capacity {
            bytes: (gib * GIB) as u64,
            source: format!("--device-memory-gib {gib}"),
        };
        return Ok(capacity);
    }
    let capacity = match target {
        Target::Cpu => {
            let meminfo = std::fs::read_to_string("/proc/meminfo")
                .context("reading /proc/meminfo for the memory available")?;
            let available = mem_available(&meminfo)
                .context("/proc/meminfo has no MemAvailable line: give --device-memory-gib")?;
            let ranks = local_ranks.max(1);
            Capacity {
                bytes: available / ranks as u64,
                source: if ranks == 1 {
                    "this machine's available memory".into()
                } else {
                    format!("1/{ranks} of this machine's available memory")
                },
            }
        }
        Target::Cuda => {
            if gpus == 0 {
                bail!(
                    "run.device = {device:?} asks for a GPU, but none is visible here: give \
                     --device-memory-gib to plan for one (e.g. 80 for an H100, 141 for an H200)"
                );
            }
            // Worker i drives GPU i; `cuda:N` names one.
            let ordinals: Vec<usize> = match device.strip_prefix("cuda:") {
                Some(n) => vec![n.parse().context("run.device: the GPU index")?],
                None => (0..local_ranks.clamp(1, gpus)).collect(),
            };
            let mut smallest: Option<(usize, u64)> = None;
            for &i in &ordinals {
                let bytes = gpu_total_memory(i).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot read GPU {i}'s memory from the CUDA driver ({e}): give \
                         --device-memory-gib"
                    )
                })?;
                if smallest.is_none_or(|(_, b)| bytes < b) {
                    smallest = Some((i, bytes));
                }
            }
            let (i, bytes) = smallest.expect("at least one GPU");
            let name = dalle_train::flops::gpu_name(i).unwrap_or_else(|| "a GPU".into());
            Capacity {
                bytes,
                source: format!("cuda:{i} ({name})"),
            }
        }
    };
    Ok(capacity)
}

/// `MemAvailable` of `/proc/meminfo` text, in bytes.
pub fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// GPU `ordinal`'s total memory from the CUDA driver (no context is made).
fn gpu_total_memory(ordinal: usize) -> std::result::Result<u64, String> {
    use cudarc::driver::{result, sys};
    // SAFETY: only dlopen()s candidate names of libcuda and closes them.
    if !unsafe { sys::is_culib_present() } {
        return Err("libcuda.so cannot be loaded".into());
    }
    // cudarc panics when a symbol is missing: make that an error.
    let read = panic::catch_unwind(AssertUnwindSafe(|| -> std::result::Result<u64, String> {
        result::init().map_err(|e| e.to_string())?;
        let device = result::device::get(ordinal as i32).map_err(|e| e.to_string())?;
        // SAFETY: `device` is a handle the driver just gave.
        let bytes = unsafe { result::device::total_mem(device) }.map_err(|e| e.to_string())?;
        Ok(bytes as u64)
    }));
    read.unwrap_or_else(|_| Err("the CUDA driver library lacks a needed function".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_available_and_shares_it_among_local_ranks() {
        let text = "MemTotal:       24683568 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(mem_available(text), Some(2048 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
        let (target, one) = capacity("cpu", 1, None);
        let (one, four) = (one.unwrap(), capacity("cpu", 4, None).1.unwrap());
        assert_eq!(target, Target::Cpu);
        // Other processes move MemAvailable between the two reads.
        let ratio = one.bytes as f64 / four.bytes as f64;
        assert!((3.0..5.0).contains(&ratio), "{one:?} {four:?}");
        assert!(four.source.contains("1/4"), "{}", four.source);
    }

    #[test]
    fn an_override_wins_and_must_be_positive() {
        let (target, c) = capacity("cuda", 8, Some(141.0));
        assert_eq!(
            (target, c.unwrap().bytes),
            (Target::Cuda, (141.0 * GIB) as u64)
        );
        assert!(capacity("cpu", 1, Some(0.0)).1.is_err());
        assert!(capacity("cpu", 1, Some(f64::NAN)).1.is_err());
    }

    #[test]
    fn a_gpu_job_without_a_gpu_says_so() {
        if tch::Cuda::device_count() > 0 {
            return;
        }
        let (target, c) = capacity("cuda", 1, None);
        let err = c.unwrap_err().to_string();
        assert_eq!(target, Target::Cuda);
        assert!(
            err.contains("none is visible") && err.contains("--device-memory-gib"),
            "{err}"
        );
        assert_eq!(capacity("auto", 1, None).0, Target::Cpu);
    }
}
