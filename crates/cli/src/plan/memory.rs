//! What training one stage holds in memory on one rank, from the model's
//! shapes alone: parameter counts that match the models' `named_parameters`
//! exactly, and activation estimates that count, layer by layer, the
//! tensors libtorch's autograd saves for backward in the code as written
//! (fp32 throughout, as training runs).
//!
//! The activation models, per sample of a micro-batch:
//!
//! - Transformer block (pre-LN; `T` positions, width `d`, MLP hidden `h`):
//!   its input (saved by `ln_1`), `ln_1`'s output (saved by `qkv`), `qkv`
//!   (3d, saved by attention as q, k, v), the attention output (saved by
//!   `proj`), the residual sum (saved by `ln_2`), `ln_2`'s output (saved by
//!   `fc`), `fc`'s output (saved by GELU) and GELU's (saved by `proj`):
//!   `T·(8d + 2h)` floats, plus the layer norms' mean and rstd and the
//!   attention's log-sum-exp. libtorch's fused attention (memory-efficient
//!   on CUDA, flash on CPU; both take fp32) keeps no `T×T` matrix; its math
//!   fallback (CPU with attention dropout, or a head width not a multiple
//!   of 4) keeps the softmax (`heads·T²`), a scaled q and k and a copy of
//!   the output. A sparse layer's mask is kept once per layer as a float
//!   bias (`T²`, not per sample). Dropout keeps a mask per dropped tensor
//!   (1 B per element on CUDA, 4 B on CPU).
//! - The transformer's head: `ln_f`'s input and the heads' inputs (`2·T·d`)
//!   and, per logit (`text_len × (text vocabulary + text_len)` plus
//!   `image tokens × image vocabulary`), three floats at the peak of
//!   backward: the saved log-softmax, the gradient coming in and the one
//!   going out.
//! - dVAE residual block (`n_in` → `w` channels at `R×R`): the four ReLU
//!   outputs its convolutions read (`n_in + 3·w/4` channels) and, where the
//!   width changes, the input the 1×1 identity path reads. Max-pooling keeps
//!   its input and int64 indices (6 B per input element); nearest
//!   upsampling keeps nothing. At the code grid: the Gumbel softmax, the
//!   KL's log-softmax, exp and sum, and the mean posterior's softmax (five
//!   floats per logit, six for straight-through).
//! - Backward's working set on top of what is saved: two of the largest
//!   single activation (a gradient coming in and one going out).
//! - Activation checkpointing (`dalle_model::recompute`: a segment is run
//!   without autograd, then recomputed in backward): each transformer
//!   block's input, or each dVAE group's, and the chain's output, plus one
//!   segment's full activations while it is recomputed.

use dalle_model::dvae::{DvaeConfig, Relaxation};
use dalle_model::gpt::masks::{self, Pattern};
use dalle_model::gpt::{GptArch, GptConfig};
use dalle_model::rerank::RerankConfig;

const F32: u64 = 4;

/// Where the step runs: it decides libtorch's attention kernel and the
/// size of a dropout mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Cuda,
    Cpu,
}

/// A transformer block's arithmetic shape (the GPT's, or the reranker's
/// caption encoder's).
#[derive(Clone, Copy, Debug)]
struct BlockShape {
    positions: u64,
    dim: u64,
    hidden: u64,
    heads: u64,
    dropout: bool,
    attn_dropout: bool,
}

impl BlockShape {
    fn of(arch: &GptArch, positions: i64) -> Self {
        BlockShape {
            positions: positions as u64,
            dim: arch.dim as u64,
            hidden: (arch.dim * arch.mlp_ratio) as u64,
            heads: arch.heads as u64,
            dropout: arch.dropout > 0.0,
            attn_dropout: arch.attn_dropout > 0.0,
        }
    }

    /// Whether libtorch 2.11 runs fp32 attention through a fused kernel
    /// that keeps no `T×T` matrix: memory-efficient attention on CUDA
    /// (masks, and dropout by Philox), flash attention on CPU (not with
    /// dropout); both want the head width a multiple of 4 (16 bytes).
    fn fused(&self, target: Target) -> bool {
        let aligned = (self.dim / self.heads).is_multiple_of(4);
        aligned && !(target == Target::Cpu && self.attn_dropout)
    }

