//! Generating image tokens for captions: incremental decoding with the KV
//! cache (or full recomputation, as a reference), temperature, top-k,
//! top-p, and classifier-free guidance with conditional and null captions
//! decoded as one batch. On a GPU the cached decoding step is captured in
//! a CUDA graph once and replayed for every token ([`super::decode`]).

use super::Gpt;
use super::decode::{FixedDecoder, fed};
use crate::{ModelError, Result};
use dalle_kernels::cuda_graph::CudaGraph;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// Logits are divided by this before sampling.
    pub temperature: f64,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: i64,
    /// Keep the smallest set of tokens whose probability reaches p (1: all).
    pub top_p: f64,
    /// Classifier-free guidance: logits = null + scale · (cond − null);
    /// 1 is plain conditional sampling.
    pub guidance_scale: f64,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            guidance_scale: 1.0,
            seed: 0,
        }
    }
}

impl SamplingConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, value: String, want: &str| {
            Err(ModelError::Config(format!(
                "sampling {key} = {value}: {want}"
            )))
        };
        if self.temperature <= 0.0 {
            return bad(
                "temperature",
                self.temperature.to_string(),
                "must be positive",
            );
        }
        if self.top_k < 0 {
            return bad(
                "top_k",
                self.top_k.to_string(),
                "must be 0 (off) or positive",
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p.to_string(), "must be in (0, 1]");
        }
        if self.guidance_scale < 0.0 {
            return bad(
                "guidance_scale",
                self.guidance_scale.to_string(),
                "must be ≥ 0",
            );
        }
        Ok(())
    }

    fn guided(&self) -> bool {
        self.guidance_scale != 1.0
    }
}

/// Masks logits `(B, V)` outside the top-k and the top-p nucleus.
pub fn filter_logits(logits: &Tensor, top_k: i64, top_p: f64) -> Tensor {
    let vocab = logits.size()[1];
    let mut logits = logits.shallow_clone();
    if top_k > 0 && top_k < vocab {
        let (kth, _) = logits.topk(top_k, 1, true, true);
        let threshold = kth.narrow(1, top_k - 1, 1);
        logits = logits.masked_fill(&logits.lt_tensor(&threshold), f64::NEG_INFINITY);
    }
    if top_p < 1.0 {
        let (sorted, order) = logits.sort(1, true);
        let cumulative = sorted.softmax(1, Kind::Float).cumsum(1, Kind::Float);
        // Drop a token when the tokens before it already reach p; the most
        // likely token always stays.
        let before = &cumulative - sorted.softmax(1, Kind::Float);
        let drop_sorted = before.ge(top_p);
        let drop = drop_sorted.scatter(1, &order, &drop_sorted);
        logits = logits.masked_fill(&drop, f64::NEG_INFINITY);
    }
    logits
}

/// Draws one token per row of logits `(B, V)` by inverting the cumulative
/// distribution at `uniforms` `(B,)`, on the logits' device.
fn draw(logits: &Tensor, config: &SamplingConfig, uniforms: &Tensor) -> Tensor {
    let logits = filter_logits(&(logits / config.temperature), config.top_k, config.top_p);
    let cumulative = logits.softmax(1, Kind::Double).cumsum(1, Kind::Double);
    let (rows, vocab) = (cumulative.size()[0], cumulative.size()[1]);
    let targets = uniforms.view([rows, 1]) * cumulative.narrow(1, vocab - 1, 1);
    // The first token whose cumulative probability exceeds the target.
    cumulative
        .le_tensor(&targets)
        .sum_dim_intlist(1, false, Kind::Int64)
        .clamp_max(vocab - 1)
}

/// The uniforms of every draw of one sampling run, `(tokens, images)`, from
/// the sampler's own generator seeded with `seed`: the draws depend only on
/// the seed and the logits, never on libtorch's global generator (which
/// training, or another sampler in the process, also uses), and are the
/// same on every device. They go to the device once, so no token waits for
/// a copy from the host.
fn draw_uniforms(seed: u64, tokens: i64, images: i64, device: Device) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let uniforms: Vec<f64> = (0..tokens * images).map(|_| rng.random::<f64>()).collect();
    Tensor::from_slice(&uniforms)
        .view([tokens, images])
        .to_device(device)
}

