//! What a worker tells its coordinator beside its step figures (see
//! `dalle_runtime::worker::UsageReport`): the memory it uses, the model
//! FLOP/s and MFU of its last training log line, its last checkpoint save.
//!
//! Memory is measured at step ends by [`Sampler`]: on a CUDA slot the
//! device's memory in use as the driver reports it (cuMemGetInfo: the whole
//! device, libtorch's cache included; libtorch does not expose its
//! allocator's statistics through tch), elsewhere the process's resident
//! set (VmRSS and VmHWM of `/proc/self/status`), each labelled so. The FLOP/s
//! and the checkpoint figures are what the training loops and the
//! checkpointer log: the [`Capture`] layer, installed with the logging,
//! keeps the latest of them.

use dalle_runtime::worker::{MemoryKind, UsageReport};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

/// The latest figures the logs carried (this process's).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Logged {
    /// `tflops` of the last training log line.
    pub model_tflops: Option<f64>,
    /// `mfu` of the last training log line.
    pub mfu: Option<f64>,
    /// Seconds and bytes of the last committed checkpoint save.
    pub checkpoint: Option<(f64, u64)>,
}

static LOGGED: Mutex<Logged> = Mutex::new(Logged {
    model_tflops: None,
    mfu: None,
    checkpoint: None,
});

/// What the logs carried last.
pub fn logged() -> Logged {
    *LOGGED.lock().unwrap_or_else(|e| e.into_inner())
}

/// A tracing layer that keeps the figures of training log lines (targets
/// `dalle_train::*`, fields `tflops` and `mfu`) and of checkpoint commits
/// (`dalle_store::checkpoint`, "committed step N (X MB in Y s)").
pub struct Capture;

impl Capture {
    /// The events it looks at, whatever the log filter shows.
    pub fn targets() -> tracing_subscriber::filter::Targets {
        tracing_subscriber::filter::Targets::new()
            .with_target("dalle_train", tracing::Level::INFO)
            .with_target("dalle_store::checkpoint", tracing::Level::INFO)
    }
}

#[derive(Default)]
struct Figures {
    tflops: Option<f64>,
    mfu: Option<f64>,
    message: Option<String>,
}

impl Visit for Figures {
    fn record_f64(&mut self, field: &Field, value: f64) {
        match field.name() {
            "tflops" => self.tflops = Some(value),
            "mfu" => self.mfu = Some(value),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = Some(format!("{value:?}"));
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let target = event.metadata().target();
        let mut figures = Figures::default();
        event.record(&mut figures);
        let mut logged = LOGGED.lock().unwrap_or_else(|e| e.into_inner());
        if target.starts_with("dalle_train") && figures.tflops.is_some() {
            logged.model_tflops = figures.tflops;
            logged.mfu = figures.mfu;
        } else if target.starts_with("dalle_store::checkpoint")
            && let Some(save) = figures.message.as_deref().and_then(committed)
        {
            logged.checkpoint = Some(save);
        }
    }
}

/// Seconds and bytes of a checkpointer's "…: committed step N (X MB in Y
/// s)" line.
fn committed(message: &str) -> Option<(f64, u64)> {
    let (_, rest) = message.split_once(": committed step ")?;
    let (_, figures) = rest.split_once(" (")?;
    let (mb, rest) = figures.split_once(" MB in ")?;
    let seconds = rest.strip_suffix(" s)")?;
    let mb: f64 = mb.trim().parse().ok()?;
    Some((seconds.trim().parse().ok()?, (mb * 1e6).round() as u64))
}

/// Measures the memory a worker uses, at most once per [`Sampler::EVERY`].
pub struct Sampler {
    cuda: Option<Cuda>,
    peak: u64,
    last: Option<(Instant, UsageReport)>,
}

impl Sampler {
    /// How often memory is measured (heartbeats come about as often).
    pub const EVERY: Duration = Duration::from_secs(1);

    /// For a worker driving `device` ("cpu", "cuda:N").
    pub fn new(device: &str) -> Self {
        let cuda = match dalle_model::device::parse_device(device) {
            Ok(tch::Device::Cuda(ordinal)) => Some(Cuda::new(ordinal)),
            _ => None,
        };
        Sampler {
            cuda,
            peak: 0,
            last: None,
        }
    }

    /// The figures to send now: memory (measured again when due) and what
    /// the logs carried last.
    pub fn sample(&mut self) -> UsageReport {
        let now = Instant::now();
        let mut usage = match self.last {
            Some((at, usage)) if now.duration_since(at) < Self::EVERY => usage,
            _ => {
                let usage = self.measure();
                self.last = Some((now, usage));
                usage
            }
        };
        let logged = logged();
        usage.model_tflops = logged.model_tflops;
        usage.mfu = logged.mfu;
        usage.checkpoint_seconds = logged.checkpoint.map(|(s, _)| s);
        usage.checkpoint_bytes = logged.checkpoint.map(|(_, b)| b);
        usage
    }

