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

/// The dtype a weights file stores its tensors in. Training and
/// checkpoints keep fp32 (the master weights); bf16 halves a sampler
/// bundle (`dalle export --dtype bf16`). Either loads as fp32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StoredDtype {
    #[default]
    F32,
    Bf16,
}

impl StoredDtype {
    pub fn name(self) -> &'static str {
        match self {
            StoredDtype::F32 => "fp32",
            StoredDtype::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for StoredDtype {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "fp32" | "f32" => Ok(StoredDtype::F32),
            "bf16" => Ok(StoredDtype::Bf16),
            other => Err(format!(
                "unknown weight dtype `{other}`: expected fp32 or bf16"
            )),
        }
    }
}

fn to_host(t: &Tensor, dtype: StoredDtype) -> Result<HostTensor> {
    let t = t.detach().to_device(Device::Cpu);
    let shape = t.size().iter().map(|&d| d as usize).collect();
    let (dtype, bytes) = match dtype {
        StoredDtype::F32 => {
            let t = t.to_kind(Kind::Float).contiguous();
            let values = Vec::<f32>::try_from(t.flatten(0, -1))?;
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (Dtype::F32, bytes)
        }
        StoredDtype::Bf16 => {
            // Rounded to nearest by libtorch, then read as the 16-bit
            // patterns they are (tch has no bf16 element type).
            let t = t.to_kind(Kind::BFloat16).contiguous();
            let bits = Vec::<i16>::try_from(t.view_dtype(Kind::Int16).flatten(0, -1))?;
            let bytes = bits.iter().flat_map(|v| v.to_le_bytes()).collect();
            (Dtype::BF16, bytes)
        }
    };
    Ok(HostTensor {
        dtype,
        shape,
        bytes,
    })
}

/// Serialises `tensors` (as float32) and `metadata` as a safetensors file.
pub fn to_bytes(
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
    what: &Path,
) -> Result<Vec<u8>> {
    to_bytes_as(tensors, metadata, what, StoredDtype::F32)
}

/// The safetensors file of a file already serialised (`bytes`, named
/// `what` in errors) with its tensors stored as `dtype`, metadata kept.
pub fn convert(bytes: &[u8], what: &Path, dtype: StoredDtype) -> Result<Vec<u8>> {
    let file = from_bytes(bytes, what)?;
    let tensors: Vec<(String, Tensor)> = file.tensors.into_iter().collect();
    to_bytes_as(&tensors, file.metadata, what, dtype)
}