/// The next token `(B,)` from the image head's logits `(rows, V)`:
/// guidance combines each image's two rows, then one draw per image.
pub(super) fn next_token(
    logits: &Tensor,
    config: &SamplingConfig,
    guided: bool,
    uniforms: &Tensor,
) -> Tensor {
    // fp32 before guidance: under bf16 autocast the head's logits are
    // bf16, and cond − null is a difference of near neighbours.
    let full = logits.to_kind(Kind::Float);
    let logits = if guided {
        guide(&full, config.guidance_scale)
    } else {
        full
    };
    draw(&logits, config, uniforms)
}

/// Combines conditional and null logits stacked as `(2B, V)`. Written as
/// cond + (s − 1)(cond − null) so that s = 1 gives cond exactly.
fn guide(logits: &Tensor, scale: f64) -> Tensor {
    let b = logits.size()[0] / 2;
    let (cond, null) = (logits.narrow(0, 0, b), logits.narrow(0, b, b));
    &cond + (&cond - &null) * (scale - 1.0)
}

/// How the image tokens are decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoding {
    /// Every token recomputes the whole prefix: the O(n²) reference.
    Recompute,
    /// The KV cache, each step attending over the positions so far.
    Cache,
    /// The KV cache at fixed shapes: each step attends over the whole
    /// cache under a mask and keeps its position on the device
    /// ([`super::decode`]). With `graph`, on a GPU, the step is captured in
    /// a CUDA graph after one warm-up step and replayed for every token
    /// after it (elsewhere `graph` changes nothing); without, the same
    /// step runs op by op, which a graph must agree with exactly.
    FixedCache { graph: bool },
}

impl Decoding {
    /// Cached decoding as fits `device`: the graph on a GPU, where launch
    /// costs dominate a step at small batch; on the CPU, attention over the
    /// positions so far (no launch cost to save, and less arithmetic).
    pub fn cached_on(device: Device) -> Self {
        if device.is_cuda() {
            Self::FixedCache { graph: true }
        } else {
            Self::Cache
        }
    }
}

/// Samples image tokens `(B, N)` for captions `(B, T)` (repeat a caption
/// for several images of it). `on_token` is called after each of the N
/// tokens. With `use_cache` false every token recomputes the whole prefix
/// (the O(n²) reference); with it, [`Decoding::cached_on`] the device.
pub fn sample(
    gpt: &Gpt,
    captions: &Tensor,
    config: &SamplingConfig,
    use_cache: bool,
    on_token: impl FnMut(i64),
) -> Result<Tensor> {
    let decoding = if use_cache {
        Decoding::cached_on(gpt.device())
    } else {
        Decoding::Recompute
    };
    sample_with(gpt, captions, config, decoding, config.guided(), on_token)
}

/// [`sample`] with the decoding chosen by the caller.
pub fn sample_decoding(
    gpt: &Gpt,
    captions: &Tensor,
    config: &SamplingConfig,
    decoding: Decoding,
    on_token: impl FnMut(i64),
) -> Result<Tensor> {
    sample_with(gpt, captions, config, decoding, config.guided(), on_token)
}

