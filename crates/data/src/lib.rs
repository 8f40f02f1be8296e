//! Data of dalle-rs: image–caption datasets stored as Parquet (img2dataset's
//! or Hugging Face's layout), image decoding to training tensors, a
//! background batch loader, the validation split and set, and a
//! deterministic synthetic dataset.

pub mod columns;
pub mod error;
pub mod image_ops;
pub mod loader;
mod object_reader;
pub mod order;
pub mod parquet_source;
pub mod split;
pub mod synth;
pub mod tokens;
pub mod validation;

pub use error::{DataError, Result};
