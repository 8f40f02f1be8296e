//! The model crate's error type. Every variant names its culprit: the file,
//! the tensor, the config key or the input that was wrong.

use std::path::PathBuf;

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read weights file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid safetensors file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path} has no tensor `{name}` (expected shape {expected:?})")]
    MissingTensor {
        path: PathBuf,
        name: String,
        expected: Vec<i64>,
    },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("{path}: unexpected tensor `{name}`, not part of this model")]
    UnexpectedTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has unsupported dtype {dtype}")]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("invalid input {what}: expected {expected}, got {found}")]
    Input {
        what: &'static str,
        expected: String,
        found: String,
    },
    #[error("unknown device `{0}` (use auto, cpu, cuda or cuda:N)")]
    Device(String),
    #[error("tokenizer {what}: {reason}")]
    Tokenizer { what: String, reason: String },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}
