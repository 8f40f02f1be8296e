//! The probes' network: a small CNN reads the shape's kind from the
//! silhouette crop, then one shared hidden layer sees its features next to
//! the two colours and the extent, and a linear head per attribute
//! classifies.

use super::views::Views;
use dalle_data::synth::{BACKGROUNDS, COLORS, SHAPES, SIZES};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// The heads, in the order of [`Net::forward`]'s logits.
pub(crate) const HEADS: [&str; 4] = ["background", "shape_colour", "shape_kind", "size"];

/// Classes per head.
fn classes() -> [i64; 4] {
    [BACKGROUNDS.len(), COLORS.len(), SHAPES.len(), SIZES.len()].map(|n| n as i64)
}

/// Numbers next to the CNN's features: two colours and the extent.
const SCENE_FEATURES: i64 = 7;

#[derive(Debug)]
pub(crate) struct Net {
    convs: Vec<nn::Conv2D>,
    hidden: nn::Linear,
    heads: Vec<nn::Linear>,
}

impl Net {
    /// `width`: channels of the first convolution; the next have 2× and 4×.
    pub fn new(p: &nn::Path, width: i64) -> Self {
        let conv = |i: usize, c_in, c_out, stride| {
            let cfg = nn::ConvConfig {
                stride,
                padding: 1,
                ..Default::default()
            };
            nn::conv2d(p / format!("conv{i}"), c_in, c_out, 3, cfg)
        };
        let w = width;
        // The first layer keeps the crop's full resolution: corners and
        // points are a pixel or two there.
        let convs = vec![
            conv(0, 1, w, 1),
            conv(1, w, 2 * w, 2),
            conv(2, 2 * w, 4 * w, 2),
            conv(3, 4 * w, 4 * w, 2),
        ];
        let features = 8 * w + SCENE_FEATURES; // average and max pooling of 4w channels
        let hidden_size = 8 * w;
        let hidden = nn::linear(p / "hidden", features, hidden_size, Default::default());
        let heads = HEADS
            .iter()
            .zip(classes())
            .map(|(name, n)| {
                nn::linear(
                    p / *name,
                    hidden_size + SCENE_FEATURES,
                    n,
                    Default::default(),
                )
            })
            .collect();
        Self {
            convs,
            hidden,
            heads,
        }
    }

    /// Draws every weight uniformly in ±√(6 / fan_in) (He's bound, as a ReLU
    /// follows it) or, for the heads, ±√(1 / fan_in) so the logits start
    /// small; zeroes every bias. Variables go in the order of their names,
    /// so one stream gives one network.
    pub fn initialise(vs: &nn::VarStore, rng: &mut ChaCha8Rng) {
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, mut var) in vars {
            let size = var.size();
            let values: Vec<f32> = if name.ends_with(".bias") {
                vec![0.0; var.numel()]
            } else {
                let fan_in = size[1..].iter().product::<i64>() as f64;
                let head = HEADS.iter().any(|h| name.starts_with(&format!("{h}.")));
                let bound = (if head { 1.0 } else { 6.0 } / fan_in).sqrt();
                (0..var.numel())
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect()
            };
            let init = Tensor::from_slice(&values).view(size.as_slice());
            tch::no_grad(|| var.copy_(&init));
        }
    }

    /// # Shapes
    /// views of N images → four `(N, classes)` logits, in [`HEADS`] order
    pub fn forward(&self, v: &Views) -> Vec<Tensor> {
        let mut h = &v.crop * 2.0 - 1.0; // (N, 1, CROP, CROP)
        for conv in &self.convs {
            h = conv.forward(&h).relu(); // (N, C, CROP/2ᵏ, CROP/2ᵏ)
        }
        let dims = &[2i64, 3][..];
        let scene = Tensor::cat(
            &[
                &v.background * 2.0 - 1.0,
                &v.shape_colour * 2.0 - 1.0,
                // Sizes are ratios: in logs, a square and a diamond (6 %
                // apart) are the same step apart at every size.
                (v.extent.log() + 2.0) * 10.0,
            ],
            1,
        ); // (N, 7)
        let features = Tensor::cat(
            &[
                h.mean_dim(dims, false, Kind::Float),
                h.amax(dims, false),
                scene.shallow_clone(),
            ],
            1,
        );
        let shared = self.hidden.forward(&features).relu(); // (N, 8w)
        // The heads also see the scene features directly: the nearest
        // palette colour is a linear function of the colour, so the colour
        // heads need not wait for the hidden layer to learn it.
        let shared = Tensor::cat(&[shared, scene], 1); // (N, 8w + 7)
        self.heads
            .iter()
            .map(|head| head.forward(&shared))
            .collect()
    }
}
