//! Model code of dalle-rs: the discrete VAE of DALL-E (Ramesh et al. 2021,
//! arXiv 2102.12092), its training objective, and weight files.
//!
//! Everything here is plain tensor code on `tch`; training loops, data and
//! storage live in other crates.

pub mod device;
pub mod dvae;
pub mod error;
pub mod gpt;
pub mod images;
pub mod recompute;
pub mod rerank;
pub mod text;
pub mod weights;

pub use error::{ModelError, Result};