    /// Bytes one sample saves in one block, and the attention's share.
    fn saved_per_sample(&self, target: Target) -> u64 {
        let (t, d, h, heads) = (self.positions, self.dim, self.hidden, self.heads);
        // x, ln_1 out, qkv (3), attention out, x + a, ln_2 out: 8d; fc out
        // and GELU out: 2h; two layer norms' mean and rstd; the
        // attention's log-sum-exp.
        let mut floats = t * (8 * d + 2 * h) + 4 * t + heads * t;
        if !self.fused(target) {
            // Scaled q and k, the softmax, the output's contiguous copy.
            floats += 3 * t * d + heads * t * t;
            if self.attn_dropout {
                // The dropped probabilities (the mask below).
                floats += heads * t * t;
            }
        }
        let mut bytes = floats * F32;
        let mask = dropout_mask_bytes(target);
        if self.dropout {
            bytes += 2 * t * d * mask;
        }
        if self.attn_dropout && !self.fused(target) {
            bytes += heads * t * t * mask;
        }
        bytes
    }

    /// Backward's working set through one block: the gradient of the
    /// residual stream and a pair of the MLP's hidden gradients.
    fn working_per_sample(&self) -> u64 {
        self.positions * (2 * self.hidden + 2 * self.dim) * F32
    }
}

fn dropout_mask_bytes(target: Target) -> u64 {
    match target {
        Target::Cuda => 1,
        Target::Cpu => F32,
    }
}

fn linear(inputs: i64, outputs: i64) -> u64 {
    (inputs * outputs + outputs) as u64
}

fn block_parameters(dim: i64, hidden: i64) -> u64 {
    let layer_norms = 2 * 2 * dim as u64;
    layer_norms
        + linear(dim, 3 * dim)
        + linear(dim, dim)
        + linear(dim, hidden)
        + linear(hidden, dim)
}

/// The transformer's parameters, as `Gpt::new` creates them.
pub fn gpt_parameters(c: &GptConfig) -> u64 {
    let d = c.arch.dim;
    let embeddings = (c.text_targets() + 1) + (c.text_len + 1) + c.image_vocab + 2 * c.image_grid;
    let blocks = c.arch.depth as u64 * block_parameters(d, d * c.arch.mlp_ratio);
    (embeddings * d) as u64
        + blocks
        + 2 * d as u64
        + linear(d, c.text_targets())
        + linear(d, c.image_vocab)
}

/// The transformer's activations for one micro-batch, in parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GptActivations {
    pub depth: u64,
    /// What one block saves for backward.
    pub per_block: u64,
    /// One block's input: all a checkpointed block keeps.
    pub block_input: u64,
    /// The final layer norm, the heads and the logits at their peak.
    pub head: u64,
    /// Backward's working set through one block.
    pub working: u64,
}

impl GptActivations {
    /// The peak: with checkpointing, every block's input and one block
    /// recomputed; without, every block's tensors; either way the head's
    /// peak or one block's backward on top, whichever is larger.
    pub fn total(&self, checkpointing: bool) -> u64 {
        if checkpointing {
            self.depth * self.block_input + self.head.max(self.per_block + self.working)
        } else {
            self.depth * self.per_block + self.head.max(self.working)
        }
    }
}

/// [`GptActivations`] of a micro-batch of `micro` sequences.
pub fn gpt_activations(c: &GptConfig, micro: u64, target: Target) -> GptActivations {
    let t = c.seq_len() as u64;
    let d = c.arch.dim as u64;
    let shape = BlockShape::of(&c.arch, c.seq_len());
    let masked = masks::layer_patterns(c)
        .iter()
        .filter(|p| **p != Pattern::Causal)
        .count() as u64;
    let mask_bias = t * t * F32;
    let depth = c.arch.depth as u64;
    let mut per_block = micro * shape.saved_per_sample(target);
    // Spread the masked layers' biases over the blocks (they are few and
    // the same size).
    per_block += (masked * mask_bias).div_ceil(depth.max(1));
    let logits = (c.text_len * c.text_targets() + c.image_len() * c.image_vocab) as u64;
    let mut head = micro * (2 * t * d + 3 * logits) * F32;
    if shape.dropout {
        // The embeddings' dropout mask.
        head += micro * t * d * dropout_mask_bytes(target);
    }
    GptActivations {
        depth,
        per_block,
        block_input: micro * t * d * F32,
        head,
        working: micro * shape.working_per_sample(),
    }
}

/// `(n_in, n_out, kernel)` of every convolution of a dVAE residual block.
fn res_block_convs(n_in: i64, n_out: i64, kernels: [i64; 4]) -> Vec<(i64, i64, i64)> {
    let hid = n_out / 4;
    let widths = [n_in, hid, hid, hid, n_out];
    let mut convs: Vec<_> = (0..4)
        .map(|i| (widths[i], widths[i + 1], kernels[i]))
        .collect();
    if n_in != n_out {
        convs.push((n_in, n_out, 1));
    }
    convs
}

