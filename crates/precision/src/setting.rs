//! What a job asks for (`run.precision`, `dalle-sample --precision`) and
//! what it gets on a given device.

use crate::capability;
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;
use std::str::FromStr;
use tch::{Device, Kind};

/// The precision a job asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionSetting {
    /// bf16 where the device has bf16 tensor cores (CUDA compute
    /// capability 8.0 and up), fp32 elsewhere (CPUs, older GPUs).
    #[default]
    Auto,
    Fp32,
    /// fp32 storage, TF32 tensor-core matmuls and convolutions on CUDA
    /// (8.0 and up); plain fp32 elsewhere.
    Tf32,
    /// Autocast to bf16 for matmuls and convolutions, fp32 weights,
    /// optimizer state and losses.
    Bf16,
}

/// The precision a stage runs in on its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    Fp32,
    Tf32,
    Bf16,
}

impl Precision {
    /// Its name in configs, logs and benchmark lines.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }

    /// The dtype matmuls and convolutions compute in (TF32 is fp32 storage).
    pub fn compute_kind(self) -> Kind {
        match self {
            Precision::Bf16 => Kind::BFloat16,
            Precision::Fp32 | Precision::Tf32 => Kind::Float,
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl PrecisionSetting {
    pub const NAMES: [&'static str; 4] = ["auto", "fp32", "tf32", "bf16"];

    pub fn name(self) -> &'static str {
        match self {
            PrecisionSetting::Auto => "auto",
            PrecisionSetting::Fp32 => "fp32",
            PrecisionSetting::Tf32 => "tf32",
            PrecisionSetting::Bf16 => "bf16",
        }
    }

    /// What this setting means on `device`. A request the device cannot
    /// honour falls back to fp32 and says so in a log line.
    pub fn resolve(self, device: Device) -> Precision {
        let tensor_cores = capability::has_ampere_tensor_cores(device);
        match self {
            PrecisionSetting::Auto if tensor_cores => Precision::Bf16,
            PrecisionSetting::Auto | PrecisionSetting::Fp32 => Precision::Fp32,
            PrecisionSetting::Tf32 if tensor_cores => Precision::Tf32,
            PrecisionSetting::Tf32 => {
                tracing::info!(
                    ?device,
                    "precision tf32 asked for, but TF32 needs an NVIDIA GPU of compute \
                     capability 8.0 or newer: running fp32"
                );
                Precision::Fp32
            }
            PrecisionSetting::Bf16 => {
                if device.is_cuda() && !tensor_cores {
                    tracing::warn!(
                        ?device,
                        "precision bf16 on a GPU older than compute capability 8.0: no bf16 \
                         tensor cores, expect it to be slower than fp32"
                    );
                }
                Precision::Bf16
            }
        }
    }
}

impl fmt::Display for PrecisionSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PrecisionSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "auto" => Ok(PrecisionSetting::Auto),
            "fp32" => Ok(PrecisionSetting::Fp32),
            "tf32" => Ok(PrecisionSetting::Tf32),
            "bf16" => Ok(PrecisionSetting::Bf16),
            other => Err(format!(
                "unknown precision `{other}`: expected one of {}",
                Self::NAMES.join(", ")
            )),
        }
    }
}

/// Read through [`FromStr`], so a wrong value's error lists the right ones
/// (the config crate then names the key).
impl<'de> Deserialize<'de> for PrecisionSetting {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_gets_fp32_unless_bf16_is_asked_for() {
        let cpu = Device::Cpu;
        assert_eq!(PrecisionSetting::Auto.resolve(cpu), Precision::Fp32);
        assert_eq!(PrecisionSetting::Fp32.resolve(cpu), Precision::Fp32);
        assert_eq!(PrecisionSetting::Tf32.resolve(cpu), Precision::Fp32);
        assert_eq!(PrecisionSetting::Bf16.resolve(cpu), Precision::Bf16);
    }

    #[test]
    fn names_read_back() {
        for name in PrecisionSetting::NAMES {
            assert_eq!(name.parse::<PrecisionSetting>().unwrap().name(), name);
        }
        let err = "fp16".parse::<PrecisionSetting>().unwrap_err();
        assert!(err.contains("fp16") && err.contains("bf16"), "{err}");
    }
}
