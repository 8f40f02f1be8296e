//! Model FLOPs and MFU: the arithmetic a training step needs (not what the
//! kernels happen to do), against the device's peak.
//!
//! - Transformer, per token: `6·N + 12·L·d·T`, with N the parameters
//!   outside the embeddings, L the layers, d the width and T the sequence
//!   length (the PaLM paper's count: 2 FLOPs per multiply-add, forward once
//!   and backward twice; the attention term counts the whole T×T score
//!   matrix, causal masking not subtracted, as is the convention).
//! - dVAE, per image: every convolution's `2·k²·C_in·C_out·H_out·W_out`,
//!   times 3 (forward and backward), at the resolution each group runs at.
//!
//! MFU = achieved model FLOP/s ÷ the device's peak for the precision in use:
//! the table below for the GPUs we know, or `run.peak_tflops`.

use dalle_model::dvae::DvaeConfig;
use tch::Tensor;

/// Training FLOPs per token of a transformer with `non_embedding` parameters.
pub fn gpt_per_token(non_embedding: u64, layers: u64, width: u64, seq_len: u64) -> f64 {
    6.0 * non_embedding as f64 + 12.0 * (layers * width * seq_len) as f64
}

/// The transformer's parameters outside its embedding tables (lookups,
/// not matmuls: they cost no FLOPs worth counting).
pub fn gpt_non_embedding(params: &[(String, Tensor)]) -> u64 {
    const TABLES: [&str; 5] = [
        "text_emb",
        "text_pos",
        "image_emb",
        "image_row",
        "image_col",
    ];
    params
        .iter()
        .filter(|(name, _)| !TABLES.contains(&name.split('.').next().unwrap_or_default()))
        .map(|(_, p)| p.numel() as u64)
        .sum()
}

/// Training FLOPs per image of a dVAE of `config` whose parameters are
/// `params` (names as the model gives them).
///
/// Each convolution runs at the resolution of its group (the config's
/// [`DvaeConfig::encoder_side`] and [`DvaeConfig::decoder_side`]); the
/// encoder's input convolution at the image's, its output convolution at
/// the token grid's, and the decoder's the other way round. A
/// convolution's weight `(C_out, C_in, k, k)` holds `k²·C_in·C_out`
/// multiply-adds per output pixel.
pub fn dvae_per_image(params: &[(String, Tensor)], config: &DvaeConfig) -> f64 {
    let forward: f64 = params
        .iter()
        .filter(|(name, w)| name.ends_with(".w") && w.dim() == 4)
        .map(|(name, w)| {
            let side = conv_side(name, config) as f64;
            2.0 * w.numel() as f64 * side * side
        })
        .sum();
    3.0 * forward
}

/// The side of the feature maps the convolution `name` writes.
fn conv_side(name: &str, c: &DvaeConfig) -> i64 {
    let group = name
        .split('.')
        .find_map(|part| part.strip_prefix("group_")?.parse::<i64>().ok());
    let decoder = name.starts_with("decoder.");
    let (image, grid) = (c.image_size, c.grid_size());
    match (decoder, group) {
        (false, Some(g)) => c.encoder_side(g - 1),
        (false, None) if name.contains(".input.") => image,
        (false, None) => grid,
        (true, Some(g)) => c.decoder_side(g - 1),
        (true, None) if name.contains(".input.") => grid,
        (true, None) => image,
    }
}

/// The peak dense TFLOP/s of `device_name` (as the driver names it) in
/// `precision` ("bf16", "tf32", "fp32"), for the GPUs in the table.
pub fn peak_tflops(device_name: &str, precision: &str) -> Option<f64> {
    let name = device_name.to_ascii_uppercase();
    // Dense (no sparsity) SXM figures from the vendor's data sheets.
    let (bf16, tf32, fp32) = if name.contains("H200") || name.contains("H100") {
        (989.0, 494.0, 67.0)
    } else if name.contains("A100") {
        (312.0, 156.0, 19.5)
    } else {
        return None;
    };
    match precision {
        "bf16" | "fp16" => Some(bf16),
        "tf32" => Some(tf32),
        "fp32" => Some(fp32),
        _ => None,
    }
}

/// The name of GPU `ordinal` as the NVIDIA driver reports it, if there is
/// a driver (`/proc/driver/nvidia/gpus/*/information`, in bus order, which
/// is CUDA's default order).
pub fn gpu_name(ordinal: usize) -> Option<String> {
    let mut dirs: Vec<_> = std::fs::read_dir("/proc/driver/nvidia/gpus")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    dirs.sort();
    let info = std::fs::read_to_string(dirs.get(ordinal)?.join("information")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("Model:"))
        .map(|m| m.trim().to_string())
}