/// [`to_bytes`] with the tensors stored as `dtype`.
pub fn to_bytes_as(
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
    what: &Path,
    dtype: StoredDtype,
) -> Result<Vec<u8>> {
    let host: Vec<(String, HostTensor)> = tensors
        .iter()
        .map(|(name, t)| Ok((name.clone(), to_host(t, dtype)?)))
        .collect::<Result<_>>()?;
    let format_err = |reason: String| ModelError::Format {
        path: what.to_path_buf(),
        reason,
    };
    // The crate writes `__metadata__` from a HashMap, in an order that
    // changes from run to run: identical weights would not give identical
    // files. So it writes the tensors alone (its header lists them in a
    // fixed order: by dtype alignment, then name) and the metadata goes in
    // here, keys sorted.
    let file = safetensors::serialize(host.iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(|e| format_err(e.to_string()))?;
    with_sorted_metadata(&file, &metadata).map_err(format_err)
}

/// `file`, a safetensors file without metadata, with `metadata` added to its
/// header, keys sorted. The layout is the format's: an 8-byte little-endian
/// header length, the JSON header padded with spaces to a multiple of 8,
/// then the data, whose offsets count from the data's start (so a longer
/// header moves nothing).
fn with_sorted_metadata(
    file: &[u8],
    metadata: &HashMap<String, String>,
) -> std::result::Result<Vec<u8>, String> {
    let unexpected = || "unexpected safetensors layout from the serialiser".to_string();
    let header_len = file
        .get(..8)
        .map(|n| u64::from_le_bytes(n.try_into().expect("8 bytes")) as usize)
        .ok_or_else(unexpected)?;
    let (header, data) = file[8..]
        .split_at_checked(header_len)
        .ok_or_else(unexpected)?;
    // `{"name":{...},...}`: the tensor entries, between the braces.
    let tensors = std::str::from_utf8(header)
        .ok()
        .and_then(|h| h.trim_end().strip_prefix('{')?.strip_suffix('}'))
        .ok_or_else(unexpected)?;
    let sorted: BTreeMap<&String, &String> = metadata.iter().collect();
    let mut header = format!(
        "{{\"__metadata__\":{}",
        serde_json::to_string(&sorted).map_err(|e| e.to_string())?
    );
    if !tensors.is_empty() {
        header.push(',');
        header.push_str(tensors);
    }
    header.push('}');
    let padded = header.len().next_multiple_of(8);
    let mut out = Vec::with_capacity(8 + padded + data.len());
    out.extend_from_slice(&(padded as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.resize(8 + padded, b' ');
    out.extend_from_slice(data);
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> Vec<(String, Tensor)> {
        vec![
            (
                "decoder.w".into(),
                Tensor::from_slice(&[1.0f32, -2.5, 3.0]).view([3, 1]),
            ),
            ("encoder.b".into(), Tensor::from_slice(&[0.25f32])),
            (
                "encoder.w".into(),
                Tensor::from_slice(&[4.0f32, 5.0, 6.0, 7.0]).view([2, 2]),
            ),
        ]
    }

    /// Twelve entries, inserted in `order`, into a fresh map (whose
    /// iteration order is seeded afresh).
    fn metadata(order: impl Iterator<Item = usize>) -> HashMap<String, String> {
        let mut map = HashMap::new();
        for i in order {
            map.insert(
                format!("key-{i:02}"),
                format!("{{\"value\": {i}, \"quote\": \"\\\"\"}}"),
            );
        }
        map
    }

    #[test]
    fn identical_weights_and_metadata_give_identical_files_that_load_back() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            dir.path().join("a.safetensors"),
            dir.path().join("b.safetensors"),
        );
        save(&a, &tensors(), metadata(0..12)).unwrap();
        save(&b, &tensors(), metadata((0..12).rev())).unwrap();
        let (a_bytes, b_bytes) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert!(a_bytes == b_bytes, "the two files differ");

        // The header is the format's: its length, 8-aligned, then JSON with
        // the metadata's keys in sorted order.
        let header_len = u64::from_le_bytes(a_bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(header_len % 8, 0);
        let header = std::str::from_utf8(&a_bytes[8..8 + header_len]).unwrap();
        let positions: Vec<usize> = (0..12)
            .map(|i| header.find(&format!("\"key-{i:02}\"")).unwrap())
            .collect();
        assert!(
            positions.is_sorted(),
            "metadata keys out of order: {header}"
        );

        // And it reads back, through the safetensors crate, unchanged.
        let file = read(&a).unwrap();
        assert_eq!(file.metadata, metadata(0..12));
        assert_eq!(file.tensors.len(), 3);
        for (name, t) in tensors() {
            assert!(file.tensors[&name].equal(&t), "{name} differs");
        }
        // Stored as bf16, the same file loads back as fp32, each value
        // rounded to bf16's 8 bits of mantissa (these are exact in bf16).
        let bf16 = to_bytes_as(&tensors(), metadata(0..12), &a, StoredDtype::Bf16).unwrap();
        let header = SafeTensors::deserialize(&bf16).unwrap();
        assert!(
            header
                .tensors()
                .iter()
                .all(|(_, v)| v.dtype() == Dtype::BF16)
        );
        assert!(bf16.len() < a_bytes.len());
        let back = from_bytes(&bf16, &a).unwrap();
        assert_eq!(back.metadata, metadata(0..12));
        for (name, t) in tensors() {
            assert_eq!(back.tensors[&name].kind(), Kind::Float);
            assert!(back.tensors[&name].equal(&t), "{name} differs");
        }
        assert_eq!(convert(&bf16, &a, StoredDtype::F32).unwrap(), a_bytes);
        // A file with no metadata at all still loads.
        let empty = to_bytes(&tensors(), HashMap::new(), &a).unwrap();
        assert!(from_bytes(&empty, &a).unwrap().metadata.is_empty());
    }
}