/// One dVAE residual block: its width in and out and its side.
#[derive(Clone, Copy, Debug)]
struct ResBlockShape {
    n_in: u64,
    n_out: u64,
    side: u64,
}

impl ResBlockShape {
    /// Floats it saves per image: the ReLU outputs its four convolutions
    /// read, and the input of the identity path's 1×1 convolution.
    fn saved(&self) -> u64 {
        let id = if self.n_in != self.n_out {
            self.n_in
        } else {
            0
        };
        self.side * self.side * (self.n_in + 3 * self.n_out / 4 + id)
    }

    fn largest_map(&self) -> u64 {
        self.side * self.side * self.n_in.max(self.n_out)
    }
}

/// The blocks of each of the encoder's groups, then the decoder's.
fn dvae_groups(c: &DvaeConfig) -> Vec<Vec<ResBlockShape>> {
    use dalle_model::dvae::config::GROUP_COUNT;
    let (n, nb) = (c.n_hid as u64, c.n_blk_per_group as u64);
    let group = |first_in: u64, width: u64, side: u64| -> Vec<ResBlockShape> {
        (0..nb)
            .map(|i| ResBlockShape {
                n_in: if i == 0 { first_in } else { width },
                n_out: width,
                side,
            })
            .collect()
    };
    let mut groups = Vec::new();
    let mut width = n;
    for g in 0..GROUP_COUNT as u32 {
        let w = n << g;
        groups.push(group(width, w, c.encoder_side(g as i64) as u64));
        width = w;
    }
    let mut width = c.n_init as u64;
    for g in 0..GROUP_COUNT as u32 {
        let w = n << (GROUP_COUNT as u32 - 1 - g);
        groups.push(group(width, w, c.decoder_side(g as i64) as u64));
        width = w;
    }
    groups
}

/// The dVAE's parameters, as `Dvae::new` creates them.
pub fn dvae_parameters(c: &DvaeConfig) -> u64 {
    const ENCODER: [i64; 4] = [3, 3, 3, 1];
    const DECODER: [i64; 4] = [1, 3, 3, 3];
    let groups = dvae_groups(c);
    let (encoder, decoder) = groups.split_at(groups.len() / 2);
    let mut convs = vec![
        (c.channels, c.n_hid, 7),
        (c.n_hid * 8, c.vocab_size, 1),
        (c.vocab_size, c.n_init, 1),
        (c.n_hid, 2 * c.channels, 1),
    ];
    for (groups, kernels) in [(encoder, ENCODER), (decoder, DECODER)] {
        for b in groups.iter().flatten() {
            convs.extend(res_block_convs(b.n_in as i64, b.n_out as i64, kernels));
        }
    }
    convs
        .iter()
        .map(|&(i, o, k)| (o * i * k * k + o) as u64)
        .sum()
}

/// The dVAE's activations for one micro-batch, in parts. The segments are
/// those `Dvae::train_pass` checkpoints: each encoder group (the first with
/// the input convolution, each but the last with the max-pool after it,
/// the last with the output convolution), then each decoder group likewise
/// (the codebook convolution, the upsampling, the output convolution).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DvaeActivations {
    /// What the code grid and the loss save (never recomputed).
    pub outside: u64,
    /// Each segment's input and each chain's output: all a checkpointed
    /// chain keeps.
    pub segment_inputs: u64,
    /// What each segment saves, encoder's then decoder's.
    pub segments: Vec<u64>,
    /// Backward's working set.
    pub working: u64,
}

impl DvaeActivations {
    pub fn total(&self, checkpointing: bool) -> u64 {
        let segments = if checkpointing {
            self.segment_inputs + self.segments.iter().copied().max().unwrap_or(0)
        } else {
            self.segments.iter().sum()
        };
        self.outside + segments + self.working
    }
}

