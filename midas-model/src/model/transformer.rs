//! The pre-norm transformer block both ViT encoders share: timm's `Block` in DPT-Hybrid's ViT-B/16
//! and DINOv2's `NestedTensorBlock` in Depth Anything V2, which adds LayerScale (a learned
//! per-channel factor on each branch's output, before the residual addition).

use burn::module::Param;
use burn::nn::{Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::{gelu, softmax};

/// Every ViT LayerNorm's epsilon in both encoders (`partial(nn.LayerNorm, eps=1e-6)`; PyTorch's
/// default is 1e-5).
pub const LN_EPSILON: f64 = 1e-6;

/// Features per attention head, in every encoder this crate runs.
pub const HEAD_DIM: usize = 64;

/// A linear layer whose parameters start at zero (they are filled from weights right after).
pub(crate) fn linear(device: &Device, d_input: usize, d_output: usize) -> Linear {
    LinearConfig::new(d_input, d_output)
        .with_initializer(Initializer::Zeros)
        .init(device)
}

/// A LayerNorm of `dim` features with the ViTs' epsilon.
pub(crate) fn layer_norm(device: &Device, dim: usize) -> LayerNorm {
    LayerNormConfig::new(dim)
        .with_epsilon(LN_EPSILON)
        .init(device)
}

/// Multi-head self-attention with a fused `qkv` projection (rows `[q | k | v]`), heads of
/// [`HEAD_DIM`] features.
#[derive(Module, Debug)]
pub struct Attention {
    pub(crate) qkv: Linear,
    pub(crate) proj: Linear,
}

impl Attention {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [batch, tokens, dim] = x.dims();
        let heads = dim / HEAD_DIM;
        let qkv = self
            .qkv
            .forward(x)
            .reshape([batch, tokens, 3, heads, HEAD_DIM])
            .permute([2, 0, 3, 1, 4]);
        let part = |index: usize| {
            qkv.clone()
                .narrow(0, index, 1)
                .reshape([batch, heads, tokens, HEAD_DIM])
        };
        let (q, k, v) = (part(0), part(1), part(2));
        let scale = (HEAD_DIM as f64).powf(-0.5);
        let weights = softmax(q.matmul(k.swap_dims(2, 3)).mul_scalar(scale), 3);
        let out = weights
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([batch, tokens, dim]);
        self.proj.forward(out)
    }
}

/// The block's MLP: fc1, exact (erf) GELU, fc2.
#[derive(Module, Debug)]
pub struct Mlp {
    pub(crate) fc1: Linear,
    pub(crate) fc2: Linear,
}

/// DINOv2's `LayerScale`: a per-channel factor (upstream's `gamma`).
#[derive(Module, Debug)]
pub struct LayerScale {
    pub(crate) gamma: Param<Tensor<1>>,
}

impl LayerScale {
    fn new(device: &Device, dim: usize) -> Self {
        Self {
            gamma: Param::from_tensor(Tensor::ones([dim], device)),
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let dim = self.gamma.dims()[0];
        x * self.gamma.val().reshape([1, 1, dim])
    }
}

/// A pre-norm transformer block, MLP four times as wide as the tokens; dropout is identity at
/// inference. `ls1`/`ls2` are DINOv2's LayerScales (absent in DPT-Hybrid's ViT).
#[derive(Module, Debug)]
pub struct TransformerBlock {
    pub(crate) norm1: LayerNorm,
    pub(crate) attn: Attention,
    pub(crate) ls1: Option<LayerScale>,
    pub(crate) norm2: LayerNorm,
    pub(crate) mlp: Mlp,
    pub(crate) ls2: Option<LayerScale>,
}

impl TransformerBlock {
    /// A block over `dim`-wide tokens, with LayerScale when `layer_scale`.
    pub(crate) fn new(device: &Device, dim: usize, layer_scale: bool) -> Self {
        let scale = || layer_scale.then(|| LayerScale::new(device, dim));
        Self {
            norm1: layer_norm(device, dim),
            attn: Attention {
                qkv: linear(device, dim, 3 * dim),
                proj: linear(device, dim, dim),
            },
            ls1: scale(),
            norm2: layer_norm(device, dim),
            mlp: Mlp {
                fc1: linear(device, dim, 4 * dim),
                fc2: linear(device, 4 * dim, dim),
            },
            ls2: scale(),
        }
    }

    /// Token width.
    pub fn dim(&self) -> usize {
        self.attn.proj.weight.dims()[1]
    }

    pub(crate) fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let attended = self.attn.forward(self.norm1.forward(x.clone()));
        let x = x + scaled(&self.ls1, attended);
        let hidden = gelu(self.mlp.fc1.forward(self.norm2.forward(x.clone())));
        let mlp = self.mlp.fc2.forward(hidden);
        x + scaled(&self.ls2, mlp)
    }
}

fn scaled(scale: &Option<LayerScale>, x: Tensor<3>) -> Tensor<3> {
    match scale {
        Some(scale) => scale.forward(x),
        None => x,
    }
}
