//! Quality measurements of dalle-rs models, the numbers `dalle eval`
//! reports: how close dVAE reconstructions come to their originals (PSNR,
//! SSIM, per-colour errors) next to the baselines they must beat, and
//! whether a generated image shows what its synthetic caption asked for
//! (attribute probes: small classifiers trained on the synthetic dataset).
//!
//! - [`caption`]: synthetic captions ⇄ attribute indexes.
//! - [`image_metrics`]: PSNR, SSIM, baselines and the reconstruction report.
//! - [`colour_error`]: reconstruction error of background and shape pixels,
//!   per named colour.
//! - [`scenes`]: synthetic scenes rendered to tensors with their labels.
//! - [`probes`]: the attribute classifier, its training and its weights.
//! - [`codebook`]: how many of its codes a dVAE uses.
//! - [`fidelity`]: prompts for held-out and unseen captions, and the judge
//!   of generated images.
//! - [`report`]: `eval.json` and its summary.

pub mod caption;
pub mod codebook;
pub mod colour_error;
pub mod error;
pub mod fidelity;
pub mod image_metrics;
pub mod probes;
pub mod report;
pub mod scenes;

pub use caption::{Attributes, parse_caption};
pub use codebook::CodebookUsage;
pub use error::{EvalError, Result};
pub use image_metrics::ReconReport;
pub use probes::{AttributeAccuracy, ProbeConfig, Probes};
