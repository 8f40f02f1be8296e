//! The eval crate's error type. Every variant names its culprit: the
//! caption, the file or the input that was wrong.

use std::path::PathBuf;

pub type Result<T, E = EvalError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("caption `{caption}` is not a synthetic caption: {reason}")]
    Caption { caption: String, reason: String },
    #[error("invalid input {what}: expected {expected}, got {found}")]
    Input {
        what: &'static str,
        expected: String,
        found: String,
    },
    #[error("invalid probe config: {0}")]
    Config(String),
    #[error("{path} is not a probe weights file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error(transparent)]
    Model(#[from] dalle_model::ModelError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}
