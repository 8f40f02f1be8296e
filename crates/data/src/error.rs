//! The data crate's error type; each variant names the file, column or key
//! at fault.

use std::path::PathBuf;

pub type Result<T, E = DataError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a readable Parquet file: {reason}")]
    Parquet { path: PathBuf, reason: String },
    #[error("{path}: no {wanted} column; columns present: {present}")]
    MissingColumn {
        path: PathBuf,
        wanted: String,
        present: String,
    },
    #[error("{path}: column `{column}` has type {found}, expected {expected}")]
    ColumnType {
        path: PathBuf,
        column: String,
        found: String,
        expected: &'static str,
    },
    #[error("no Parquet files found at {0}")]
    EmptyDataset(PathBuf),
    #[error("image {key}: {reason}")]
    Image { key: String, reason: String },
    #[error("too many bad samples: {bad} of {seen} ({share:.1}%) exceed the limit of {limit:.1}%")]
    TooManyBadSamples {
        bad: u64,
        seen: u64,
        share: f64,
        limit: f64,
    },
    #[error("invalid data config: {0}")]
    Config(String),
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }

    pub(crate) fn parquet(
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(parquet::errors::ParquetError) -> Self {
        let path = path.into();
        move |e| Self::Parquet {
            path,
            reason: e.to_string(),
        }
    }
}
