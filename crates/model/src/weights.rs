//! Weight files: safetensors with a string metadata map, so a file carries
//! the config needed to rebuild its model.
//!
//! Writes are atomic (temporary file, then rename): a reader never sees a
//! half-written file. Loading checks every expected tensor by name and shape
//! and names the first one that is missing, mis-shaped or unexpected.

use crate::{ModelError, Result};
use safetensors::{Dtype, SafeTensors, View};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Tensors and metadata read from one safetensors file, on the CPU.
pub struct WeightFile {
    pub path: PathBuf,
    pub metadata: HashMap<String, String>,
    pub tensors: BTreeMap<String, Tensor>,
}

/// A host copy of a tensor in the layout safetensors writes.
struct HostTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &HostTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn to_host(t: &Tensor) -> Result<HostTensor> {
    let t = t
        .detach()
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    let values = Vec::<f32>::try_from(t.flatten(0, -1))?;
    Ok(HostTensor {
        dtype: Dtype::F32,
        shape: t.size().iter().map(|&d| d as usize).collect(),
        bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    })
}

/// Serialises `tensors` (as float32) and `metadata` as a safetensors file.
pub fn to_bytes(
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
    what: &Path,
) -> Result<Vec<u8>> {
    let host: Vec<(String, HostTensor)> = tensors
        .iter()
        .map(|(name, t)| Ok((name.clone(), to_host(t)?)))
        .collect::<Result<_>>()?;
    safetensors::serialize(host.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata)).map_err(|e| {
        ModelError::Format {
            path: what.to_path_buf(),
            reason: e.to_string(),
        }
    })
}

/// Writes `tensors` (as float32) and `metadata` to `path` atomically.
pub fn save(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let io_err = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes = to_bytes(tensors, metadata, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err)?;
    }
    let tmp = path.with_extension("safetensors.partial");
    std::fs::write(&tmp, bytes).map_err(io_err)?;
    std::fs::rename(&tmp, path).map_err(io_err)
}

/// Reads every tensor of a safetensors file onto the CPU, plus its metadata.
pub fn read(path: &Path) -> Result<WeightFile> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    from_bytes(&bytes, path)
}

/// Parses a safetensors file already in memory (read from any store);
/// `source` names it in errors.
pub fn from_bytes(bytes: &[u8], source: &Path) -> Result<WeightFile> {
    let path = source;
    let format_err = |e: safetensors::SafeTensorError| ModelError::Format {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(format_err)?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let file = SafeTensors::deserialize(bytes).map_err(format_err)?;
    let mut tensors = BTreeMap::new();
    for (name, view) in file.tensors() {
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F64 => Kind::Double,
            other => {
                return Err(ModelError::UnsupportedDtype {
                    path: path.to_path_buf(),
                    name,
                    dtype: format!("{other:?}"),
                });
            }
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        tensors.insert(name, t.to_kind(Kind::Float));
    }
    Ok(WeightFile {
        path: path.to_path_buf(),
        metadata,
        tensors,
    })
}

/// The metadata key naming a file's format.
const FORMAT_KEY: &str = "format";

/// Metadata of a model's weights file: its `format` and its config as JSON
/// under `config_key`, so the file alone rebuilds the model.
pub fn tagged_metadata(
    format: &str,
    config_key: &str,
    config: &impl Serialize,
) -> HashMap<String, String> {
    let config = serde_json::to_string(config).expect("config serialises");
    HashMap::from([
        (FORMAT_KEY.to_string(), format.to_string()),
        (config_key.to_string(), config),
    ])
}

/// The config of a file written with [`tagged_metadata`], refusing other
/// formats; `what` names the model in errors ("transformer").
pub fn tagged_config<T: DeserializeOwned>(
    file: &WeightFile,
    format: &str,
    config_key: &str,
    what: &str,
) -> Result<T> {
    let format_err = |reason: String| ModelError::Format {
        path: file.path.clone(),
        reason,
    };
    match file.metadata.get(FORMAT_KEY) {
        Some(f) if f == format => {}
        other => {
            return Err(format_err(format!(
                "format {other:?}, expected `{format}`: not a dalle-rs {what}"
            )));
        }
    }
    let json = file
        .metadata
        .get(config_key)
        .ok_or_else(|| format_err(format!("no `{config_key}` metadata")))?;
    serde_json::from_str(json).map_err(|e| format_err(format!("bad `{config_key}`: {e}")))
}

impl WeightFile {
    /// Copies into every model variable the file tensor named
    /// `file_prefix + (variable name without model_prefix)`. Every variable
    /// under `model_prefix` must be found with its exact shape, and every
    /// file tensor under `file_prefix` must be used.
    pub fn assign(
        &self,
        variables: &HashMap<String, Tensor>,
        model_prefix: &str,
        file_prefix: &str,
    ) -> Result<()> {
        let mut used = std::collections::HashSet::new();
        let mut names: Vec<&String> = variables
            .keys()
            .filter(|n| n.starts_with(model_prefix))
            .collect();
        names.sort();
        for var_name in names {
            let mut var = variables[var_name].shallow_clone();
            let file_name = format!("{file_prefix}{}", &var_name[model_prefix.len()..]);
            let Some(src) = self.tensors.get(&file_name) else {
                return Err(ModelError::MissingTensor {
                    path: self.path.clone(),
                    name: file_name,
                    expected: var.size(),
                });
            };
            if src.size() != var.size() {
                return Err(ModelError::ShapeMismatch {
                    path: self.path.clone(),
                    name: file_name,
                    expected: var.size(),
                    found: src.size(),
                });
            }
            tch::no_grad(|| var.copy_(src));
            used.insert(file_name);
        }
        if let Some(extra) = self
            .tensors
            .keys()
            .find(|n| n.starts_with(file_prefix) && !used.contains(*n))
        {
            return Err(ModelError::UnexpectedTensor {
                path: self.path.clone(),
                name: extra.clone(),
            });
        }
        Ok(())
    }
}
