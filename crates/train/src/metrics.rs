//! Training metrics over a logging window: means of the per-step values,
//! throughput, and the share of wall time spent waiting for data.

use crate::flops::Utilisation;
use crate::{Result, TrainError};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The JSON-lines file a training loop appends its log lines to; only the
/// leading rank of a data-parallel group writes one.
pub struct MetricsFile {
    file: Option<(PathBuf, std::fs::File)>,
}

impl MetricsFile {
    /// Creates `path` when `write` is set (else a sink): truncated for a new
    /// run, appended to when `resumed`.
    pub fn create(path: &Path, write: bool, resumed: bool) -> Result<Self> {
        if !write {
            return Ok(Self { file: None });
        }
        let io_err = |source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(resumed)
            .truncate(!resumed)
            .open(path)
            .map_err(io_err)?;
        Ok(Self {
            file: Some((path.to_path_buf(), file)),
        })
    }

    pub fn append(&mut self, line: &impl Serialize) -> Result<()> {
        let Some((path, file)) = &mut self.file else {
            return Ok(());
        };
        let json = serde_json::to_string(line).expect("log lines serialise");
        writeln!(file, "{json}").map_err(|source| TrainError::Io {
            path: path.clone(),
            source,
        })
    }
}

/// What a training loop hands its caller as it goes: each log line, and
/// each evaluation on the validation set (`Held`).
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a, Line, Held> {
    Line(&'a Line),
    Validation(&'a Held),
}

/// What one dVAE step reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct DvaeStepMetrics {
    pub loss: f64,
    pub recon: f64,
    pub kl: f64,
    pub mse: f64,
    /// KL of the global batch's mean posterior to uniform, nats.
    pub usage: f64,
    pub images: usize,
    pub data_wait: Duration,
    /// Time spent in collectives (gradient averaging, metric sums).
    pub comm: Duration,
    pub step_time: Duration,
}

/// One log line of dVAE training.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DvaeLog {
    pub step: u64,
    pub loss: f64,
    /// Reconstruction term per image dimension (NLL in nats, or MSE).
    pub recon: f64,
    /// PSNR (dB) of the decoded mean on [0, 1] pixels.
    pub psnr: f64,
    /// KL to the uniform prior, nats per grid position.
    pub kl: f64,
    /// KL of the batch's mean posterior to uniform, nats (0: codes used
    /// evenly; ln K: one code).
    pub usage: f64,
    pub tau: f64,
    pub beta: f64,
    /// Weight of the usage term.
    pub usage_weight: f64,
    pub lr: f64,
    /// Distinct codes in the window's last batch.
    pub codes_used: i64,
    /// Perplexity of the code histogram of the window's last batch.
    pub code_perplexity: f64,
    pub images_per_s: f64,
    /// Share of wall time the step loop waited for the loader (0..1).
    pub data_wait: f64,
    /// Share of wall time spent communicating with other ranks (0..1).
    pub comm: f64,
    /// Model FLOP/s of this rank's device, and MFU when its peak is known.
    #[serde(flatten)]
    pub flops: Utilisation,
}

impl std::fmt::Display for DvaeLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "step {} | loss {:.4} | recon {:.4} | psnr {:.2} dB | kl {:.3} | usage kl {:.3} | tau {:.3} | \
             beta {:.3} | lr {:.2e} | codes {} ppl {:.1} | {:.1} img/s | data wait {:.1}%",
            self.step,
            self.loss,
            self.recon,
            self.psnr,
            self.kl,
            self.usage,
            self.tau,
            self.beta,
            self.lr,
            self.codes_used,
            self.code_perplexity,
            self.images_per_s,
            100.0 * self.data_wait
        )?;
        if self.comm > 0.0 {
            write!(f, " | comm {:.1}%", 100.0 * self.comm)?;
        }
        write!(f, " | {}", self.flops)
    }
}

/// Accumulates step metrics between two log lines.
#[derive(Default)]
pub struct Window {
    steps: u64,
    sum: DvaeStepMetrics,
}

impl Window {
    pub fn add(&mut self, m: DvaeStepMetrics) {
        self.steps += 1;
        self.sum.loss += m.loss;
        self.sum.recon += m.recon;
        self.sum.kl += m.kl;
        self.sum.mse += m.mse;
        self.sum.usage += m.usage;
        self.sum.images += m.images;
        self.sum.data_wait += m.data_wait;
        self.sum.comm += m.comm;
        self.sum.step_time += m.step_time;
    }

    /// Means over the window (which is then reset); schedule values and
    /// codebook figures come from the caller.
    pub fn finish(&mut self, mut line: DvaeLog, kl_positions: i64) -> DvaeLog {
        let n = self.steps.max(1) as f64;
        let wall = self.sum.step_time.as_secs_f64().max(1e-9);
        line.loss = self.sum.loss / n;
        line.recon = self.sum.recon / n;
        line.kl = self.sum.kl / n / kl_positions.max(1) as f64;
        line.psnr = dalle_model::dvae::loss::psnr(self.sum.mse / n);
        line.usage = self.sum.usage / n;
        line.images_per_s = self.sum.images as f64 / wall;
        line.data_wait = self.sum.data_wait.as_secs_f64() / wall;
        line.comm = self.sum.comm.as_secs_f64() / wall;
        *self = Self::default();
        line
    }
}

