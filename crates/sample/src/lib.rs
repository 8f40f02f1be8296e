//! `dalle-sample`: turns prompts into images from an exported bundle. The
//! library half holds the bundle format (written by `dalle export`), the
//! prompt-to-image pipeline and best-of-N reranking; the binary is its
//! command line.

pub mod bundle;
pub mod generate;
pub mod rerank;
