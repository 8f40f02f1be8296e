//! Synthetic captions ⇄ the attributes they name. A caption of the
//! synthetic dataset reads "a {size} {colour} {shape} on a {background}
//! background" (`Scene::caption`); parsing it gives the labels a generated
//! image is judged against, so the grammar is matched exactly: anything
//! else is refused rather than guessed at.

use crate::{EvalError, Result};
use dalle_data::synth::{BACKGROUNDS, COLORS, SHAPES, SIZES, Scene};
use serde::{Deserialize, Serialize};

/// What a synthetic image shows, as indexes into `SIZES`, `COLORS`,
/// `SHAPES` and `BACKGROUNDS` of `dalle_data::synth`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attributes {
    pub size: usize,
    /// The shape's colour.
    pub colour: usize,
    pub shape: usize,
    pub background: usize,
}

impl Attributes {
    pub fn from_scene(scene: &Scene) -> Self {
        Self {
            size: scene.size,
            colour: scene.color,
            shape: SHAPES
                .iter()
                .position(|&s| s == scene.shape)
                .expect("a scene's shape is one of SHAPES"),
            background: scene.background,
        }
    }

    /// The caption `Scene::caption` writes for these attributes.
    pub fn caption(&self) -> String {
        format!(
            "a {} {} {} on a {} background",
            SIZES[self.size].0,
            COLORS[self.colour].0,
            SHAPES[self.shape],
            BACKGROUNDS[self.background].0
        )
    }
}

/// Parses a synthetic caption, or names the word that does not fit.
pub fn parse_caption(caption: &str) -> Result<Attributes> {
    let err = |reason: String| EvalError::Caption {
        caption: caption.to_string(),
        reason,
    };
    // Split on single spaces so that stray whitespace is an error too.
    let words: Vec<&str> = caption.split(' ').collect();
    let [a1, size, colour, shape, on, a2, background, tail] = words[..] else {
        return Err(err(format!(
            "expected the 8 words \"a SIZE COLOUR SHAPE on a BACKGROUND background\", got {}",
            words.len()
        )));
    };
    for (found, expected) in [(a1, "a"), (on, "on"), (a2, "a"), (tail, "background")] {
        if found != expected {
            return Err(err(format!("expected `{expected}`, found `{found}`")));
        }
    }
    let find = |what: &str, word: &str, names: &[&str]| {
        names.iter().position(|&n| n == word).ok_or_else(|| {
            err(format!(
                "unknown {what} `{word}` (one of {})",
                names.join(", ")
            ))
        })
    };
    Ok(Attributes {
        size: find("size", size, &names(SIZES))?,
        colour: find("shape colour", colour, &names(COLORS))?,
        shape: find("shape", shape, SHAPES)?,
        background: find("background", background, &names(BACKGROUNDS))?,
    })
}

/// The names of a list of named values.
fn names<T>(list: &[(&'static str, T)]) -> Vec<&'static str> {
    list.iter().map(|e| e.0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampled_captions_round_trip() {
        for seed in [0, 9] {
            for i in 0..3000 {
                let scene = Scene::sample(seed, i);
                let caption = scene.caption();
                let parsed = parse_caption(&caption).unwrap();
                assert_eq!(parsed, Attributes::from_scene(&scene), "{caption}");
                assert_eq!(parsed.caption(), caption);
            }
        }
    }

    #[test]
    fn every_attribute_value_parses() {
        // Sampling might miss a combination; the cartesian product cannot.
        for size in 0..SIZES.len() {
            for colour in 0..COLORS.len() {
                for shape in 0..SHAPES.len() {
                    for background in 0..BACKGROUNDS.len() {
                        let a = Attributes {
                            size,
                            colour,
                            shape,
                            background,
                        };
                        assert_eq!(parse_caption(&a.caption()).unwrap(), a);
                    }
                }
            }
        }
    }

    #[test]
    fn other_captions_are_refused_and_named() {
        for (caption, reason) in [
            ("a small red circle on a blue", "8 words"),
            ("a small red circle on a blue background ", "8 words"),
            ("a  small red circle on a blue background", "8 words"),
            ("A small red circle on a blue background", "expected `a`"),
            ("a small red circle in a blue background", "expected `on`"),
            (
                "a small red circle on a blue backdrop",
                "expected `background`",
            ),
            (
                "a huge red circle on a blue background",
                "unknown size `huge`",
            ),
            (
                "a small black circle on a blue background",
                "unknown shape colour `black`",
            ),
            (
                "a small red oval on a blue background",
                "unknown shape `oval`",
            ),
            (
                "a small red circle on a pink background",
                "unknown background `pink`",
            ),
            ("a photo of a cat", "8 words"),
        ] {
            let e = parse_caption(caption).unwrap_err().to_string();
            assert!(e.contains(caption), "{e}");
            assert!(e.contains(reason), "{caption}: {e}");
        }
    }
}