/// [`DvaeActivations`] of a micro-batch of `micro` images.
pub fn dvae_activations(c: &DvaeConfig, relaxation: Relaxation, micro: u64) -> DvaeActivations {
    let (s, ch, k) = (c.image_size as u64, c.channels as u64, c.vocab_size as u64);
    let grid = c.grid_size() as u64;
    let codes = k * grid * grid;
    let groups = dvae_groups(c);
    let half = groups.len() / 2;
    let map = |b: &ResBlockShape| b.side * b.side * b.n_out;
    let segments: Vec<u64> = groups
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let mut bytes = g.iter().map(ResBlockShape::saved).sum::<u64>() * F32;
            let last = g[g.len() - 1];
            if i == 0 {
                // The input convolution reads the mapped pixels.
                bytes += ch * s * s * F32;
            }
            if i < half && c.encoder_pools_after(i as i64) {
                // Max-pooling keeps its input (4 B) and int64 indices of a
                // quarter of it (2 B per input element).
                bytes += map(&last) * 6;
            }
            if i + 1 == half || i + 1 == groups.len() {
                // The output convolution reads a ReLU of the last group.
                bytes += map(&last) * F32;
            }
            // (The codebook convolution reads the codes, counted below;
            // upsampling keeps nothing.)
            micro * bytes
        })
        .collect();
    // Each later segment's input: a pool's or an upsampling's output; then
    // the pixels, and the chains' outputs (the logits, the statistics).
    let inputs: u64 = groups[1..half]
        .iter()
        .chain(&groups[half + 1..])
        .map(|g| g[0].n_in * g[0].side * g[0].side)
        .sum::<u64>()
        + ch * s * s
        + codes
        + 2 * ch * s * s;
    // The code grid: Gumbel softmax (read by the codebook convolution
    // too), log-softmax, exp and sum of the KL, the mean posterior's
    // softmax; straight-through adds the one-hot sum. Then the
    // reconstruction and MSE terms: a few image-sized tensors.
    let code_floats = match relaxation {
        Relaxation::Soft => 5,
        Relaxation::StraightThrough => 6,
    };
    let outside = code_floats * codes + 6 * ch * s * s;
    let largest = groups
        .iter()
        .flatten()
        .map(ResBlockShape::largest_map)
        .max()
        .unwrap_or(0);
    DvaeActivations {
        outside: micro * outside * F32,
        segment_inputs: micro * inputs * F32,
        segments,
        working: micro * 2 * largest * F32,
    }
}

/// Stride-2 stages of the reranker's image net, as `RerankConfig` counts them.
fn rerank_downsamplings(image_size: i64) -> u32 {
    let (mut side, mut n) = (image_size, 0);
    while side > 4 {
        side = (side + 1) / 2;
        n += 1;
    }
    n.max(1)
}

/// The reranker's parameters, as `Reranker::new` creates them.
pub fn rerank_parameters(c: &RerankConfig) -> u64 {
    let a = &c.arch;
    let conv = |i: i64, o: i64| (o * i * 9 + o) as u64;
    let mut channels = a.image_width;
    let mut image = conv(3, channels);
    for _ in 0..rerank_downsamplings(c.image_size) {
        image += conv(channels, 2 * channels) + 2 * 2 * channels as u64;
        channels *= 2;
    }
    image += linear(channels, a.embed_dim);
    let text = ((c.text_vocab + c.text_len) + c.text_len) as u64 * a.dim as u64
        + a.depth as u64 * block_parameters(a.dim, 4 * a.dim)
        + 2 * a.dim as u64
        + linear(a.dim, a.embed_dim);
    image + text + 1
}