    fn measure(&mut self) -> UsageReport {
        if let Some(cuda) = &mut self.cuda {
            match cuda.used() {
                Ok(used) => {
                    self.peak = self.peak.max(used);
                    return UsageReport {
                        memory_bytes: Some(used),
                        memory_peak_bytes: Some(self.peak),
                        memory_kind: MemoryKind::CudaDevice,
                        ..UsageReport::default()
                    };
                }
                Err(e) => {
                    tracing::warn!(
                        "cannot read cuda:{}'s memory from the CUDA driver ({e}): reporting \
                         this process's resident set instead",
                        cuda.ordinal
                    );
                    self.cuda = None;
                }
            }
        }
        let (rss, peak) = std::fs::read_to_string("/proc/self/status")
            .map(|text| (status_kib(&text, "VmRSS:"), status_kib(&text, "VmHWM:")))
            .unwrap_or_default();
        UsageReport {
            memory_bytes: rss.map(|k| k * 1024),
            memory_peak_bytes: peak.map(|k| k * 1024),
            memory_kind: MemoryKind::ProcessRss,
            ..UsageReport::default()
        }
    }
}

/// A `Name:   123 kB` line of `/proc/self/status`, in KiB.
fn status_kib(status: &str, name: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(name))?;
    line[name.len()..].split_whitespace().next()?.parse().ok()
}

/// One GPU through the CUDA driver (loaded at run time).
struct Cuda {
    ordinal: usize,
    /// Its primary context (libtorch's), retained once.
    context: Option<cudarc::driver::sys::CUcontext>,
}

// SAFETY: a CUcontext is a handle the driver accepts from any thread.
unsafe impl Send for Cuda {}

impl Cuda {
    fn new(ordinal: usize) -> Self {
        Cuda {
            ordinal,
            context: None,
        }
    }

    /// Bytes in use on the device: total - free.
    fn used(&mut self) -> Result<u64, String> {
        use cudarc::driver::{result, sys};
        use std::panic::{AssertUnwindSafe, catch_unwind};
        // SAFETY: only dlopen()s candidate names of libcuda and closes them.
        if self.context.is_none() && !unsafe { sys::is_culib_present() } {
            return Err("libcuda.so cannot be loaded".into());
        }
        let ordinal = self.ordinal;
        let context = &mut self.context;
        // cudarc panics when a symbol is missing: make that an error.
        let read = catch_unwind(AssertUnwindSafe(|| -> Result<u64, String> {
            let ctx = match *context {
                Some(ctx) => ctx,
                None => {
                    result::init().map_err(|e| e.to_string())?;
                    let device = result::device::get(ordinal as i32).map_err(|e| e.to_string())?;
                    // SAFETY: `device` is a handle the driver just gave; the
                    // primary context is the one libtorch trains in, kept
                    // for the life of the process.
                    let ctx = unsafe { result::primary_ctx::retain(device) }
                        .map_err(|e| e.to_string())?;
                    *context = Some(ctx);
                    ctx
                }
            };
            // SAFETY: `ctx` is a retained primary context; making it
            // current on this (the training) thread changes nothing where
            // libtorch made it current already.
            unsafe { result::ctx::set_current(ctx) }.map_err(|e| e.to_string())?;
            let (free, total) = result::mem_get_info().map_err(|e| e.to_string())?;
            Ok(total.saturating_sub(free) as u64)
        }));
        read.unwrap_or_else(|_| Err("the CUDA driver library lacks a needed function".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_checkpoint_commits_and_proc_status() {
        assert_eq!(
            committed(
                "file:///runs/a/checkpoints/dvae/step-20: committed step 20 (12.5 MB in 0.31 s)"
            ),
            Some((0.31, 12_500_000))
        );
        assert_eq!(committed("something else (1 MB in 2 s)"), None);
        let status = "Name:\tdalle\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(1024));
        assert_eq!(status_kib(status, "VmHWM:"), Some(2048));
        assert_eq!(status_kib(status, "VmSwap:"), None);
    }

    #[test]
    fn a_cpu_worker_reports_its_resident_set() {
        let mut sampler = Sampler::new("cpu");
        let usage = sampler.sample();
        assert_eq!(usage.memory_kind, MemoryKind::ProcessRss);
        let (rss, peak) = (
            usage.memory_bytes.unwrap(),
            usage.memory_peak_bytes.unwrap(),
        );
        assert!(rss > 0 && peak >= rss, "{usage:?}");
    }
}