/// What one stage-2 step reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct GptStepMetrics {
    pub loss: f64,
    pub text_loss: f64,
    pub image_loss: f64,
    pub grad_norm: f64,
    pub images: usize,
    /// Text and image positions trained on.
    pub tokens: usize,
    pub truncated_captions: usize,
    pub data_wait: Duration,
    /// Time spent in collectives (gradient averaging, metric sums).
    pub comm: Duration,
    pub step_time: Duration,
}

/// One log line of stage-2 training.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GptLog {
    pub step: u64,
    pub loss: f64,
    /// Cross-entropy of the caption's tokens, nats.
    pub text_loss: f64,
    /// Cross-entropy of the image's tokens, nats.
    pub image_loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub tokens_per_s: f64,
    pub images_per_s: f64,
    /// Captions cut to the text length in this window.
    pub truncated_captions: usize,
    /// Share of wall time the step loop waited for the loader (0..1).
    pub data_wait: f64,
    /// Share of wall time spent communicating with other ranks (0..1).
    pub comm: f64,
    /// Model FLOP/s of this rank's device, and MFU when its peak is known.
    #[serde(flatten)]
    pub flops: Utilisation,
}

impl std::fmt::Display for GptLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "step {} | loss {:.4} | text {:.4} | image {:.4} | grad norm {:.3} | lr {:.2e} | \
             {:.0} tok/s | {:.1} img/s | data wait {:.1}%",
            self.step,
            self.loss,
            self.text_loss,
            self.image_loss,
            self.grad_norm,
            self.lr,
            self.tokens_per_s,
            self.images_per_s,
            100.0 * self.data_wait
        )?;
        if self.comm > 0.0 {
            write!(f, " | comm {:.1}%", 100.0 * self.comm)?;
        }
        write!(f, " | {}", self.flops)?;
        if self.truncated_captions > 0 {
            write!(f, " | {} captions truncated", self.truncated_captions)?;
        }
        Ok(())
    }
}

/// Accumulates stage-2 step metrics between two log lines.
#[derive(Default)]
pub struct GptWindow {
    steps: u64,
    sum: GptStepMetrics,
}

impl GptWindow {
    pub fn add(&mut self, m: GptStepMetrics) {
        self.steps += 1;
        let s = &mut self.sum;
        s.loss += m.loss;
        s.text_loss += m.text_loss;
        s.image_loss += m.image_loss;
        s.grad_norm += m.grad_norm;
        s.images += m.images;
        s.tokens += m.tokens;
        s.truncated_captions += m.truncated_captions;
        s.data_wait += m.data_wait;
        s.comm += m.comm;
        s.step_time += m.step_time;
    }

    /// Means over the window (which is then reset); the step and learning
    /// rate come from the caller.
    pub fn finish(&mut self, step: u64, lr: f64) -> GptLog {
        let n = self.steps.max(1) as f64;
        let wall = self.sum.step_time.as_secs_f64().max(1e-9);
        let s = &self.sum;
        let line = GptLog {
            step,
            loss: s.loss / n,
            text_loss: s.text_loss / n,
            image_loss: s.image_loss / n,
            grad_norm: s.grad_norm / n,
            lr,
            tokens_per_s: s.tokens as f64 / wall,
            images_per_s: s.images as f64 / wall,
            truncated_captions: s.truncated_captions,
            data_wait: s.data_wait.as_secs_f64() / wall,
            comm: s.comm.as_secs_f64() / wall,
            flops: Utilisation::default(),
        };
        *self = Self::default();
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_means_throughput_and_wait_share() {
        let mut w = Window::default();
        for loss in [1.0, 3.0] {
            w.add(DvaeStepMetrics {
                loss,
                kl: 64.0,
                mse: 0.01,
                images: 10,
                data_wait: Duration::from_millis(50),
                step_time: Duration::from_millis(500),
                ..Default::default()
            });
        }
        let line = w.finish(DvaeLog::default(), 16);
        assert_eq!(line.loss, 2.0);
        assert_eq!(line.kl, 4.0);
        assert!((line.psnr - 20.0).abs() < 1e-9);
        assert!((line.images_per_s - 20.0).abs() < 1e-9);
        assert!((line.data_wait - 0.1).abs() < 1e-9);
        let text = line.to_string();
        assert!(
            text.contains("step 0") && text.contains("img/s") && text.contains("data wait 10.0%")
        );
    }

    #[test]
    fn gpt_window_means_token_throughput_and_truncations() {
        let mut w = GptWindow::default();
        for (loss, truncated) in [(2.0, 0), (4.0, 3)] {
            w.add(GptStepMetrics {
                loss,
                text_loss: 1.0,
                image_loss: loss,
                images: 4,
                tokens: 400,
                truncated_captions: truncated,
                data_wait: Duration::from_millis(20),
                comm: Duration::from_millis(40),
                step_time: Duration::from_millis(200),
                ..Default::default()
            });
        }
        let line = w.finish(7, 1e-3);
        assert_eq!((line.step, line.loss, line.image_loss), (7, 3.0, 3.0));
        assert!((line.tokens_per_s - 2000.0).abs() < 1e-6);
        assert!((line.data_wait - 0.1).abs() < 1e-9);
        let text = line.to_string();
        assert!(
            text.contains("tok/s") && text.contains("3 captions truncated"),
            "{text}"
        );
        assert_eq!(w.finish(8, 1e-3).truncated_captions, 0, "the window resets");
    }
}
