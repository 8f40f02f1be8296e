//! `dalle-sample`: turns prompts into images from an exported bundle. The
//! library half holds the bundle format (written by `dalle export`) and the
//! prompt-to-image pipeline; the binary is its command line.

pub mod bundle;
pub mod generate;
