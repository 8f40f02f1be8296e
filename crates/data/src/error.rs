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
    #[error("{file} is not a readable Parquet file: {reason}")]
    Parquet { file: String, reason: String },
    #[error("{file}: no {wanted} column; columns present: {present}")]
    MissingColumn {
        file: String,
        wanted: String,
        present: String,
    },
    #[error("{file}: column `{column}` has type {found}, expected {expected}")]
    ColumnType {
        file: String,
        column: String,
        found: String,
        expected: &'static str,
    },
    #[error(
        "{file} holds {holds}, but {first} holds {first_holds}: a dataset must be all \
         images or all token grids of one length"
    )]
    MixedPayloads {
        first: String,
        first_holds: String,
        file: String,
        holds: String,
    },
    #[error("no Parquet files found at {0}")]
    EmptyDataset(String),
    #[error(transparent)]
    Store(#[from] dalle_store::StoreError),
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
        file: impl Into<String>,
    ) -> impl FnOnce(parquet::errors::ParquetError) -> Self {
        let file = file.into();
        move |e| Self::Parquet {
            file,
            reason: e.to_string(),
        }
    }
}