/// The peak TFLOP/s MFU is measured against for `job`: `run.peak_tflops`,
/// else the table's figure for its GPU in the precision the job runs in
/// (`run.precision` on that GPU), else none (CPU, or a GPU the table does
/// not know).
pub fn job_peak(job: &crate::config::JobConfig) -> Option<f64> {
    if let Some(peak) = job.run.peak_tflops {
        return Some(peak);
    }
    match dalle_model::device::parse_device(&job.run.device).ok()? {
        device @ tch::Device::Cuda(n) => {
            peak_tflops(&gpu_name(n)?, job.run.precision_on(device).name())
        }
        _ => None,
    }
}

/// Model FLOP/s achieved and, when the peak is known, the MFU (0..1).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Utilisation {
    pub tflops: f64,
    pub mfu: Option<f64>,
}

impl Utilisation {
    /// `flops_per_second` of one device against `peak_tflops`.
    pub fn of(flops_per_second: f64, peak_tflops: Option<f64>) -> Self {
        let tflops = flops_per_second / 1e12;
        Utilisation {
            tflops,
            mfu: peak_tflops.filter(|p| *p > 0.0).map(|p| tflops / p),
        }
    }
}

impl std::fmt::Display for Utilisation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.tflops >= 1.0 {
            write!(f, "{:.1} TFLOP/s", self.tflops)?;
        } else {
            write!(f, "{:.1} GFLOP/s", self.tflops * 1e3)?;
        }
        if let Some(mfu) = self.mfu {
            write!(f, " MFU {:.1}%", 100.0 * mfu)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transformer_count_is_six_n_plus_the_attention_term() {
        // GPT-3 175B's published 3.14e23 FLOPs for 300B tokens: 6·N·D
        // dominates; the attention term adds ~12·96·12288·2048 per token.
        let per_token = gpt_per_token(174_600_000_000, 96, 12_288, 2048);
        let total = per_token * 300e9;
        assert!((3.1e23..3.3e23).contains(&total), "{total:e}");
    }

    #[test]
    fn a_dvae_conv_counts_its_resolution() {
        let w = |shape: &[i64]| Tensor::zeros(shape, (tch::Kind::Float, tch::Device::Cpu));
        let params = vec![
            ("encoder.blocks.input.w".to_string(), w(&[8, 3, 7, 7])),
            (
                "encoder.blocks.group_3.block_1.res_path.conv_1.w".to_string(),
                w(&[4, 4, 3, 3]),
            ),
            (
                "encoder.blocks.output.conv.w".to_string(),
                w(&[16, 4, 1, 1]),
            ),
            (
                "decoder.blocks.group_4.block_1.res_path.conv_1.w".to_string(),
                w(&[4, 4, 1, 1]),
            ),
            ("decoder.blocks.input.b".to_string(), w(&[8])),
        ];
        let mut config = DvaeConfig {
            image_size: 64,
            ..DvaeConfig::default()
        };
        let got = dvae_per_image(&params, &config);
        // 64², 16² (group 3: a quarter), 8² (an eighth), 64² (decoder group 4).
        let want = 3.0
            * 2.0
            * (8.0 * 3.0 * 49.0 * 4096.0 + 16.0 * 9.0 * 256.0 + 64.0 * 64.0 + 16.0 * 4096.0);
        assert_eq!(got, want);
        // Downsampling by 2: group 3 still at a half (pooled once), the
        // output convolution on a 32² grid.
        config.downsample = 2;
        let got = dvae_per_image(&params, &config);
        let want = 3.0
            * 2.0
            * (8.0 * 3.0 * 49.0 * 4096.0 + 16.0 * 9.0 * 1024.0 + 64.0 * 1024.0 + 16.0 * 4096.0);
        assert_eq!(got, want);
    }

    #[test]
    fn mfu_needs_a_known_peak() {
        assert_eq!(peak_tflops("NVIDIA H200", "bf16"), Some(989.0));
        assert_eq!(peak_tflops("NVIDIA A100-SXM4-80GB", "tf32"), Some(156.0));
        assert_eq!(peak_tflops("Some CPU", "fp32"), None);
        let u = Utilisation::of(494.5e12, Some(989.0));
        assert_eq!(u.to_string(), "494.5 TFLOP/s MFU 50.0%");
        assert_eq!(Utilisation::of(2.5e9, None).to_string(), "2.5 GFLOP/s");
    }
}
