//! One pre-LayerNorm transformer block: causal self-attention through
//! libtorch's fused `scaled_dot_product_attention`, then a GELU MLP, each
//! on a residual branch.

use super::cache::CacheWrite;
use super::config::GptArch;
use tch::Tensor;
use tch::nn::{self, Module};

/// Which keys the queries of one call may see.
pub enum Visibility<'a> {
    /// Queries and keys are the same positions from 0: plain causal
    /// attention (the fused kernels' fast path).
    Causal,
    /// Every key (a query decoded after everything in the cache).
    All,
    /// A boolean `(queries, keys)` mask.
    Mask(&'a Tensor),
}

/// Initialisation of GPT-2: N(0, 0.02) weights, zero biases, and residual
/// output projections scaled down by √(2·depth) so the residual stream's
/// variance does not grow with depth.
pub fn linear(path: nn::Path, inputs: i64, outputs: i64, stdev: f64) -> nn::Linear {
    let config = nn::LinearConfig {
        ws_init: nn::Init::Randn { mean: 0.0, stdev },
        bs_init: Some(nn::Init::Const(0.0)),
        bias: true,
    };
    nn::linear(path, inputs, outputs, config)
}

pub const INIT_STD: f64 = 0.02;

struct Attention {
    qkv: nn::Linear,
    proj: nn::Linear,
    heads: i64,
    dropout: f64,
}

impl Attention {
    fn new(path: nn::Path, arch: &GptArch) -> Self {
        let residual_std = INIT_STD / (2.0 * arch.depth as f64).sqrt();
        Self {
            qkv: linear(&path / "qkv", arch.dim, 3 * arch.dim, INIT_STD),
            proj: linear(&path / "proj", arch.dim, arch.dim, residual_std),
            heads: arch.heads,
            dropout: arch.attn_dropout,
        }
    }

    /// With a cache, the keys and values of `x`'s positions join those of
    /// the positions before.
    fn forward(
        &self,
        x: &Tensor,
        visibility: &Visibility,
        cache: Option<CacheWrite>,
        train: bool,
    ) -> Tensor {
        let (b, n, d) = x.size3().expect("(B, n, D) input");
        let head_dim = d / self.heads;
        // (B, n, 3, H, Dh) → (3, B, H, n, Dh)
        let qkv = self
            .qkv
            .forward(x)
            .view([b, n, 3, self.heads, head_dim])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let (k, v) = match cache {
            Some(cache) => cache.store(&k, &v),
            None => (k, v),
        };
        let (mask, causal) = match visibility {
            Visibility::Causal => (None, true),
            Visibility::All => (None, false),
            Visibility::Mask(m) => (Some(*m), false),
        };
        let dropout = if train { self.dropout } else { 0.0 };
        let out =
            Tensor::scaled_dot_product_attention(&q, &k, &v, mask, dropout, causal, None, false);
        self.proj.forward(&out.transpose(1, 2).reshape([b, n, d]))
    }
}

struct Mlp {
    fc: nn::Linear,
    proj: nn::Linear,
}

impl Mlp {
    fn new(path: nn::Path, arch: &GptArch) -> Self {
        let hidden = arch.dim * arch.mlp_ratio;
        let residual_std = INIT_STD / (2.0 * arch.depth as f64).sqrt();
        Self {
            fc: linear(&path / "fc", arch.dim, hidden, INIT_STD),
            proj: linear(&path / "proj", hidden, arch.dim, residual_std),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.proj.forward(&self.fc.forward(x).gelu("none"))
    }
}

pub struct Block {
    ln_1: nn::LayerNorm,
    attn: Attention,
    ln_2: nn::LayerNorm,
    mlp: Mlp,
    dropout: f64,
}

impl Block {
    pub fn new(path: nn::Path, arch: &GptArch) -> Self {
        let ln = |name: &str| nn::layer_norm(&path / name, vec![arch.dim], Default::default());
        Self {
            ln_1: ln("ln_1"),
            attn: Attention::new(&path / "attn", arch),
            ln_2: ln("ln_2"),
            mlp: Mlp::new(&path / "mlp", arch),
            dropout: arch.dropout,
        }
    }

    pub fn forward(
        &self,
        x: &Tensor,
        visibility: &Visibility,
        cache: Option<CacheWrite>,
        train: bool,
    ) -> Tensor {
        let a = self
            .attn
            .forward(&self.ln_1.forward(x), visibility, cache, train);
        let x = x + a.dropout(self.dropout, train);
        let m = self.mlp.forward(&self.ln_2.forward(&x));
        &x + m.dropout(self.dropout, train)
    }
}