/// The reranker's activations for `local` pairs of a global batch of
/// `global`: its image net, its caption encoder (blocks as the
/// transformer's) and the global batch's similarity matrix.
pub fn rerank_activations(c: &RerankConfig, local: u64, global: u64, target: Target) -> u64 {
    let a = &c.arch;
    let mut side = c.image_size as u64;
    let mut channels = a.image_width as u64;
    // The stem reads the pixels; GELU reads its output, the first stage
    // GELU's output.
    let mut image = 3 * side * side + 2 * channels * side * side;
    let mut largest = channels * side * side;
    for _ in 0..rerank_downsamplings(c.image_size) {
        side = side.div_ceil(2);
        channels *= 2;
        // Convolution output (read by the group norm), group norm output
        // (read by GELU), GELU output (read by what follows).
        image += 3 * channels * side * side;
        largest = largest.max(channels * side * side);
    }
    let arch = GptArch {
        dim: a.dim,
        depth: a.depth,
        heads: a.heads,
        mlp_ratio: 4,
        dropout: 0.0,
        attn_dropout: 0.0,
        ..GptArch::default()
    };
    let shape = BlockShape::of(&arch, c.text_len);
    let t = c.text_len as u64;
    let text = a.depth as u64 * shape.saved_per_sample(target) + 3 * t * a.dim as u64 * F32;
    // Similarity logits, their scaled copy, the row and column
    // log-softmaxes and a gradient.
    let similarity = 5 * global * global * F32;
    local * (image * F32 + text)
        + similarity
        + local * (2 * largest * F32).max(shape.working_per_sample())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dalle_model::dvae::Dvae;
    use dalle_model::gpt::{AttentionLayout, Gpt};
    use dalle_model::rerank::{RerankArch, Reranker};
    use tch::Device;

    fn counted(named: Vec<(String, tch::Tensor)>) -> u64 {
        named.iter().map(|(_, t)| t.numel() as u64).sum()
    }

    fn tiny_gpt(attention: AttentionLayout) -> GptConfig {
        GptConfig {
            arch: GptArch {
                dim: 32,
                depth: 3,
                heads: 4,
                mlp_ratio: 3,
                attention,
                conv_kernel: 3,
                ..GptArch::default()
            },
            text_vocab: 50,
            text_len: 6,
            image_vocab: 24,
            image_grid: 4,
        }
    }

    #[test]
    fn the_formula_counts_the_real_models_parameters() {
        for attention in [AttentionLayout::Dense, AttentionLayout::Sparse] {
            let c = tiny_gpt(attention);
            let model = Gpt::new(c.clone(), Device::Cpu).unwrap();
            assert_eq!(gpt_parameters(&c), counted(model.named_parameters()));
        }
        for (n_hid, n_blk_per_group, n_init) in [(8, 1, 8), (16, 2, 12), (8, 3, 64)] {
            let c = DvaeConfig {
                image_size: 16,
                n_hid,
                n_blk_per_group,
                vocab_size: 32,
                n_init,
                ..DvaeConfig::default()
            };
            let model = Dvae::new(c.clone(), Device::Cpu).unwrap();
            assert_eq!(
                dvae_parameters(&c),
                counted(model.named_parameters()),
                "{c:?}"
            );
        }
        for image_size in [8, 16, 20] {
            let c = RerankConfig {
                arch: RerankArch {
                    image_width: 4,
                    dim: 16,
                    depth: 2,
                    heads: 2,
                    embed_dim: 8,
                },
                text_vocab: 40,
                text_len: 5,
                image_size,
            };
            let model = Reranker::new(c.clone(), Device::Cpu).unwrap();
            assert_eq!(rerank_parameters(&c), counted(model.named_parameters()));
        }
    }

    #[test]
    fn the_paper_transformer_has_twelve_billion_parameters() {
        let c = GptConfig {
            arch: GptArch::default(),
            text_vocab: 16384,
            text_len: 256,
            image_vocab: 8192,
            image_grid: 32,
        };
        let billions = gpt_parameters(&c) as f64 / 1e9;
        // The paper's "12 billion".
        assert!((12.0..12.5).contains(&billions), "{billions}");
    }

    #[test]
    fn checkpointing_lowers_activations_and_they_grow_with_the_micro_batch() {
        let c = tiny_gpt(AttentionLayout::Dense);
        let one = gpt_activations(&c, 1, Target::Cuda);
        let four = gpt_activations(&c, 4, Target::Cuda);
        assert!(one.total(true) < one.total(false));
        assert_eq!(four.total(false), 4 * one.total(false));
        let dvae = DvaeConfig::default();
        let a = dvae_activations(&dvae, Relaxation::Soft, 2);
        assert!(a.total(true) < a.total(false), "{a:?}");
        assert!(
            a.segment_inputs < a.segments.iter().sum::<u64>() / 4,
            "{a:?}"
        );
        let b = dvae_activations(&dvae, Relaxation::Soft, 4);
        assert_eq!(b.total(false), 2 * a.total(false));
        // A finer grid: the encoder's last group and the decoder's first
        // run at twice the side, four times the area.
        let finer = DvaeConfig {
            downsample: 4,
            ..dvae
        };
        let f = dvae_activations(&finer, Relaxation::Soft, 2);
        assert_eq!(f.segments[3], 4 * a.segments[3], "{f:?}");
        assert_eq!(f.segments[4], 4 * a.segments[4], "{f:?}");
        assert!(f.outside > a.outside && f.total(false) > a.total(false));
    }

    #[test]
    fn only_the_math_attention_keeps_the_attention_matrix() {
        let mut c = tiny_gpt(AttentionLayout::Dense);
        let fused = gpt_activations(&c, 2, Target::Cpu).per_block;
        c.arch.attn_dropout = 0.1;
        let math = gpt_activations(&c, 2, Target::Cpu).per_block;
        let (t, heads) = (c.seq_len() as u64, c.arch.heads as u64);
        // At least the softmax and its dropped copy per sample.
        assert!(
            math >= fused + 2 * 2 * heads * t * t * F32,
            "{fused} {math}"
        );
        // CUDA's memory-efficient kernel takes dropout.
        assert_eq!(gpt_activations(&c, 2, Target::Cuda).per_block, fused);
    }
}
