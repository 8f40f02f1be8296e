//! The training crate's error type.

pub type Result<T, E = TrainError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] dalle_model::ModelError),
    #[error(transparent)]
    Data(#[from] dalle_data::DataError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("training diverged at step {step}: loss is {loss}")]
    Diverged { step: u64, loss: f64 },
    #[error("the data loader ended before step {0}")]
    DataExhausted(u64),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("stopped at a step boundary: {0}")]
    Stopped(String),
    #[error("data parallelism: {0}")]
    Collective(String),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}