/// [`sample`], with the null-caption batch on or off regardless of the
/// scale (so tests can check that batching it does not change the
/// conditional rows).
pub(super) fn sample_with(
    gpt: &Gpt,
    captions: &Tensor,
    config: &SamplingConfig,
    decoding: Decoding,
    guided: bool,
    mut on_token: impl FnMut(i64),
) -> Result<Tensor> {
    config.validate()?;
    let c = gpt.config();
    let device = gpt.device();
    let b = captions.size()[0];
    let captions = captions.to_device(device).to_kind(Kind::Int64);
    let text = if guided {
        let null = Tensor::from_slice(&c.null_caption())
            .to_device(device)
            .view([1, c.text_len])
            .expand([b, c.text_len], false);
        Tensor::cat(&[captions, null], 0)
    } else {
        captions
    };
    let rows = text.size()[0];
    let n = c.image_len();
    // One draw per image: guidance combines its two rows into one.
    let uniforms = draw_uniforms(config.seed, n, b, device);
    tch::no_grad(|| -> Result<Tensor> {
        if decoding == Decoding::Recompute {
            return recompute(gpt, &text, config, guided, &uniforms, on_token);
        }
        let mut cache = gpt.new_cache(rows);
        let logits = gpt.prefill(&text, &mut cache)?;
        let first = next_token(&logits, config, guided, &uniforms.get(0));
        on_token(1);
        if decoding == Decoding::Cache {
            return cached(gpt, first, cache, config, guided, &uniforms, on_token);
        }
        let graph = decoding == Decoding::FixedCache { graph: true };
        let mut decoder = FixedDecoder::new(gpt, config, guided, cache, &first, uniforms);
        decode_fixed(&mut decoder, n, graph, on_token);
        Ok(decoder.tokens().shallow_clone())
    })
}

/// Cached decoding after the first token, attending over the positions
/// decoded so far.
fn cached(
    gpt: &Gpt,
    first: Tensor,
    mut cache: super::KvCache,
    config: &SamplingConfig,
    guided: bool,
    uniforms: &Tensor,
    mut on_token: impl FnMut(i64),
) -> Result<Tensor> {
    let n = gpt.config().image_len();
    let mut tokens = vec![first];
    for i in 1..n {
        let logits = gpt.step(&fed(&tokens[i as usize - 1], guided), &mut cache)?;
        tokens.push(next_token(&logits, config, guided, &uniforms.get(i)));
        on_token(i + 1);
    }
    Ok(Tensor::stack(&tokens, 1))
}

/// Tokens 1..N through the fixed-shape step: with `graph` on a GPU one
/// warm-up step, one capture, then a replay per token; otherwise, or
/// where capture fails, the same step run directly.
fn decode_fixed(decoder: &mut FixedDecoder, n: i64, graph: bool, mut on_token: impl FnMut(i64)) {
    let mut done = 1;
    if let (Device::Cuda(index), true) = (decoder.device(), graph && n > 2) {
        let captured = CudaGraph::warm_up_and_capture(index, || decoder.step());
        done += 1;
        on_token(done);
        match captured {
            Ok(graph) => {
                while done < n {
                    if let Err(e) = graph.replay() {
                        // Nothing of a failed launch ran: the direct
                        // steps below take over from the same token.
                        tracing::warn!(error = %e, "replaying the decoding graph failed; decoding without it");
                        break;
                    }
                    done += 1;
                    on_token(done);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "capturing the decoding step in a CUDA graph failed; decoding without it");
            }
        }
    }
    while done < n {
        decoder.step();
        done += 1;
        on_token(done);
    }
}

/// Full recomputation of the prefix for every token (the reference).
fn recompute(
    gpt: &Gpt,
    text: &Tensor,
    config: &SamplingConfig,
    guided: bool,
    uniforms: &Tensor,
    mut on_token: impl FnMut(i64),
) -> Result<Tensor> {
    let device = gpt.device();
    let rows = text.size()[0];
    let n = gpt.config().image_len();
    let mut tokens: Vec<Tensor> = Vec::with_capacity(n as usize);
    for i in 0..n {
        let prefix = if tokens.is_empty() {
            Tensor::zeros([rows, 0], (Kind::Int64, device))
        } else {
            let prefix = Tensor::stack(&tokens, 1);
            if guided {
                Tensor::cat(&[&prefix, &prefix], 0)
            } else {
                prefix
            }
        };
        let logits = gpt.next_image_logits(text, &prefix)?;
        tokens.push(next_token(&logits, config, guided, &uniforms.get(i)));
        on_token(i + 1);
    }
    Ok(Tensor::stack(&tokens, 1))
}
